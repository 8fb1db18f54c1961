"""Admin API under /admin (its own key, see auth.py): draft version and history, promote/rollback, pause/resume
adaptation, capture on/off and sampling rate.

- GET  /admin/draft                       current version, sha256, subscriber state, last error, history
- POST /admin/draft/promote   {version, path?, sha256?}   load a version (path omitted: a version seen before)
- POST /admin/draft/rollback  {version?}                  back to the previous (or a named) version
- GET  /admin/adaptation                  {"paused": bool, "key": "<prefix>:adaptation:paused"}
- POST /admin/adaptation/pause | /resume  sets that Redis key to "1" / "0" (the worker reads it)
- GET  /admin/capture, PUT /admin/capture {enabled?, sample_rate?}   engine.set_capture
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request

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
    return _swap_response(await drafts.swap(body.version, path, sha, "admin_promote"))


@router.post("/draft/rollback", response_model=SwapResponse, responses=ERRORS)
async def rollback(request: Request, body: RollbackRequest | None = None) -> SwapResponse:
    drafts = request.app.state.gw.drafts
    version = body.version if body and body.version else drafts.previous_version()
    if version is None:
        raise APIError(409, "no previous draft version to roll back to", code="no_previous_version")
    known = await drafts.registry.resolve(version)
    if known is None:
        raise APIError(404, f"unknown draft version {version!r}", type=NOT_FOUND, param="version",
                       code="draft_version_not_found")
    return _swap_response(await drafts.swap(version, known[0], known[1], "admin_rollback"))


def _redis(request: Request):
    state = request.app.state.gw
    if state.redis is None:
        raise APIError(503, "Redis is not configured for this gateway", type=UNAVAILABLE, code="redis_unavailable")
    return state.redis, state.adaptation_key


async def _set_paused(request: Request, paused: bool) -> AdaptationStatus:
    client, key = _redis(request)
    try:
        await client.set(key, "1" if paused else "0")
        await client.publish(f"{key.rsplit(':', 1)[0]}", json.dumps({"paused": paused}))
    except Exception as e:  # noqa: BLE001
        raise APIError(503, f"Redis error: {e}", type=UNAVAILABLE, code="redis_unavailable") from None
    log.info("adaptation %s by admin", "paused" if paused else "resumed")
    return AdaptationStatus(paused=paused, key=key)


@router.get("/adaptation", response_model=AdaptationStatus, responses=ERRORS)
async def adaptation_status(request: Request) -> AdaptationStatus:
    client, key = _redis(request)
    try:
        value = await client.get(key)
    except Exception as e:  # noqa: BLE001
        raise APIError(503, f"Redis error: {e}", type=UNAVAILABLE, code="redis_unavailable") from None
    return AdaptationStatus(paused=value in (b"1", "1"), key=key)


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
