"""`lkserve demo` for real (default SmolLM2 models, embedded Redis, gateway, worker), interrupted with Ctrl-C
mid-traffic: it must stop every process it started and still write its summary and plot."""

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


def test_demo_runs_and_ctrl_c_stops_everything(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "lkserve.cli", "demo", "--minutes", "5", "--clients", "2",
                             "--max-tokens", "48", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "120"})
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
