"""GET /health (the process answers), GET /ready (engine loaded and the draft version known), GET /metrics."""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from lkserve.gateway.generation import served_model_name
from lkserve.gateway.protocol import HealthResponse, ReadyResponse
from lkserve.metrics.serving import ENGINE_STATS

log = logging.getLogger("lkserve.gateway")

router = APIRouter()


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    return HealthResponse()


@router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def ready(request: Request):
    state = request.app.state.gw
    engine = state.engine
    if engine is None:
        return JSONResponse(ReadyResponse(status="not_ready", reason="engine not loaded").model_dump(), 503)
    needs_draft = getattr(getattr(engine, "settings", None), "method", "draft_model") in ("draft_model", "eagle3")
    version = getattr(engine, "draft_version", None)
    body = ReadyResponse(status="ready", model=served_model_name(state), draft_version=version,
                         draft_sha256=getattr(engine, "draft_sha256", None))
    if needs_draft and version is None:
        body.status, body.reason = "not_ready", "draft version unknown"
        return JSONResponse(body.model_dump(), 503)
    return body


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    engine = request.app.state.gw.engine
    if engine is not None:  # the capture counters live in vLLM's engine process: one RPC, never a stuck scrape
        try:
            info = await asyncio.wait_for(engine.info(), 1.0)
            # vLLM's worker (and the capture sink in it) runs in the engine-core process, a child of this one, in
            # either layout; only a worker in this very process shares this registry's sink counters
            ENGINE_STATS.update(info, info.get("pid") == os.getpid())
        except Exception as e:  # noqa: BLE001 - serve the last known values
            log.debug("engine stats not refreshed: %r", e)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
