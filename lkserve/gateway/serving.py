"""The skeleton every generation endpoint shares: validated request -> engine jobs -> admission slot -> stream
(SSE, optional usage chunks) or collect (one JSON body) -> usage. An endpoint module (completions.py, chat.py)
turns its request into a `Plan` and says, through an `Endpoint`, how its chunks and responses look.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from lkserve.capture.sampling import opted_out
from lkserve.gateway import generation as g
from lkserve.gateway.errors import bad_request, shutting_down
from lkserve.gateway.protocol import ErrorResponse, UsageInfo

# The error statuses every /v1 route documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 429, 500)
}
# Generation routes also answer 200 with an event stream.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}},
}


async def tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) > 20_000:  # keep the event loop responsive for long prompts
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_request(state, body) -> str:
    """Checks that come before any tokenizing: the served model's name (returned) and unsupported fields."""
    model = g.check_model(state, body.model)
    problem = body.unsupported()
    if problem:
        raise bad_request(*problem)
    return model


@dataclass
class Plan:
    """One request as engine work: a job and a ChoiceState per response choice."""

    rid: str
    jobs: list[g.Job]
    states: dict[int, g.ChoiceState]
    prompt_tokens: int


@dataclass
class Reply:
    """What an endpoint needs to shape its chunks: ids, and usage so far when the client asked for it per chunk."""

    rid: str
    created: int
    model: str
    usage: g.Usage
    prompt_tokens: int
    continuous_usage: bool

    def usage_total(self) -> UsageInfo:
        return self.usage.build(self.prompt_tokens)

    def usage_now(self) -> UsageInfo | None:
        return self.usage_total() if self.continuous_usage else None


class Endpoint:
    """How one endpoint's stream chunks and final response look; the skeleton in `serve` does the rest."""

    stream_response: type  # the *StreamResponse model (used for the usage-only last chunk)

    def opening(self, reply: Reply, plan: Plan) -> Iterable[str]:
        """SSE events before any engine output."""
        return ()

    def on_chunk(self, reply: Reply, state: g.ChoiceState, chunk) -> Iterable[str]:
        """SSE events for one engine chunk, after it was applied to its choice's state."""
        raise NotImplementedError

    def response(self, reply: Reply, states: list[g.ChoiceState]):
        """The non-streaming response; `states` are sorted by choice index."""
        raise NotImplementedError


async def serve(request: Request, body, model: str, plan: Plan, endpoint: Endpoint):
    """Run `plan` on the engine and answer as an SSE stream (body.stream) or one response. The admission slot is
    held until the stream closes or the response is built; engine work is aborted when the client goes away."""
    state = request.app.state.gw
    engine = state.engine
    # opt-out by body (`"lkserve": {"capture": false}`) or by header (`x-lkserve-no-capture: 1`, docs/capture.md)
    capture = body.capture_opt() and not opted_out(request.headers)
    tags = body.capture_tags()
    if body.stop_token_ids:
        g.check_token_ids(body.stop_token_ids, len(engine.tokenizer), "stop_token_ids")
    slot = await state.admission.acquire()
    created = int(time.time())
    draft_version = engine.draft_version

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        continuous = include_usage and bool(body.stream_options.continuous_usage_stats)
        reply = Reply(plan.rid, created, model, g.Usage(list(plan.states.values()), draft_version),
                      plan.prompt_tokens, continuous)
        try:
            outputs = await g.prime(g.run_jobs(engine, plan.jobs, plan.states, capture, tags))
        except BaseException:
            slot.release()
            raise

        async def events():
            try:
                for event in endpoint.opening(reply, plan):
                    yield event
                async for index, chunk in outputs:
                    st = plan.states[index]
                    g.apply_chunk(st, chunk)
                    for event in endpoint.on_chunk(reply, st, chunk):
                        yield event
                if include_usage:
                    yield g.sse(endpoint.stream_response(
                        id=reply.rid, created=created, model=model, choices=[],
                        usage=reply.usage_total()))
            except Exception as e:  # noqa: BLE001 - reported in-stream; the status is already 200
                yield g.sse_error(shutting_down(e))
            yield g.SSE_DONE

        return g.SSEResponse(events(), on_close=slot.release)

    async def collect():
        async for index, chunk in g.run_jobs(engine, plan.jobs, plan.states, capture, tags):
            g.apply_chunk(plan.states[index], chunk)
        usage = g.Usage(list(plan.states.values()), draft_version)
        reply = Reply(plan.rid, created, model, usage, plan.prompt_tokens, False)
        return endpoint.response(reply, sorted(plan.states.values(), key=lambda s: s.index))

    try:
        return await g.run_until_disconnect(request, collect())
    finally:
        slot.release()
