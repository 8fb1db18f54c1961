"""The parts the serving skeleton (serving.py) and its endpoints are built from: sampling parameters,
context-window checks, fan-out of several prompts x n choices into engine requests, usage with speculative
statistics, logprobs collected per choice, SSE framing, and aborting engine work when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from lkserve.gateway.errors import NOT_FOUND, APIError, bad_request, error_body
from lkserve.gateway.protocol import SpeculativeUsage, UsageInfo, _SamplingFields

log = logging.getLogger("lkserve.gateway")

# Aborts scheduled from cleanup code (which may run inside a cancelled scope) are kept here until done.
_background: set[asyncio.Task] = set()


def _spawn(coro: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


# ------------------------------------------------------------------------------------------------ model names
def served_model_name(state) -> str:
    return state.settings.gateway.served_model_name or state.engine.model_id


def check_model(state, model: str | None) -> str:
    """The name to echo back; 404 (OpenAI: model_not_found) for a model this server does not serve."""
    name = served_model_name(state)
    if model is None or model in (name, state.engine.model_id):
        return name
    raise APIError(
        404,
        f"The model `{model}` does not exist. This server serves `{name}`.",
        type=NOT_FOUND,
        param="model",
        code="model_not_found",
    )


# ------------------------------------------------------------------------------------------------ sampling
def resolve_max_tokens(max_model_len: int, prompt_len: int, max_tokens: int | None, param: str) -> int:
    """OpenAI/vLLM semantics: the prompt plus max_tokens must fit in the context window; None = what is left."""
    if prompt_len == 0:
        raise bad_request("The prompt is empty.", param="prompt" if param == "max_tokens" else "messages")
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for the completion. Please reduce the length of the "
            f"{'prompt' if param == 'max_tokens' else 'messages'}.",
            param="prompt" if param == "max_tokens" else "messages",
            code="context_length_exceeded",
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room
    if max_tokens > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return max_tokens


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if t >= vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is out of vocabulary (size {vocab_size})", param=param)


def build_sampling(req: _SamplingFields, max_tokens: int, choice_index: int, logprobs: int | None = None,
                   prompt_logprobs: int | None = None):
    """One vLLM SamplingParams per choice (n=1 each). With a seed, choice i uses seed + i so choices differ but the
    whole response is reproducible. logprobs / prompt_logprobs: how many top tokens per position (None = none)."""
    from lkserve.engine.engine import sampling_params

    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens,
        "stop": req.stop_list() or None,
        "stop_token_ids": req.stop_token_ids or None,
        "ignore_eos": req.ignore_eos,
        "min_tokens": min(req.min_tokens, max_tokens),
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    if kwargs.get("top_k") == -1:
        kwargs["top_k"] = 0
    if req.seed is not None:
        seed = req.seed + choice_index
        kwargs["seed"] = seed if seed <= 2**63 - 1 else seed - 2**64
    try:
        return sampling_params(**kwargs)
    except (ValueError, TypeError) as e:  # vLLM's own checks (VLLMValidationError is a ValueError)
        raise bad_request(str(e), param=getattr(e, "parameter", None)) from None


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Job:
    """One engine request: choice `index` of the response."""

    index: int
    prompt_ids: list[int]
    sampling: Any
    request_id: str


@dataclass
class ChoiceState:
    index: int
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    spec: Any = None
    finished: bool = False
    logprobs: list = field(default_factory=list)  # engine TokenLogprobs of every token so far (when asked)
    prompt_logprobs: list | None = None  # the prompt's (echo with logprobs), from the first chunk
    text_offset: int = 0  # completions logprobs: where the next token's text starts (streaming)


@dataclass
class Usage:
    states: list[ChoiceState]
    draft_version: str | None

    def build(self, prompt_tokens: int) -> UsageInfo:
        completion = sum(s.completion_tokens for s in self.states)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            speculative=speculative_usage([s.spec for s in self.states], self.draft_version),
        )


def speculative_usage(specs: list[Any], draft_version: str | None) -> SpeculativeUsage | None:
    specs = [s for s in specs if s is not None]
    if not specs:
        return SpeculativeUsage(draft_version=draft_version) if draft_version else None
    steps = sum(s.steps for s in specs)
    drafted = sum(s.drafted for s in specs)
    accepted = sum(s.accepted for s in specs)
    k = max(len(s.per_position_accepted) for s in specs)
    per_pos = [sum(s.per_position_accepted[j] for s in specs if j < len(s.per_position_accepted)) for j in range(k)]
    return SpeculativeUsage(
        draft_version=draft_version,
        num_drafts=steps,
        num_draft_tokens=drafted,
        num_accepted_tokens=accepted,
        acceptance_rate=round(accepted / drafted, 6) if drafted else None,
        mean_acceptance_length=round(1 + accepted / steps, 6) if steps else None,
        accepted_per_position=per_pos,
    )


def _abort_unfinished(engine, jobs: list[Job], states: dict[int, ChoiceState]) -> None:
    for job in jobs:
        st = states.get(job.index)
        if st is None or not st.finished:
            _spawn(engine.abort(job.request_id))


def _client_error(exc: Exception) -> Exception:
    """vLLM rejects some requests itself when they are added (VLLMValidationError, a ValueError): the client's
    mistake, so a 400 and not a 500."""
    if isinstance(exc, ValueError) and not isinstance(exc, APIError):
        return bad_request(str(exc), param=getattr(exc, "parameter", None))
    return exc


async def run_jobs(
    engine, jobs: list[Job], states: dict[int, ChoiceState], capture: bool, tags: dict | None
) -> AsyncIterator[tuple[int, Any]]:
    """Yield (choice index, GenerationChunk) as the engine produces them, all jobs interleaved. However this ends
    (done, client gone, error), every engine request still running is aborted."""
    inner = _run_jobs(engine, jobs, states, capture, tags)
    try:
        async for item in inner:
            yield item
    except ValueError as e:
        raise _client_error(e) from None
    finally:
        await _aclose_quietly(inner)
        _abort_unfinished(engine, jobs, states)


async def _run_jobs(
    engine, jobs: list[Job], states: dict[int, ChoiceState], capture: bool, tags: dict | None
) -> AsyncIterator[tuple[int, Any]]:
    if len(jobs) == 1:
        job = jobs[0]
        gen = engine.generate(job.prompt_ids, job.sampling, job.request_id, capture=capture, tags=tags)
        try:
            async for chunk in gen:
                if chunk.finished:
                    states[job.index].finished = True
                yield job.index, chunk
        finally:
            await _aclose_quietly(gen)
        return

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        gen = engine.generate(job.prompt_ids, job.sampling, job.request_id, capture=capture, tags=tags)
        try:
            async for chunk in gen:
                queue.put_nowait((job.index, chunk, None))
            queue.put_nowait((job.index, None, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((job.index, None, e))
        finally:
            await _aclose_quietly(gen)

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            index, chunk, err = await queue.get()
            if err is not None:
                raise err
            if chunk is None:
                remaining -= 1
                continue
            if chunk.finished:
                states[index].finished = True
            yield index, chunk
    finally:
        for t in tasks:
            t.cancel()


_EMPTY = object()


async def prime(agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Wait for the first item before answering: a request the engine refuses (it validates when the request is
    added) becomes a proper 4xx instead of an error inside a 200 stream. Returns an iterator over all items."""
    try:
        first = await agen.__anext__()
    except StopAsyncIteration:
        first = _EMPTY
    except BaseException:
        await _aclose_quietly(agen)
        raise

    async def chained():
        try:
            if first is not _EMPTY:
                yield first
            async for item in agen:
                yield item
        finally:
            await _aclose_quietly(agen)

    return chained()


async def _aclose_quietly(gen) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is None:
        return
    try:
        with anyio.CancelScope(shield=True):
            await aclose()
    except Exception:
        log.debug("error closing a generator", exc_info=True)


def apply_chunk(state: ChoiceState, chunk) -> None:
    state.text += chunk.text
    state.completion_tokens = chunk.num_output_tokens
    if chunk.logprobs:
        state.logprobs.extend(chunk.logprobs)
    if chunk.prompt_logprobs is not None and state.prompt_logprobs is None:
        state.prompt_logprobs = chunk.prompt_logprobs
    if chunk.finished:
        state.finished = True
        state.finish_reason = chunk.finish_reason
        state.spec = chunk.spec


def wire_logprob(value: float) -> float:
    """OpenAI's (and vLLM's server's) stand-in for -inf, which JSON cannot carry."""
    return max(value, -9999.0)


def finish_reason(reason: str | None) -> str | None:
    if reason in (None, "stop", "length"):
        return reason
    if reason == "abort":
        return "abort"
    return "stop"  # e.g. "error" or future reasons: OpenAI clients know only stop/length


# ------------------------------------------------------------------------------------------------ SSE
def sse(payload: Any) -> str:
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream started: OpenAI/vLLM send it as a data event (the status is already 200)."""
    if isinstance(exc, APIError):
        body = error_body(exc.message, exc.type, exc.param, exc.code)
    else:
        log.exception("error while streaming", exc_info=exc)
        body = error_body("The server had an error while processing your request.", "server_error")
    return f"data: {json.dumps(body)}\n\n"


class SSEResponse(StreamingResponse):
    """text/event-stream that always watches for the client going away (whatever ASGI spec the server speaks)
    and, when it does, stops the body iterator at once: its cleanup aborts the engine requests."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None] | None = None, **kw):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        headers.update(kw.pop("headers", None) or {})
        super().__init__(content, headers=headers, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away while we wrote
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            await _aclose_quietly(self.body_iterator)
            if self._on_close is not None:
                self._on_close()


async def run_until_disconnect(request: Request, coro: Awaitable[Any]) -> Any:
    """Run a non-streaming handler body; if the client disconnects first, cancel it (its cleanup aborts the engine
    requests) and return an empty 499 response (nobody reads it)."""
    work = asyncio.ensure_future(coro)

    async def listen() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return Response(status_code=499)
