"""POST /v1/completions: OpenAI's (legacy) text completions, streaming and not.

Supported: prompt as a string, a list of strings, a list of token ids or a list of lists (up to 16 prompts),
n (up to 8; at most 16 choices per request), echo, stop, seed, temperature/top_p/top_k/min_p, penalties,
stream_options.include_usage. Not supported (400): suffix, logprobs, logit_bias, best_of != n.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from lkserve.gateway import generation as g
from lkserve.gateway import serving
from lkserve.gateway.errors import bad_request
from lkserve.gateway.protocol import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    new_id,
)

router = APIRouter()


async def _prompts(state, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """[(token ids, text or None)] per prompt."""
    p = req.prompt
    tok = state.engine.tokenizer
    vocab = len(tok)
    if isinstance(p, str):
        return [(await serving.tokenize(tok, p, True), p)]
    if p and all(isinstance(x, str) for x in p):
        return [(await serving.tokenize(tok, x, True), x) for x in p]
    if p and all(isinstance(x, int) for x in p):
        g.check_token_ids(p, vocab, "prompt")
        return [(list(p), None)]
    out = []
    for ids in p:
        g.check_token_ids(ids, vocab, "prompt")
        out.append((list(ids), None))
    return out


class _Completions(serving.Endpoint):
    stream_response = CompletionStreamResponse

    def __init__(self, echo_text: dict[int, str]):
        self.echo_text = echo_text  # choice index -> prompt text to put in front (echo=true)
        self.started: set[int] = set()

    def on_chunk(self, reply, st, chunk):
        text = chunk.text
        if st.index not in self.started:
            self.started.add(st.index)
            text = self.echo_text.get(st.index, "") + text
        if not text and not chunk.finished:
            return
        yield g.sse(CompletionStreamResponse(
            id=reply.rid, created=reply.created, model=reply.model,
            choices=[CompletionChoice(
                index=st.index, text=text,
                finish_reason=g.finish_reason(st.finish_reason) if chunk.finished else None,
            )],
            usage=reply.usage_now(),
        ))

    def response(self, reply, states):
        return CompletionResponse(
            id=reply.rid, created=reply.created, model=reply.model,
            choices=[
                CompletionChoice(index=s.index, text=self.echo_text.get(s.index, "") + s.text,
                                 finish_reason=g.finish_reason(s.finish_reason))
                for s in states
            ],
            usage=reply.usage_total(),
        )


@router.post("/v1/completions", response_model=CompletionResponse, responses=serving.GENERATION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request):
    state = request.app.state.gw
    model = serving.check_request(state, body, logprobs=body.logprobs is not None)
    prompts = await _prompts(state, body)
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="n")
    engine = state.engine
    rid = new_id("cmpl")
    plan = serving.Plan(rid, [], {}, sum(len(ids) for ids, _ in prompts))
    echo_text: dict[int, str] = {}
    for p_idx, (ids, text) in enumerate(prompts):
        max_tokens = g.resolve_max_tokens(engine.max_model_len, len(ids), body.max_tokens, "max_tokens")
        for i in range(body.n):
            index = p_idx * body.n + i
            plan.jobs.append(g.Job(index, ids, g.build_sampling(body, max_tokens, i), f"{rid}-{index}"))
            plan.states[index] = g.ChoiceState(index=index)
            if body.echo:
                echo_text[index] = text if text is not None else engine.tokenizer.decode(ids)
    return await serving.serve(request, body, model, plan, _Completions(echo_text))
