"""The worker's HTTP port: /metrics, and the registered draft checkpoints, so that gateways on other machines can
fetch an announced version without a shared filesystem.

    GET /metrics                       Prometheus text
    GET /drafts/<version>/             {"version", "sha256", "files": [{"name", "size"}]}  (also without the slash)
    GET /drafts/<version>/<file>       the file's bytes
    anything else                      404 {"error": "not found"}

Only versions in the draft registry are served, from the directory the registry holds for them, and only plain
files directly inside it (no sub-paths, no dot-files): a request cannot name anything else on the disk.

A starlette app under a uvicorn Server on its own thread: the training loop owns the main thread and never awaits,
and `WorkerHTTP.stop()` ends the server (sockets closed) when the loop ends.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("lkserve.worker")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # versions and file names: no '/', no leading '.'
NOT_FOUND = Response(b'{"error": "not found"}', 404, media_type="application/json")


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and _NAME.match(f.name))


def make_app(resolve) -> Starlette:
    """resolve(version) -> registry metadata {"path", "sha256", ...} or None."""

    def version_dir(request: Request) -> tuple[dict, Path] | None:
        names = list(request.path_params.values())
        if not all(_NAME.match(n) for n in names):
            return None
        meta = resolve(request.path_params["version"])
        path = Path(meta["path"]) if meta else None
        return (meta, path) if path is not None and path.is_dir() else None

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def manifest(request: Request) -> Response:
        found = version_dir(request)
        if found is None:
            return NOT_FOUND
        meta, path = found
        return JSONResponse({"version": request.path_params["version"], "sha256": meta.get("sha256"),
                             "files": [{"name": f.name, "size": f.stat().st_size} for f in checkpoint_files(path)]})

    async def draft_file(request: Request) -> Response:
        found = version_dir(request)
        match = [f for f in checkpoint_files(found[1]) if f.name == request.path_params["name"]] if found else []
        return FileResponse(match[0], media_type="application/octet-stream") if match else NOT_FOUND

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return NOT_FOUND if exc.status_code == 404 else JSONResponse({"error": exc.detail}, exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:  # a bad request must not kill the worker
        log.warning("worker http: %s: %r", request.url.path, exc)
        return JSONResponse({"error": "internal error"}, 500)

    routes = [Route("/metrics", metrics), Route("/drafts/{version}", manifest), Route("/drafts/{version}/", manifest),
              Route("/drafts/{version}/{name}", draft_file)]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal_error})


class WorkerHTTP:
    """`make_app(resolve)` served on host:port (0 = any free one; `.port` has the bound one) from a daemon thread.
    The socket is bound in `start()`, so a taken port raises OSError there, in the caller."""

    def __init__(self, resolve, port: int, host: str = "0.0.0.0"):
        config = uvicorn.Config(make_app(resolve), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, timeout: float = 10.0) -> WorkerHTTP:
        sock = socket.create_server((self.server.config.host, self.server.config.port))
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="lkserve-worker-http",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker http: no server on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
