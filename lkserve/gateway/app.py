"""`create_app(engine, settings)`: the FastAPI app around a running engine.

The engine is created (and shut down) by whoever calls this (`server.serve`, or a test fixture): the app only uses
it. The lifespan connects to Redis (when a URL is known) and runs the draft-announcement subscriber.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from lkserve.config import Settings
from lkserve.drafts import AsyncDraftRegistry, DraftKeys, DraftRegistry
from lkserve.gateway import admin, chat, completions, dashboard, health, models
from lkserve.gateway.admission import Admission
from lkserve.gateway.auth import Auth
from lkserve.gateway.draft_updates import ChainRegistry, DraftManager, HistoryRegistry
from lkserve.gateway.errors import APIError, UnexpectedErrors, api_error_response, install_exception_handlers
from lkserve.gateway.protocol import CaptureStatus
from lkserve.gateway.spec_k import K_POLICY

log = logging.getLogger("lkserve.gateway")


@dataclass
class GatewayState:
    engine: Any
    settings: Settings
    auth: Auth
    admission: Admission
    drafts: DraftManager
    capture: CaptureStatus
    keys: DraftKeys
    redis_url: str | None = None
    redis: Any = None  # async client: the draft subscriber
    registry: AsyncDraftRegistry | None = None  # None: standalone, admin promote/rollback act on this engine only
    started_at: float = field(default_factory=time.time)


class AuthMiddleware:
    """Pure ASGI (streaming and disconnect detection untouched): keys are checked before the body is read."""

    def __init__(self, app: ASGIApp, auth: Auth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            try:
                if path == "/v1" or path.startswith("/v1/"):
                    await self.auth.require_api_key(Request(scope))
                elif path == "/admin" or path.startswith("/admin/"):
                    await self.auth.require_admin_key(Request(scope))
            except APIError as e:
                await api_error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, settings: Settings | None = None, *, redis_url: str | None = None,
               max_running: int | None = None) -> FastAPI:
    """The gateway. `redis_url` defaults to settings.redis.url (None: no draft subscriber, no adaptation flag);
    `max_running` (requests in the engine at once) defaults to the engine's max_num_seqs."""
    settings = settings or Settings()
    gw = settings.gateway
    keys = DraftKeys(settings.redis.key_prefix)
    if max_running is None:
        max_running = getattr(gw, "max_running_requests", None) or getattr(
            getattr(engine, "settings", None), "max_num_seqs", None) or settings.engine.max_num_seqs
    auth = Auth(list(gw.api_keys), gw.admin_key)
    # the engine's own settings (Kmax, method) where it has them: the process's one /metrics K policy follows them
    engine_settings = getattr(engine, "settings", None)
    K_POLICY.configure(engine_settings if hasattr(engine_settings, "num_speculative_tokens") else settings.engine,
                       engine)
    state = GatewayState(
        engine=engine,
        settings=settings,
        auth=auth,
        admission=Admission(max_running, gw.max_queued_requests),
        drafts=DraftManager(engine, keys, fetch_dir=Path(settings.cache_dir) / "drafts-fetched"),
        capture=CaptureStatus(enabled=settings.capture.enabled, sample_rate=settings.capture.sample_rate),
        keys=keys,
        redis_url=redis_url or settings.redis.url,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        auth.log_warnings()
        if state.redis_url:
            import redis.asyncio as aioredis

            state.redis = aioredis.Redis.from_url(state.redis_url)
            state.registry = AsyncDraftRegistry(DraftRegistry(state.redis_url, keys.prefix))
            state.drafts.registry = ChainRegistry(state.registry, HistoryRegistry(state.drafts))
            state.drafts.start(state.redis)
        try:
            yield
        finally:
            await state.drafts.stop()
            if state.registry is not None:
                state.registry.close()
                state.registry = None
            if state.redis is not None:
                await state.redis.aclose()
                state.redis = None

    app = FastAPI(
        title="lkserve",
        summary="OpenAI-compatible speculative decoding whose draft keeps learning",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.gw = state
    install_exception_handlers(app)
    for module in (completions, chat, models, health, admin, dashboard):
        app.include_router(module.router)
    app.add_middleware(AuthMiddleware, auth=auth)
    app.add_middleware(UnexpectedErrors)  # added last: the outermost
    return app
