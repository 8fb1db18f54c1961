"""The embedded redis-server: loopback only, no disk by default, and never outlives the process that started it."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import redis

from lkserve.capture.embedded_redis import EmbeddedRedis, resolve_redis_url
from lkserve.capture.sampling import opted_out, should_capture
from lkserve.config import RedisSettings, Settings


def gone(pid: int, timeout: float = 5.0) -> bool:
    """True once `pid` has exited (a zombie counts as exited: it no longer serves anything)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_private_loopback_server_without_persistence(redis_server):
    config = redis.Redis.from_url(redis_server.url).config_get("*")
    assert config["bind"] == "127.0.0.1" and config["protected-mode"] == "yes"
    assert config["save"] == "" and config["appendonly"] == "no"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_maxmemory_and_aof_options(tmp_path):
    with EmbeddedRedis(tmp_path, maxmemory="16mb", persistence="aof") as server:
        config = redis.Redis.from_url(server.url).config_get("*")
        assert config["maxmemory"] == str(16 << 20) and config["maxmemory-policy"] == "noeviction"
        assert config["appendonly"] == "yes" and config["dir"] == str(tmp_path)
    assert not server.running


def test_kill_and_restart_on_the_same_port(killable_redis):
    port, pid = killable_redis.port, killable_redis.pid
    killable_redis.kill()
    assert gone(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    killable_redis.start()
    assert killable_redis.port == port and redis.Redis(port=port).ping()


def run_owner(tmp_path, tail: str) -> subprocess.Popen:
    """A child Python that starts an embedded server, prints its pid, then runs `tail`."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from lkserve.capture.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path)!r}).start()
        print(server.pid, flush=True)
        {tail}
        """
    )
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def test_server_dies_with_a_killed_parent(tmp_path):
    owner = run_owner(tmp_path, "time.sleep(60)")
    redis_pid = int(owner.stdout.readline())
    assert not gone(redis_pid, timeout=0.1)
    owner.kill()  # SIGKILL: no atexit, no cleanup; only PR_SET_PDEATHSIG can save us
    owner.wait()
    try:
        assert gone(redis_pid)
    finally:  # if the test fails, do not leave the orphan behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGKILL)


def test_server_stops_at_normal_exit(tmp_path):
    owner = run_owner(tmp_path, "sys.exit(0)")  # never calls stop()
    redis_pid = int(owner.stdout.readline())
    owner.wait(10)
    try:
        assert gone(redis_pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGKILL)


def test_forked_child_exit_does_not_stop_the_parents_server(killable_redis):
    pid = os.fork()
    if pid == 0:  # what vLLM's forked engine process would do on its way out
        killable_redis.stop()
        os._exit(0)
    os.waitpid(pid, 0)
    assert redis.Redis.from_url(killable_redis.url).ping()


def test_resolve_redis_url(tmp_path, redis_server):
    url, handle = resolve_redis_url(Settings(cache_dir=tmp_path, redis=RedisSettings(url=redis_server.url)))
    assert (url, handle) == (redis_server.url, None)

    url, handle = resolve_redis_url(Settings(cache_dir=tmp_path, redis=RedisSettings(url=None)))
    try:
        assert handle is not None and url == handle.url != redis_server.url
        assert redis.Redis.from_url(url).ping()
        assert (tmp_path / "redis" / "redis.log").exists()
    finally:
        handle.stop()
    assert not handle.running


def test_should_capture():
    assert should_capture(1.0) and not should_capture(0.0)
    assert not should_capture(1.0, opt_out=True) and not should_capture(1.0, enabled=False)
    assert should_capture(0.3, rng=lambda: 0.29) and not should_capture(0.3, rng=lambda: 0.3)
    import random

    rng = random.Random(0)
    hits = sum(should_capture(0.25, rng=rng.random) for _ in range(10_000))
    assert 2300 < hits < 2700


def test_opted_out():
    assert opted_out({"X-LKServe-No-Capture": "1"}) and opted_out({"x-lkserve-no-capture": "true"})
    assert not opted_out({"x-lkserve-no-capture": "0"}) and not opted_out({}) and not opted_out(None)
