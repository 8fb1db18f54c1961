"""POST /v1/completions: OpenAI's (legacy) text completions, streaming and not.

Supported: prompt as a string, a list of strings, a list of token ids or a list of lists (up to 16 prompts),
n (up to 8; at most 16 choices per request), echo, stop, seed, temperature/top_p/top_k/min_p, penalties,
stream_options.include_usage. Not supported (400): suffix, logprobs, logit_bias, best_of != n.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request

from lkserve.gateway import generation as g
from lkserve.gateway.errors import bad_request
from lkserve.gateway.protocol import (
    MAX_CHOICES,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ErrorResponse,
    new_id,
)

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500)
}


async def tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > 20_000:  # keep the event loop responsive for long prompts
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


async def _prompts(state, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """[(token ids, text or None)] per prompt."""
    p = req.prompt
    tok = state.engine.tokenizer
    vocab = len(tok)
    if isinstance(p, str):
        return [(await tokenize(tok, p, True), p)]
    if p and all(isinstance(x, str) for x in p):
        return [(await tokenize(tok, x, True), x) for x in p]
    if p and all(isinstance(x, int) for x in p):
        g.check_token_ids(p, vocab, "prompt")
        return [(list(p), None)]
    out = []
    for ids in p:
        g.check_token_ids(ids, vocab, "prompt")
        out.append((list(ids), None))
    return out


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_completion(body: CompletionRequest, request: Request):
    state = request.app.state.gw
    model = g.check_model(state, body.model)
    problem = body.unsupported()
    if problem:
        raise bad_request(*problem)
    if body.logprobs is not None:
        raise bad_request("logprobs are not supported by this server yet", param="logprobs")
    prompts = await _prompts(state, body)
    if len(prompts) * body.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices per request (prompts x n)", param="n")
    engine = state.engine
    rid = new_id("cmpl")
    jobs: list[g.Job] = []
    states: dict[int, g.ChoiceState] = {}
    echo_text: dict[int, str] = {}
    for p_idx, (ids, text) in enumerate(prompts):
        max_tokens = g.resolve_max_tokens(engine.max_model_len, len(ids), body.max_tokens, "max_tokens")
        for i in range(body.n):
            index = p_idx * body.n + i
            jobs.append(g.Job(index, ids, g.build_sampling(body, max_tokens, i), f"{rid}-{index}"))
            states[index] = g.ChoiceState(index=index, prompt_tokens=len(ids))
            if body.echo:
                echo_text[index] = text if text is not None else engine.tokenizer.decode(ids)
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
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

        async def events():
            try:
                started: set[int] = set()
                async for index, chunk in outputs:
                    st = states[index]
                    g.apply_chunk(st, chunk)
                    text = chunk.text
                    if index not in started:
                        started.add(index)
                        text = echo_text.get(index, "") + text
                    if not text and not chunk.finished:
                        continue
                    resp = CompletionStreamResponse(
                        id=rid, created=created, model=model,
                        choices=[CompletionChoice(
                            index=index, text=text,
                            finish_reason=g.finish_reason(st.finish_reason) if chunk.finished else None,
                        )],
                        usage=usage.build(prompt_tokens) if continuous else None,
                    )
                    yield g.sse(resp)
                if include_usage:
                    yield g.sse(CompletionStreamResponse(
                        id=rid, created=created, model=model, choices=[], usage=usage.build(prompt_tokens)))
            except Exception as e:  # noqa: BLE001 - reported in-stream; the status is already 200
                yield g.sse_error(e)
            yield g.SSE_DONE

        return g.SSEResponse(events(), on_close=slot.release)

    async def collect() -> CompletionResponse:
        async for index, chunk in g.run_jobs(engine, jobs, states, capture, tags):
            g.apply_chunk(states[index], chunk)
        usage = g.Usage(list(states.values()), draft_version)
        return CompletionResponse(
            id=rid, created=created, model=model,
            choices=[
                CompletionChoice(index=s.index, text=echo_text.get(s.index, "") + s.text,
                                 finish_reason=g.finish_reason(s.finish_reason))
                for s in sorted(states.values(), key=lambda s: s.index)
            ],
            usage=usage.build(prompt_tokens),
        )

    try:
        return await g.run_until_disconnect(request, collect())
    finally:
        slot.release()
