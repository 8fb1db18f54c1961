"""POST /v1/chat/completions: the prompt is the messages rendered with the model tokenizer's chat template.

Supported: text messages (string content or text parts) of any role the template accepts, n (up to 8), stop,
seed, temperature/top_p/top_k/min_p, penalties, max_tokens / max_completion_tokens (the latter wins),
stream_options.include_usage, add_generation_prompt / continue_final_message (vLLM extensions),
logprobs + top_logprobs (0-20).
Not supported (400): tools, non-text response_format, logit_bias, non-text content parts.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from lkserve.gateway import generation as g
from lkserve.gateway import serving
from lkserve.gateway.errors import bad_request
from lkserve.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatLogprobTop,
    ChatResponseMessage,
    DeltaMessage,
    new_id,
)

router = APIRouter()


async def render_prompt(tokenizer, req: ChatCompletionRequest) -> list[int]:
    conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
    if getattr(tokenizer, "chat_template", None) is None:
        raise bad_request("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
        )
    except Exception as e:  # noqa: BLE001 - jinja raise_exception() in templates: the messages are at fault
        raise bad_request(f"the messages do not fit the model's chat template: {e}", param="messages") from None
    return await serving.tokenize(tokenizer, text, False)


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def _logprobs(entries) -> ChatLogprobs:
    """OpenAI's chat shape for engine TokenLogprobs; top_logprobs are the most likely tokens, most likely first."""
    return ChatLogprobs(content=[
        ChatLogprobToken(token=e.token, logprob=g.wire_logprob(e.logprob), bytes=_utf8(e.token),
                         top_logprobs=[ChatLogprobTop(token=t, logprob=g.wire_logprob(v), bytes=_utf8(t))
                                       for _, t, v in e.top])
        for e in entries
    ])


def _chunk(reply: serving.Reply, index: int, delta: DeltaMessage, finish: str | None = None,
           logprobs: ChatLogprobs | None = None) -> str:
    """OpenAI leaves unset delta fields out (`{"content": "x"}`), and so do we."""
    data = ChatCompletionStreamResponse(
        id=reply.rid, created=reply.created, model=reply.model,
        choices=[ChatCompletionStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)],
        usage=reply.usage_now(),
    ).model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return g.sse(data)


class _Chat(serving.Endpoint):
    stream_response = ChatCompletionStreamResponse

    def __init__(self, logprobs: bool):
        self.logprobs = logprobs

    def opening(self, reply, plan):
        for i in sorted(plan.states):  # OpenAI opens each choice with the role
            yield _chunk(reply, i, DeltaMessage(role="assistant", content=""))

    def on_chunk(self, reply, st, chunk):
        # a chunk whose text is held back (a possible stop string) still carries its tokens' logprobs
        if chunk.text or (self.logprobs and chunk.logprobs):
            logprobs = _logprobs(chunk.logprobs or []) if self.logprobs else None
            yield _chunk(reply, st.index, DeltaMessage(content=chunk.text), logprobs=logprobs)
        if chunk.finished:
            yield _chunk(reply, st.index, DeltaMessage(), g.finish_reason(st.finish_reason))

    def response(self, reply, states):
        return ChatCompletionResponse(
            id=reply.rid, created=reply.created, model=reply.model,
            choices=[
                ChatCompletionChoice(index=s.index, message=ChatResponseMessage(content=s.text),
                                     logprobs=_logprobs(s.logprobs) if self.logprobs else None,
                                     finish_reason=g.finish_reason(s.finish_reason))
                for s in states
            ],
            usage=reply.usage_total(),
        )


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=serving.GENERATION_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = request.app.state.gw
    model = serving.check_request(state, body)
    engine = state.engine
    prompt_ids = await render_prompt(engine.tokenizer, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = g.resolve_max_tokens(engine.max_model_len, len(prompt_ids), body.effective_max_tokens(), param)
    rid = new_id("chatcmpl")
    top = (body.top_logprobs or 0) if body.logprobs else None  # vLLM: logprobs=n returns the n most likely too
    plan = serving.Plan(
        rid,
        [g.Job(i, prompt_ids, g.build_sampling(body, max_tokens, i, top), f"{rid}-{i}") for i in range(body.n)],
        {i: g.ChoiceState(index=i) for i in range(body.n)},
        len(prompt_ids),
    )
    return await serving.serve(request, body, model, plan, _Chat(bool(body.logprobs)))
