"""POST /v1/chat/completions: the prompt is the messages rendered with the model tokenizer's chat template.

Supported: text messages (string content or text parts) of any role the template accepts, n (up to 8), stop,
seed, temperature/top_p/top_k/min_p, penalties, max_tokens / max_completion_tokens (the latter wins),
stream_options.include_usage, add_generation_prompt / continue_final_message (vLLM extensions).
Not supported (400): tools, non-text response_format, logprobs, logit_bias, non-text content parts.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from lkserve.gateway import generation as g
from lkserve.gateway.completions import ERROR_RESPONSES, tokenize
from lkserve.gateway.errors import bad_request
from lkserve.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
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
    return await tokenize(tokenizer, text, False)


def _chunk_json(resp: ChatCompletionStreamResponse) -> str:
    """OpenAI leaves unset delta fields out (`{"content": "x"}`), and so do we."""
    data = resp.model_dump(mode="json")
    for choice in data["choices"]:
        choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return g.sse(data)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = request.app.state.gw
    model = g.check_model(state, body.model)
    problem = body.unsupported()
    if problem:
        raise bad_request(*problem)
    if body.logprobs:
        raise bad_request("logprobs are not supported by this server yet", param="logprobs")
    engine = state.engine
    prompt_ids = await render_prompt(engine.tokenizer, body)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = g.resolve_max_tokens(engine.max_model_len, len(prompt_ids), body.effective_max_tokens(), param)
    rid = new_id("chatcmpl")
    jobs = [g.Job(i, prompt_ids, g.build_sampling(body, max_tokens, i), f"{rid}-{i}") for i in range(body.n)]
    states = {i: g.ChoiceState(index=i, prompt_tokens=len(prompt_ids)) for i in range(body.n)}
    prompt_tokens = len(prompt_ids)
    capture, tags = body.capture_opt(), body.capture_tags()
    if body.stop_token_ids:
        g.check_token_ids(body.stop_token_ids, len(engine.tokenizer), "stop_token_ids")
    slot = await state.admission.acquire()
    created = int(time.time())
    draft_version = engine.draft_version

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and bool(body.stream_options.continuous_usage_stats)
        usage = g.Usage(list(states.values()), draft_version)
        try:
            outputs = await g.prime(g.run_jobs(engine, jobs, states, capture, tags))
        except BaseException:
            slot.release()
            raise

        def chunk(index: int, delta: DeltaMessage, finish: str | None = None) -> str:
            return _chunk_json(ChatCompletionStreamResponse(
                id=rid, created=created, model=model,
                choices=[ChatCompletionStreamChoice(index=index, delta=delta, finish_reason=finish)],
                usage=usage.build(prompt_tokens) if continuous else None,
            ))

        async def events():
            try:
                for i in range(body.n):  # OpenAI opens each choice with the role
                    yield chunk(i, DeltaMessage(role="assistant", content=""))
                async for index, out in outputs:
                    st = states[index]
                    g.apply_chunk(st, out)
                    if out.text:
                        yield chunk(index, DeltaMessage(content=out.text))
                    if out.finished:
                        yield chunk(index, DeltaMessage(), g.finish_reason(st.finish_reason))
                if include_usage:
                    yield g.sse(ChatCompletionStreamResponse(
                        id=rid, created=created, model=model, choices=[], usage=usage.build(prompt_tokens)))
            except Exception as e:  # noqa: BLE001 - reported in-stream; the status is already 200
                yield g.sse_error(e)
            yield g.SSE_DONE

        return g.SSEResponse(events(), on_close=slot.release)

    async def collect() -> ChatCompletionResponse:
        async for index, out in g.run_jobs(engine, jobs, states, capture, tags):
            g.apply_chunk(states[index], out)
        usage = g.Usage(list(states.values()), draft_version)
        return ChatCompletionResponse(
            id=rid, created=created, model=model,
            choices=[
                ChatCompletionChoice(index=s.index, message=ChatResponseMessage(content=s.text),
                                     finish_reason=g.finish_reason(s.finish_reason))
                for s in sorted(states.values(), key=lambda s: s.index)
            ],
            usage=usage.build(prompt_tokens),
        )

    try:
        return await g.run_until_disconnect(request, collect())
    finally:
        slot.release()
