"""GET /dashboard and GET /dashboard/data on the live gateway of test_gateway_api (real vLLM, tiny models): real
traffic with the random draft, then with draft = target, then headless Chromium renders the page (--dump-dom) and
its numbers are checked against /dashboard/data; a screenshot is kept as tests/artifacts/dashboard.png."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from tests.test_gateway_api import ADMIN_KEY, API_KEY, live  # noqa: F401 - live: the fixture

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (`chromium` on PATH, Debian package "
                                                "`chromium`) to render /dashboard"),
]

ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPTS = [
    "def main(argv):\n    parser = argparse.ArgumentParser(",
    "The quick brown fox jumps over the lazy dog.",
    "import json\nimport os\n\nclass Config:\n",
    "    for i, line in enumerate(lines):\n        if not line",
    "with open(path, encoding='utf-8') as f:\n",
]


# ---------------------------------------------------------------------------------------------------- helpers
def data(server, **params) -> dict:
    r = httpx.get(f"{server.url}/dashboard/data", params=params, timeout=30)  # no key: open like /metrics
    assert r.status_code == 200, r.text
    return r.json()


def complete(server, i: int) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120, json={
        "model": server.state.engine.model_id, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24,
        "temperature": 1.0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def traffic(server, version: str, min_requests: int = 4, min_seconds: float = 4.0) -> tuple[float, float]:
    """Requests until both minimums are reached (the sampler snapshots every second), then wait for a snapshot
    taken after the last one finished, so that no window mixes this version's traffic with the next one's.
    Returns the (unix) times the traffic started and ended."""
    assert server.state.engine.draft_version == version
    start, t0, n = time.time(), time.monotonic(), 0
    while n < min_requests or time.monotonic() - t0 < min_seconds:
        complete(server, n)
        n += 1
    done = time.time()
    deadline = time.monotonic() + 15
    while True:
        d = data(server)
        if d["series"] and d["series"][-1]["t"] > done:
            assert d["series"][-1]["version"] == version
            return start, done
        assert time.monotonic() < deadline, "no dashboard snapshot after the traffic"
        time.sleep(0.3)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=8000", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, f"chromium failed ({res.returncode}): {res.stderr[-2000:]}"
    return res


class Dom(HTMLParser):
    """Every element's attributes, by id, with the id of the <svg> it is drawn in."""

    def __init__(self, html: str):
        super().__init__()
        self.elements: list[dict] = []
        self.by_id: dict[str, dict] = {}
        self._svg: list[str | None] = []
        self.feed(html)

    def _element(self, tag, attrs) -> dict:
        el = {"tag": tag, "svg": self._svg[-1] if self._svg else None, **{k: v or "" for k, v in attrs}}
        self.elements.append(el)
        if "id" in el:
            self.by_id[el["id"]] = el
        return el

    def handle_starttag(self, tag, attrs):
        el = self._element(tag, attrs)
        if tag == "svg":
            self._svg.append(el.get("id"))

    def handle_startendtag(self, tag, attrs):
        self._element(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "svg" and self._svg:
            self._svg.pop()

    def value(self, element_id: str) -> str:
        assert element_id in self.by_id, f"no element #{element_id} in the page"
        return self.by_id[element_id].get("data-value", "")

    def number(self, element_id: str) -> float:
        raw = self.value(element_id)
        try:
            v = float(raw)
        except ValueError:
            pytest.fail(f"#{element_id} data-value is not a number: {raw!r}")
        assert math.isfinite(v), (element_id, raw)
        return v

    def drawn_in(self, svg_id: str, tag: str, cls: str | None = None) -> list[dict]:
        return [e for e in self.elements if e["svg"] == svg_id and e["tag"] == tag
                and (cls is None or cls in e.get("class", "").split())]


def path_points(d: str) -> int:
    return sum(1 for cmd in d.replace(",", " ").split() if cmd[:1] in "ML" and len(cmd) > 1)


# ---------------------------------------------------------------------------------------------------- the test
def test_dashboard_renders_live_acceptance(live, tmp_path):  # noqa: F811 - the imported fixture
    handle = live.handle
    try:
        page = httpx.get(f"{live.url}/dashboard", timeout=30)  # no key needed
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert 'id="acceptance-rate"' in page.text and "<script" in page.text
        offline = page.text.replace("http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
        assert "http://" not in offline and "https://" not in offline
        assert data(live, since="not-a-number")["series"] is not None  # bad input: the whole history

        handle.use_draft("random")
        random_start, random_end = traffic(live, "random")
        handle.use_draft("target")
        traffic(live, "target")

        d = data(live)
        engine = live.state.engine
        assert d["version"] == engine.draft_version == "target"
        versions = d["counters"]["versions"]
        assert versions["random"]["drafted"] > 0 and versions["target"]["drafted"] > 0
        cur = d["current"]
        assert cur["version"] == "target"
        assert cur["acceptance_rate"] == pytest.approx(versions["target"]["accepted"] / versions["target"]["drafted"])
        assert cur["tau"] == pytest.approx(1 + versions["target"]["accepted"] / versions["target"]["drafts"])
        random_rate = versions["random"]["accepted"] / versions["random"]["drafted"]
        assert cur["acceptance_rate"] > 0.9 > random_rate  # draft = target: (almost) every draft token accepted
        assert [p["position"] for p in cur["positions"]] == list(range(len(cur["positions"])))
        assert len(cur["positions"]) >= 1

        series = d["series"]
        assert {s["version"] for s in series} >= {"random", "target"}
        # nobody asked for /dashboard/data during the traffic: these snapshots are the background sampler's
        assert sum(random_start < s["t"] < random_end for s in series) >= 2, series
        for a, b in itertools.pairwise(series):
            assert b["t"] > a["t"]
            for key in ("drafted", "accepted", "drafts", "tokens"):
                assert b[key] >= a[key], (key, a, b)
        tail = data(live, since=series[-2]["t"], instance=d["instance"])
        assert tail["partial"] and all(s["t"] > series[-2]["t"] for s in tail["series"])
        assert any(e["version"] == "target" and e["ok"] for e in d["timeline"])
        assert all("path" not in e and "sha256" not in e for e in d["timeline"])  # no key: no paths, no hashes
        assert d["counters"]["tokens"] > 0 and d["counters"]["requests"]

        # ---- the page, rendered
        dom = Dom(chromium(tmp_path, "--dump-dom", f"{live.url}/dashboard").stdout)
        after = data(live)  # no traffic since: same counters
        rate = dom.number("acceptance-rate")
        assert 0.0 <= rate <= 1.0
        assert rate == pytest.approx(after["current"]["acceptance_rate"], abs=1e-5)
        tau = dom.number("tau")
        assert tau >= 1.0
        assert tau == pytest.approx(after["current"]["tau"], abs=1e-5)
        assert dom.value("draft-version") == engine.draft_version
        assert dom.number("tokens-per-s") >= 0.0

        bars = [b for b in dom.drawn_in("position-chart", "rect", "pos-bar") if b.get("data-version") == "target"]
        assert bars, "no per-position bars"
        expected = {p["position"]: p["acceptance"] for p in after["current"]["positions"]}
        for bar in bars:
            pos, value = int(bar["data-position"]), float(bar["data-value"])
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(expected[pos], abs=1e-5)
        assert sorted(int(b["data-position"]) for b in bars) == sorted(expected)

        lines = dom.drawn_in("acceptance-chart", "path", "acc-line")
        assert lines and sum(path_points(p.get("d", "")) for p in lines) >= 2, lines
        assert {p.get("data-version") for p in lines} >= {"random", "target"}
        assert dom.drawn_in("acceptance-chart", "line", "marker"), "no version-change marker"
        segs = {s.get("data-version") for s in dom.drawn_in("version-timeline", "rect", "version-seg")}
        assert segs >= {"random", "target"}
        assert dom.drawn_in("tokens-chart", "path", "tps-line")

        # ---- a screenshot for people
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        chromium(tmp_path, "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,900",
                 f"{live.url}/dashboard")
        assert shot.is_file() and shot.stat().st_size > 10_000
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        handle.use_draft("random")
