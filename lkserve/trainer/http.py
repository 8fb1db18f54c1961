"""The worker's HTTP port: /metrics, and the registered draft checkpoints, so that gateways on other machines can
fetch an announced version without a shared filesystem.

    GET /metrics                       Prometheus text
    GET /drafts/<version>/             {"version", "sha256", "files": [{"name", "size"}]}
    GET /drafts/<version>/<file>       the file's bytes

Only versions in the draft registry are served, from the directory the registry holds for them, and only plain
files directly inside it (no sub-paths, no dot-files): a request cannot name anything else on the disk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("lkserve.worker")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # versions and file names: no '/', no leading '.'


def checkpoint_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and _NAME.match(f.name))


def make_handler(resolve):
    """resolve(version) -> registry metadata {"path", "sha256", ...} or None."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
            try:
                if parts == ["metrics"]:
                    return self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                if len(parts) in (2, 3) and parts[0] == "drafts" and all(_NAME.match(p) for p in parts[1:]):
                    meta = resolve(parts[1])
                    path = Path(meta["path"]) if meta else None
                    if path is not None and path.is_dir():
                        files = checkpoint_files(path)
                        if len(parts) == 2:
                            body = {"version": parts[1], "sha256": meta.get("sha256"),
                                    "files": [{"name": f.name, "size": f.stat().st_size} for f in files]}
                            return self._send(200, json.dumps(body).encode(), "application/json")
                        match = [f for f in files if f.name == parts[2]]
                        if match:
                            return self._send_file(match[0])
                return self._send(404, b'{"error": "not found"}', "application/json")
            except (BrokenPipeError, ConnectionResetError):
                return None
            except Exception as e:  # noqa: BLE001 - a bad request must not kill the worker
                log.warning("worker http: %s: %r", self.path, e)
                return self._send(500, b'{"error": "internal error"}', "application/json")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_file(self, path: Path) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

        def log_message(self, fmt, *args) -> None:
            log.debug("worker http: " + fmt, *args)

    return Handler


def serve_worker_http(port: int, resolve, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the server on a daemon thread; `server.server_address` has the bound port (port 0 = any free one)."""
    server = ThreadingHTTPServer((host, port), make_handler(resolve))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="lkserve-worker-http", daemon=True).start()
    return server
