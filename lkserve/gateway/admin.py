"""Admin API under /admin (its own key, see auth.py): draft version and history, promote/rollback, pause/resume
adaptation, capture on/off and sampling rate.

- GET  /admin/draft                       current version, sha256, subscriber state, last error, history
- POST /admin/draft/promote   {version, path?, sha256?}   load a version (path omitted: a version known before)
- POST /admin/draft/rollback  {version?}                  back to the previous (or a named) version
- GET  /admin/adaptation                  {"paused": bool, "key": "<prefix>:adaptation:paused"}
- POST /admin/adaptation/pause | /resume  sets that Redis key to "1" / "0" (the worker reads it)
- GET  /admin/capture, PUT /admin/capture {enabled?, sample_rate?}   engine.set_capture

With Redis, promote and rollback act through the draft registry (lkserve.drafts): the version is loaded here
first (a refused checkpoint is never announced), then registered if new and announced, so every replica's
subscriber and the worker's gate follow, and a resubscribe re-reads the promoted version from `drafts:latest`.
Without Redis (standalone) they swap this gateway's engine only.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import redis
from fastapi import APIRouter, Request

from lkserve.checkpoint import checkpoint_sha256
from lkserve.drafts import AnnounceError
from lkserve.gateway.errors import NOT_FOUND, UNAVAILABLE, APIError
from lkserve.gateway.protocol import (
    AdaptationStatus,
    CaptureStatus,
    CaptureUpdate,
    DraftStatus,
    ErrorResponse,
    PromoteRequest,
    RollbackRequest,
    SwapResponse,
)

log = logging.getLogger("lkserve.gateway")
router = APIRouter(prefix="/admin")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 403, 404, 409, 422, 503)}


def _swap_response(entry) -> SwapResponse:
    if not entry.ok:
        raise APIError(422, f"draft {entry.version} was not loaded: {entry.reason}; still serving the previous one",
                       code="draft_swap_refused")
    return SwapResponse(ok=True, version=entry.version, reason=entry.reason, seconds=entry.seconds)


def _redis_error(e: Exception) -> APIError:
    return APIError(503, f"Redis error: {e}", type=UNAVAILABLE, code="redis_unavailable")


def _is_local_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a checkpoint here
        return False


async def _register(registry, version: str, path: str, sha: str | None) -> str | None:
    """Register a promoted version the registry does not know (its sha256 computed here when not given), before
    it is loaded. A path that is not a directory here is left to the swap to refuse."""
    if registry is None or not _is_local_dir(path):
        return sha
    try:
        sha = sha or await asyncio.to_thread(checkpoint_sha256, path)
        await registry.ensure_registered(version, path, sha)
    except AnnounceError as e:
        raise APIError(409, str(e), param="version", code="draft_version_conflict") from None
    except redis.RedisError as e:
        raise _redis_error(e) from None
    return sha


async def _announce(registry, version: str, reason: str, rollback: bool) -> None:
    try:
        if rollback:
            await registry.rollback(version, reason)
        else:
            await registry.announce(version, reason)
    except AnnounceError as e:
        raise APIError(409, f"{version} loaded here but not announced: {e}", code="draft_announce_refused") from None
    except redis.RedisError as e:
        raise _redis_error(e) from None


async def _switch(request: Request, version: str, path: str, sha: str | None, source: str,
                  rollback: bool) -> SwapResponse:
    state = request.app.state.gw
    sha = await _register(state.registry, version, path, sha)
    resp = _swap_response(await state.drafts.swap(version, path, sha, source))
    if state.registry is not None:
        await _announce(state.registry, version, source, rollback)
    return resp


@router.get("/draft", response_model=DraftStatus, responses=ERRORS)
async def draft_status(request: Request) -> DraftStatus:
    return DraftStatus(**request.app.state.gw.drafts.status())


@router.post("/draft/promote", response_model=SwapResponse, responses=ERRORS)
async def promote(body: PromoteRequest, request: Request) -> SwapResponse:
    drafts = request.app.state.gw.drafts
    path, sha = body.path, body.sha256
    if path is None:
        known = await drafts.registry.resolve(body.version)
        if known is None:
            raise APIError(404, f"unknown draft version {body.version!r}: give its path", type=NOT_FOUND,
                           param="version", code="draft_version_not_found")
        path, sha = known[0], sha or known[1]
    return await _switch(request, body.version, path, sha, "admin_promote", rollback=False)


@router.post("/draft/rollback", response_model=SwapResponse, responses=ERRORS)
async def rollback(request: Request, body: RollbackRequest | None = None) -> SwapResponse:
    state = request.app.state.gw
    version = body.version if body and body.version else None
    if version is None and state.registry is not None:
        try:
            version = await state.registry.previous()
        except redis.RedisError as e:
            raise _redis_error(e) from None
    version = version or state.drafts.previous_version()
    if version is None:
        raise APIError(409, "no previous draft version to roll back to", code="no_previous_version")
    known = await state.drafts.registry.resolve(version)
    if known is None:
        raise APIError(404, f"unknown draft version {version!r}", type=NOT_FOUND, param="version",
                       code="draft_version_not_found")
    return await _switch(request, version, known[0], known[1], "admin_rollback", rollback=True)


def _registry(request: Request):
    state = request.app.state.gw
    if state.registry is None:
        raise APIError(503, "Redis is not configured for this gateway", type=UNAVAILABLE, code="redis_unavailable")
    return state.registry


async def _set_paused(request: Request, paused: bool) -> AdaptationStatus:
    registry = _registry(request)
    try:
        await registry.set_paused(paused)
    except redis.RedisError as e:
        raise _redis_error(e) from None
    log.info("adaptation %s by admin", "paused" if paused else "resumed")
    return AdaptationStatus(paused=paused, key=registry.keys.paused)


@router.get("/adaptation", response_model=AdaptationStatus, responses=ERRORS)
async def adaptation_status(request: Request) -> AdaptationStatus:
    registry = _registry(request)
    try:
        paused = await registry.is_paused()
    except redis.RedisError as e:
        raise _redis_error(e) from None
    return AdaptationStatus(paused=paused, key=registry.keys.paused)


@router.post("/adaptation/pause", response_model=AdaptationStatus, responses=ERRORS)
async def pause(request: Request) -> AdaptationStatus:
    return await _set_paused(request, True)


@router.post("/adaptation/resume", response_model=AdaptationStatus, responses=ERRORS)
async def resume(request: Request) -> AdaptationStatus:
    return await _set_paused(request, False)


@router.get("/capture", response_model=CaptureStatus, responses=ERRORS)
async def capture_status(request: Request) -> CaptureStatus:
    return request.app.state.gw.capture


@router.put("/capture", response_model=CaptureStatus, responses=ERRORS)
async def set_capture(body: CaptureUpdate, request: Request) -> CaptureStatus:
    state = request.app.state.gw
    enabled = state.capture.enabled if body.enabled is None else body.enabled
    rate = state.capture.sample_rate if body.sample_rate is None else body.sample_rate
    try:
        await state.engine.set_capture(enabled, rate)
    except Exception as e:
        log.exception("set_capture failed")
        raise APIError(503, f"the engine refused the capture setting: {e}", type=UNAVAILABLE,
                       code="engine_error") from None
    state.capture = CaptureStatus(enabled=enabled, sample_rate=rate)
    return state.capture
