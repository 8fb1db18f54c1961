"""`lkserve serve`: Redis (embedded unless redis.url is set), the engine with a Redis capture sink, the gateway on
uvicorn; all in one event loop. Ctrl-C / SIGTERM stop uvicorn gracefully, then the engine, then Redis."""

from __future__ import annotations

import asyncio
import logging

from lkserve.config import Settings, load_settings

log = logging.getLogger("lkserve.gateway")


async def serve_async(settings: Settings, redis_url: str | None) -> None:
    import uvicorn

    from lkserve.engine.engine import Engine
    from lkserve.gateway.app import create_app

    sink_spec = None
    if redis_url:
        from lkserve.capture.sink import redis_sink_spec

        sink_spec = redis_sink_spec(redis_url, settings.redis, settings.capture)
    engine = await Engine.create(settings.engine, settings.capture, sink_spec)
    try:
        app = create_app(engine, settings, redis_url=redis_url)
        gw = settings.gateway
        config = uvicorn.Config(app, host=gw.host, port=gw.port, log_level="info", timeout_graceful_shutdown=10,
                                log_config=None)
        log.info("lkserve gateway on http://%s:%d (model %s, draft %s)", gw.host, gw.port, engine.model_id,
                 engine.draft_version)
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown()


def serve(settings: Settings | None = None) -> None:
    """Blocking: run the gateway until interrupted."""
    settings = settings or load_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lkserve.capture.embedded_redis import resolve_redis_url

    redis_url, handle = resolve_redis_url(settings)
    try:
        asyncio.run(serve_async(settings, redis_url))
    except KeyboardInterrupt:
        pass
    finally:
        if handle is not None:
            handle.stop()
