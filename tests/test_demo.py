"""`lkserve demo` for real on the tiny models (embedded Redis, gateway, worker, the official openai client):
interrupted with Ctrl-C mid-traffic it must stop every process it started and still write its summary and plot; by
default it starts from a draft bootstrapped on the chat prompts (the same run_bootstrap as `lkserve draft
bootstrap`), serves and trains that version, compares it kept static with the adapted versions on the shifted
(HumanEval) traffic, and a second run reuses the cached bootstrap."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def tiny_env(tiny, tmp_path):
    """The demo on the tiny models (float32), a private cache, a tiny bootstrap budget."""
    return {**os.environ, "COLUMNS": "120", "LKSERVE_CACHE_DIR": str(tmp_path / "cache"),
            "LKSERVE_ENGINE__TARGET_MODEL": str(tiny.target), "LKSERVE_ENGINE__DRAFT_MODEL": str(tiny.random_draft),
            "LKSERVE_ENGINE__DTYPE": "float32", "LKSERVE_ENGINE__MAX_MODEL_LEN": "1024",
            "LKSERVE_TRAINER__LR": "0.01", "LKSERVE_TRAINER__TRAIN_PARAMS": "all",
            "LKSERVE_DEMO__BOOTSTRAP_PROMPTS": "40", "LKSERVE_DEMO__BOOTSTRAP_SAMPLES": "2",
            "LKSERVE_DEMO__BOOTSTRAP_MAX_TOKENS": "48", "LKSERVE_DEMO__BOOTSTRAP_POSITIONS": "12000"}


def _run(args, env, out: Path, timeout: float = 600) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-m", "lkserve.cli", "demo", "--clients", "2", "--max-tokens", "48",
                           "--out", str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return json.loads((out / "summary.json").read_text()), text


def test_demo_runs_and_ctrl_c_stops_everything(tmp_path, tiny_env):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "lkserve.cli", "demo", "--minutes", "5", "--clients", "2",
                             "--max-tokens", "48", "--out", str(out), "--no-bootstrap"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=tiny_env,
                            # a pytest started in the background (`cmd &`) ignores SIGINT, and so would the demo
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 - one call
    lines = []
    try:
        deadline = time.monotonic() + 400
        for line in proc.stdout:  # wait until traffic starts
            lines.append(line)
            if "Live dashboard" in line or time.monotonic() > deadline:
                break
        assert any("Live dashboard" in ln for ln in lines), "".join(lines)[-3000:]
        time.sleep(30)  # some traffic, under the live view
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] > 0 and summary["errors"] == 0
    assert summary["bootstrap"] is None and summary["config"]["static_version"] == "base"
    base = summary["by_version"]["base"]
    assert base["drafted"] > 0 and 0 <= base["acceptance_rate"] <= 1 and base["tau"] >= 1
    assert (out / "acceptance.png").stat().st_size > 10_000
    assert set(summary["pids"]) == {"redis", "gateway", "worker"}

    def leftovers() -> list[int]:
        """Live processes the demo started, and any member of the gateway's process group (vLLM's engine core)."""
        group = subprocess.run(["pgrep", "-g", str(summary["pids"]["gateway"])], capture_output=True, text=True,
                               check=False).stdout.split()
        return [pid for pid in [*summary["pids"].values(), *map(int, group)] if _alive(pid)]

    deadline = time.monotonic() + 15  # SIGKILLed children may take a moment to be reaped
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not leftovers(), f"left processes behind: {leftovers()}"


def test_demo_starts_from_a_cached_bootstrap_and_reports_the_shift(tmp_path, tiny_env):
    """First run: bootstraps (held-out alpha up by a margin), serves and trains from version "bootstrap", pins the
    worker to a CPU of its own, and reports static vs adapted on the HumanEval traffic. Second run: the same
    checkpoint from the cache, no bootstrap."""
    from lkserve.checkpoint import WEIGHTS_FILE, sha256_file

    first, text = _run(["--minutes", "1.5"], tiny_env, tmp_path / "first")
    assert "bootstrapping the draft" in text and "bootstrap step" in text, text[-3000:]
    boot = first["bootstrap"]
    assert boot["cached"] is False and boot["steps"] > 0 and boot["positions_trained"] >= 12_000
    assert boot["heldout_after"]["alpha_mean"] >= boot["heldout_before"]["alpha_mean"] + 0.02, boot
    assert sha256_file(Path(boot["path"]) / WEIGHTS_FILE) == boot["sha256"]
    assert first["timing"]["bootstrap_s"] > 0 and first["timing"]["first_response_s"] > first["timing"][
        "gateway_ready_s"]
    # the gateway served the bootstrapped checkpoint under its registry name, from the first request on
    assert first["config"]["static_version"] == "bootstrap" and first["draft"] == boot["path"]
    assert first["samples"][0]["version"] == "bootstrap" and first["by_version"]["bootstrap"]["drafted"] > 0
    assert first["errors"] == 0 and first["by_phase"]["HumanEval"], "no traffic after the shift"
    # the CPU split: the worker on the last CPU with one thread, the engine on the others
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:
        assert first["cpu"]["worker_cpus"] == cpus[len(cpus) - len(cpus) // 2:]
        assert first["cpu"]["engine_threads"] == str(len(first["cpu"]["engine_cpus"]))
    assert first["worker"]["positions_per_minute"] is not None and first["serving"]["tokens_per_s"] > 0
    # static vs adapted on the shifted traffic, offline on the records each version served
    shift = first["shift"]
    assert shift["static_version"] == "bootstrap" and shift["records"] > 0
    served = set(first["by_phase"]["HumanEval"])
    assert set(shift["by_version"]) == served, (shift["by_version"], served)
    for version, row in shift["by_version"].items():
        assert row["positions"] > 0 and 0 <= row["served_acceptance"] <= 1
        assert 0 <= row["alpha_static"] <= 1 and 0 <= row["alpha_version"] <= 1
        if version == "bootstrap":  # the static draft against itself: the same figure
            assert row["alpha_version"] == row["alpha_static"]
    assert 0 <= shift["all"]["alpha_static"] <= 1
    # the same comparison in 2-minute windows of the shifted traffic: every window's rows, static against itself
    windows = shift["windows"]
    assert windows and sum(w["rows"] for w in windows) == shift["all"]["rows"], (windows, shift["all"])
    for w in windows:
        assert w["tau_static"] >= 1 and w["tau_served"] >= 1 and set(w["versions"]) <= served
        if not w["after_swap"]:
            assert w["tau_served"] == w["tau_static"] and w["alpha_served"] == w["alpha_static"], w

    second, text = _run(["--minutes", "0.5"], tiny_env, tmp_path / "second")
    assert "bootstrapping the draft" not in text and "cached" in text, text[-3000:]
    again = second["bootstrap"]
    assert again["cached"] is True and again["path"] == boot["path"] and again["sha256"] == boot["sha256"]
    assert second["timing"]["bootstrap_s"] < 10 and second["by_version"]["bootstrap"]["drafted"] > 0


def test_demo_worker_fine_tunes_a_bootstrapped_draft_at_a_tenth_of_the_rate(tmp_path):
    """The worker's learning rate: demo.worker_lr when set; else a tenth of trainer.lr from the bootstrapped draft,
    trainer.lr (the method's default) from the untrained one."""
    from lkserve.cli.demo import worker_settings
    from lkserve.config import Settings

    s = Settings(cache_dir=tmp_path)

    def lr(settings, method, base):
        w = worker_settings(settings, "redis://127.0.0.1:1/0", tmp_path, tmp_path, tmp_path, 0, method, base)
        return w.trainer.lr_for(method)

    assert lr(s, "draft_model", "bootstrap") == pytest.approx(3e-4)
    assert lr(s, "eagle3", "bootstrap") == pytest.approx(1e-4)
    assert lr(s, "draft_model", "base") == pytest.approx(3e-3)
    set_lr = s.model_copy(update={"demo": s.demo.model_copy(update={"worker_lr": 5e-4})})
    assert lr(set_lr, "draft_model", "bootstrap") == lr(set_lr, "draft_model", "base") == pytest.approx(5e-4)
