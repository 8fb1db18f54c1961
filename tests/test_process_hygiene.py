"""Process hygiene of `lkserve serve` and `lkserve worker`, run as a user runs them (subprocesses: the serve process,
vLLM's EngineCore, in the `multiprocess` layout its Worker too, the embedded redis-server). `engine.layout` is serve's
default (`in_process`) unless a test names one.

- SIGTERM / SIGINT: in-flight requests finish (grace) or get a 503 / an error event; every process of the tree is
  gone within 30 s; the embedded Redis's URL file is removed. A `lkserve worker` in "another terminal" (no
  LKSERVE_REDIS__URL, same cache dir) finds that Redis, and stops cleanly on SIGTERM.
- SIGKILL of the serve process: the engine core notices and stops itself and its workers (lifeline.py); the URL file
  left behind is ignored as stale.
- SIGTERM of a training worker: it checkpoints and acks consistently, and a restart loses and repeats nothing.

The tree is walked in /proc *before* the signal (a child re-parented to init after its parent dies is no longer
found by walking from the parent), and each pid is checked afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from lkserve.capture.embedded_redis import free_port, url_file

ROOT = Path(__file__).resolve().parents[1]
STOP_S = 30  # the bound the issue asks for


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `pid`."""
    kids, out, todo = _children(), {}, [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            with contextlib.suppress(OSError):
                out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()[:120]
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def base_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LKSERVE_", "VLLM_ENABLE_V1_MULTIPROCESSING"))}
    env.update(PYTHONPATH=str(ROOT), LKSERVE_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    return env


class Proc:
    """A `python -m lkserve.cli ...` subprocess, its output in a file; killed with its whole session at the end
    whatever happens (so a failing test leaves nothing behind either)."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "lkserve.cli", *argv], env=env, cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout}s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def close(self, tree: dict[int, str] | None = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in tree or ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


def start_serve(tiny, tmp_path: Path, **env) -> tuple[Proc, str]:
    port = free_port()
    serve_env = {**base_env(tmp_path), "LKSERVE_ENGINE__TARGET_MODEL": str(tiny.target),
                 "LKSERVE_ENGINE__DRAFT_MODEL": str(tiny.random_draft), "LKSERVE_ENGINE__METHOD": "draft_model",
                 "LKSERVE_ENGINE__DTYPE": "float32", "LKSERVE_ENGINE__MAX_MODEL_LEN": "512",
                 "LKSERVE_ENGINE__KV_CACHE_GIB": "1", "LKSERVE_ENGINE__ENFORCE_EAGER": "true",
                 "LKSERVE_GATEWAY__PORT": str(port), **env}
    proc = Proc(["serve"], serve_env, tmp_path / "serve.log")
    proc.wait_for("Application startup complete", 300)
    return proc, f"http://127.0.0.1:{port}"


def engine_tree(proc: Proc, layout: str = "in_process") -> dict[int, str]:
    """The serve's process tree; AsyncLLM's engine core is a child process in either layout, the worker a process
    of its own only in `multiprocess`."""
    tree = descendants(proc.pid)
    assert any("EngineCore" in c for c in tree.values()), tree
    assert any("VLLM::Worker" in c for c in tree.values()) == (layout == "multiprocess"), tree
    return tree


def long_body(tiny, stream: bool) -> dict:
    return {"model": Path(tiny.target).name, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 1.0,
            "stream": stream}


def stream_events(base: str, body: dict, first: threading.Event, out: list) -> None:
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                first.set()
    first.set()


@pytest.mark.slow  # starts `lkserve serve` (a vLLM engine)
def test_sigterm_aborts_inflight_stops_the_tree_and_a_worker_finds_the_redis(tiny, tmp_path):
    serve, base = start_serve(tiny, tmp_path, LKSERVE_GATEWAY__SHUTDOWN_GRACE_S="0")
    tree, worker = {}, None
    try:
        info = json.loads(url_file(tmp_path / "cache").read_text())
        assert info["pid"] == serve.pid
        # a second terminal: no LKSERVE_REDIS__URL, the same cache dir
        worker = Proc(["worker"], {**base_env(tmp_path), "LKSERVE_ENGINE__DRAFT_MODEL": str(tiny.random_draft),
                                   "LKSERVE_ENGINE__METHOD": "draft_model", "LKSERVE_TRAINER__METRICS_PORT": "0",
                                   "LKSERVE_TRAINER__CONSUMER": "w"},
                      tmp_path / "worker.log")
        worker.wait_for('"event": "worker_start"', 120)
        assert f"using the embedded Redis of `lkserve serve` (pid {serve.pid}) at {info['url']}" in worker.text()
        worker_tree = descendants(worker.pid)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(STOP_S) == 0, worker.text()[-3000:]
        assert '"event": "worker_stop"' in worker.text()
        assert not wait_gone(worker_tree, 5)

        first, events = threading.Event(), []
        streamer = threading.Thread(target=stream_events, args=(base, long_body(tiny, True), first, events))
        answers = []
        plain = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{base}/v1/completions", json=long_body(tiny, False), timeout=60)))
        streamer.start()
        plain.start()
        assert first.wait(60) and events, "no token streamed"
        tree = engine_tree(serve)
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(STOP_S) == 0, serve.text()[-3000:]
        print(f"\nSIGTERM -> exit {time.monotonic() - t0:.1f}s; tree {sorted(tree.values())}")
        streamer.join(10)
        plain.join(10)
        assert not wait_gone(tree, 5), {p: tree[p] for p in wait_gone(tree, 0)}
        assert not url_file(tmp_path / "cache").exists()
        assert "engine stopped in" in serve.text()  # the orderly path, not the engine core's lifeline
        # the stream ends with an OpenAI-shaped error event, then [DONE]; the plain request gets a 503 body
        assert events[-1] == "[DONE]", events[-3:]
        error = json.loads(events[-2])["error"]
        assert error["code"] == "server_shutting_down" and error["type"] == "service_unavailable_error", error
        (r,) = answers
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "server_shutting_down"
    finally:
        if worker is not None:
            worker.close()
        serve.close(tree)


@pytest.mark.slow  # starts `lkserve serve` (a vLLM engine)
def test_sigint_lets_a_running_request_finish(tiny, tmp_path):
    serve, base = start_serve(tiny, tmp_path)  # default grace (5 s)
    tree = {}
    try:
        body = {**long_body(tiny, True), "max_tokens": 160, "stream_options": {"include_usage": True}}
        first, events = threading.Event(), []
        streamer = threading.Thread(target=stream_events, args=(base, body, first, events))
        streamer.start()
        assert first.wait(60) and events, "no token streamed"
        tree = engine_tree(serve)
        serve.proc.send_signal(signal.SIGINT)
        assert serve.proc.wait(STOP_S) == 0, serve.text()[-3000:]
        streamer.join(10)
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 160, events[-3:]  # finished, not cut
        assert not wait_gone(tree, 5), {p: tree[p] for p in wait_gone(tree, 0)}
        assert not url_file(tmp_path / "cache").exists()
    finally:
        serve.close(tree)


@pytest.mark.slow  # starts `lkserve serve` (a vLLM engine)
@pytest.mark.parametrize("layout", ["in_process", "multiprocess"])
def test_sigkill_of_serve_leaves_no_engine_and_a_stale_url_file(tiny, tmp_path, layout):
    """(With LKSERVE_DISABLE_LIFELINE=1 in the serve's environment the engine core and its worker survive.)"""
    serve, _ = start_serve(tiny, tmp_path, LKSERVE_ENGINE__LAYOUT=layout,
                           **({"LKSERVE_DISABLE_LIFELINE": "1"} if os.environ.get("HYGIENE_NO_LIFELINE") == "1" else {}))
    tree = engine_tree(serve, layout)
    try:
        t0 = time.monotonic()
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(10)
        left = wait_gone(tree, STOP_S)
        print(f"\nSIGKILL -> tree gone in {time.monotonic() - t0:.1f}s: {sorted(tree.values())}")
        assert not left, {p: tree[p] for p in left}
        assert url_file(tmp_path / "cache").exists()  # nobody could remove it
        r = subprocess.run([sys.executable, "-m", "lkserve.cli", "worker"], env=base_env(tmp_path), cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0
        assert f"ignoring stale {url_file(tmp_path / 'cache')}" in r.stderr and f"pid {serve.pid}" in r.stderr
    finally:
        serve.close(tree)


# ------------------------------------------------------------------------------------------------ the worker
@pytest.mark.timeout(240)
def test_worker_sigterm_mid_training_checkpoints_consistently(tiny, redis_url, redis_client, tmp_path):
    """SIGTERM between steps: exit 0 within the bound, checkpoint intact, acked entries all in it; a restart then
    trains every remaining record once (nothing lost, nothing twice)."""
    from lkserve.trainer.replay import is_heldout
    from lkserve.trainer.state import TrainingStateStore
    from tests.test_trainer_data import make_records
    from tests.test_trainer_worker import _push

    records = make_records(tiny.target, n_requests=120, seed=5, gen_len=32)
    ids = _push(redis_client, "cap", records)
    env = {**base_env(tmp_path), "LKSERVE_REDIS__URL": redis_url, "LKSERVE_REDIS__STREAM": "cap",
           "LKSERVE_REDIS__KEY_PREFIX": "w", "LKSERVE_ENGINE__DRAFT_MODEL": str(tiny.random_draft),
           "LKSERVE_ENGINE__METHOD": "draft_model", "LKSERVE_LOG_LEVEL": "INFO"}
    env.update({f"LKSERVE_TRAINER__{k.upper()}": str(v) for k, v in {
        "consumer": "w1", "batch_positions": 256, "min_fresh_positions": 256, "eval_every_steps": 1000,
        "checkpoint_every_steps": 1000, "checkpoint_every_seconds": 1000, "heldout_fraction": 0.2,
        "keep_ledger": "true", "metrics_port": 0, "step_delay": 0.3, "claim_min_idle_ms": 600000}.items()})
    worker = Proc(["worker"], env, tmp_path / "worker.log")
    try:
        worker.wait_for('"event": "step", "t"', 120)
        worker.wait_for('"step": 3,', 60)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(STOP_S) == 0, worker.text()[-3000:]
    finally:
        worker.close()
    assert '"event": "worker_stop"' in worker.text()
    state = TrainingStateStore(tmp_path / "cache" / "worker" / "w1").load()
    assert state["trainer"]["step"] >= 3
    held = {i for i, r in zip(ids, records) if is_heldout(r.request_id, 0.2)}
    pending = {e["message_id"].decode() for e in redis_client.xpending_range("cap", "lkserve-trainers", "-", "+",
                                                                             10_000)}
    (group,) = redis_client.xinfo_groups("cap")
    acked = {e.decode() for e, _ in redis_client.xrange("cap", "-", group["last-delivered-id"])} - pending
    assert acked and acked <= set(state["ledger"]) | held  # acked only what the checkpoint holds
    again = subprocess.run([sys.executable, "-m", "lkserve.cli", "worker"], cwd=ROOT, timeout=240, text=True,
                           capture_output=True, check=False,
                           env={**env, "LKSERVE_TRAINER__EXIT_WHEN_DRAINED": "true", "LKSERVE_TRAINER__STEP_DELAY": "0"})
    assert again.returncode == 0, again.stderr[-3000:]
    ledger = TrainingStateStore(tmp_path / "cache" / "worker" / "w1").load()["ledger"]
    assert ledger[:len(state["ledger"])] == state["ledger"]
    assert not [k for k, v in Counter(ledger).items() if v > 1]
    assert sorted(ledger) == sorted(i for i in ids if i not in held)
