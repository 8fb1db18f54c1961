"""`lkserve serve`: Redis (embedded unless redis.url is set), the engine with a Redis capture sink, the gateway on
uvicorn; all in one event loop.

SIGTERM / SIGINT stop everything this process started, in order: uvicorn stops accepting connections and waits for the
running requests; those still running after `gateway.shutdown_grace_s` are aborted (503, or an error event in a
stream); then the engine (vLLM's engine core and its workers), then the embedded Redis and its URL file. Why the
signal handler below: uvicorn re-raises the signal it caught once it has returned, and with the default SIGTERM action
that killed this process before the engine was stopped (vLLM's engine core, re-parented to init, kept running). If
this process dies without cleaning up (SIGKILL), the engine core stops itself (lkserve/engine/vllm/lifeline.py) and
the embedded Redis gets SIGKILL from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from lkserve.config import Settings, load_settings

log = logging.getLogger("lkserve.gateway")


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server whose graceful shutdown also ends the requests still running after `grace_s`: the
        engine aborts them and their clients get a 503 / an error event, so the wait for them ends."""

        def __init__(self, config, engine, grace_s: float):
            super().__init__(config)
            self.engine, self.grace_s = engine, grace_s

        async def shutdown(self, sockets=None) -> None:
            drain = asyncio.ensure_future(self._abort_after_grace())
            try:
                await super().shutdown(sockets)
            finally:
                drain.cancel()

        async def _abort_after_grace(self) -> None:
            await asyncio.sleep(self.grace_s)
            n = await self.engine.abort_all("the server is shutting down")
            if n:
                log.warning("aborted %d request(s) still running %.1fs after the stop signal", n, self.grace_s)

    return Server


async def serve_async(settings: Settings, redis_url: str | None, started=None) -> None:
    """`started(server)` is called with the uvicorn server once the engine is up (the signal handler's cue)."""
    import uvicorn

    from lkserve.engine.engine import Engine
    from lkserve.gateway.app import create_app

    sink_spec = None
    if redis_url:
        from lkserve.capture.sink import redis_sink_spec

        sink_spec = redis_sink_spec(redis_url, settings.redis, settings.capture)
    # the version name the engine starts with is the registry's name for engine.draft_model (trainer.base_version,
    # "base" by default): the worker registers that checkpoint under it, so both agree on what serves first
    engine = await Engine.create(settings.engine, settings.capture, sink_spec,
                                 draft_version=settings.trainer.base_version)
    try:
        app = create_app(engine, settings, redis_url=redis_url)
        gw = settings.gateway
        config = uvicorn.Config(app, host=gw.host, port=gw.port, log_level="info", log_config=None,
                                timeout_graceful_shutdown=gw.shutdown_grace_s + 5)
        log.info("lkserve gateway on http://%s:%d (model %s, draft %s)", gw.host, gw.port, engine.model_id,
                 engine.draft_version)
        server = _server_class()(config, engine, gw.shutdown_grace_s)
        if started is not None:
            started(server)
        await server.serve()
    finally:
        t0 = time.monotonic()
        await engine.shutdown()
        log.info("engine stopped in %.1fs", time.monotonic() - t0)


def _install_stop_handlers() -> dict:
    """SIGTERM/SIGINT while the engine starts: stop at once (KeyboardInterrupt unwinds the start). Once the server
    exists: tell it (uvicorn installs its own handlers when it starts serving; when it returns it restores these and
    re-raises the signal, which then only repeats what it knows). During the final cleanup: nothing."""
    state = {"server": None, "done": False}

    def handler(sig, frame):
        if state["done"]:
            return
        if state["server"] is None:
            raise KeyboardInterrupt(signal.Signals(sig).name)
        state["server"].handle_exit(sig, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return state


def serve(settings: Settings | None = None) -> None:
    """Blocking: run the gateway until SIGTERM / SIGINT, then stop everything it started."""
    settings = settings or load_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lkserve.capture import embedded_redis

    state = _install_stop_handlers()
    handle = None
    try:
        redis_url, handle = embedded_redis.resolve_redis_url(settings)
        if handle is not None:
            path = embedded_redis.publish_url(settings.cache_dir, handle)
            log.info("embedded Redis at %s (written to %s for `lkserve worker`)", redis_url, path)
        asyncio.run(serve_async(settings, redis_url, started=lambda server: state.update(server=server)))
    except KeyboardInterrupt:
        log.info("stopped during start-up")
    finally:
        state["done"] = True  # a second signal must not interrupt the cleanup
        if handle is not None:
            embedded_redis.unpublish_url(settings.cache_dir)
            handle.stop()
        log.info("lkserve serve stopped")
