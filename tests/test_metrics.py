"""lkserve_* metrics: counts equal what the API reported per request, version labels age out, nothing is lost."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lkserve.engine.engine import SpecStats
from lkserve.metrics import serving
from tests.test_gateway_api import API_KEY, live  # noqa: F401 - live: the fixture

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from a /metrics page."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def total(samples, name, **match) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and all(dict(labels).get(k) == str(x) for k, x in match.items()))


def _spec(drafted_steps, accepted_steps, k=4) -> SpecStats:
    return SpecStats(num_spec_tokens=k, steps=len(drafted_steps), drafted=sum(drafted_steps),
                     accepted=sum(accepted_steps), per_step_drafted=drafted_steps, per_step_accepted=accepted_steps,
                     per_position_drafted=[sum(d > j for d in drafted_steps) for j in range(k)],
                     per_position_accepted=[sum(a > j for a in accepted_steps) for j in range(k)])


@pytest.fixture
def restore_current_version():
    current = serving.current_version()
    yield
    serving.set_version(current)


def test_version_series_age_out(restore_current_version):
    before = {f"age-{i:02d}" for i in range(serving.VERSIONS_KEPT + 3)}
    for v in sorted(before):
        serving.observe_spec(v, _spec([4, 4], [1, 0]))
        serving.set_version(v)
    names = {labels.get("version") for fam in serving.DRAFT_TOKENS.collect() for s in fam.samples
             for labels in [s.labels]}
    kept = sorted(before)[-serving.VERSIONS_KEPT:]
    assert set(kept) <= names and not (set(sorted(before)[:3]) & names)
    current = [s.labels["version"] for fam in serving.DRAFT_VERSION.collect() for s in fam.samples if s.value == 1]
    assert current == [max(before)]


def test_scraped_counts_equal_per_request_usage(live):  # noqa: F811
    engine = live.state.engine
    live.handle.use_draft("random")
    version = engine.draft_version
    before = scrape(live.url)
    usages = []
    for i in range(4):
        r = httpx.post(f"{live.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                       json={"model": engine.model_id, "prompt": f"Metrics {i}: the", "max_tokens": 24,
                             "temperature": 1.0, "seed": i, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    after = scrape(live.url)

    def delta(name, **match):
        return total(after, name, **match) - total(before, name, **match)

    spec = [u["speculative"] for u in usages]
    assert delta("lkserve_spec_draft_tokens_total", version=version) == sum(s["num_draft_tokens"] for s in spec)
    assert delta("lkserve_spec_accepted_tokens_total", version=version) == sum(s["num_accepted_tokens"] for s in spec)
    for p in range(4):  # per position, as the API's per-position acceptance reports it
        accepted_p = sum(s["accepted_per_position"][p] for s in spec)
        assert delta("lkserve_spec_accepted_tokens_total", version=version, position=p) == accepted_p
    assert delta("lkserve_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("lkserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("lkserve_requests_total", finish_reason="length") == 4
    assert delta("lkserve_time_to_first_token_seconds_count") == 4
    assert delta("lkserve_request_duration_seconds_count") == 4
    # every token after a request's first chunk is one gap (the first chunk holds >= 1 token)
    assert 0 < delta("lkserve_inter_token_latency_seconds_count") <= sum(u["completion_tokens"] - 1 for u in usages)
    assert total(after, "lkserve_draft_version_info", version=version) == 1
    # capture counters come from the engine (over RPC): every verified position of these requests was captured
    # (verified positions = accepted ones + one rejected per step that rejected: at least the accepted ones)
    assert delta("lkserve_capture_positions_total") >= sum(s["num_accepted_tokens"] for s in spec)
    assert delta("lkserve_capture_records_total") >= 4
    assert total(after, "lkserve_capture_enabled") == 1


def test_swaps_are_counted_by_result(live, tmp_path):  # noqa: F811
    engine = live.state.engine
    before = scrape(live.url)
    res = live.handle.run(engine.swap_draft(str(tmp_path / "missing"), "never"))
    assert not res.ok
    live.handle.use_draft("target")
    live.handle.use_draft("random")
    after = scrape(live.url)
    assert total(after, "lkserve_draft_swaps_total", result="failed") - total(
        before, "lkserve_draft_swaps_total", result="failed") == 1
    assert total(after, "lkserve_draft_swaps_total", result="ok") - total(
        before, "lkserve_draft_swaps_total", result="ok") == 2
    assert total(after, "lkserve_draft_version_info", version="random") == 1
    assert total(after, "lkserve_draft_version_info", version="target") == 0


def test_serving_version_never_ages_out(restore_current_version):
    serving.set_version("serving-now")
    serving.observe_spec("serving-now", _spec([4], [2]))
    for i in range(serving.VERSIONS_KEPT + 2):
        serving.observe_spec(f"other-{i:02d}", _spec([4], [0]))
    names = {s.labels["version"] for fam in serving.DRAFT_TOKENS.collect() for s in fam.samples}
    assert "serving-now" in names and "other-00" not in names
    current = [s.labels["version"] for fam in serving.DRAFT_VERSION.collect() for s in fam.samples if s.value == 1]
    assert current == ["serving-now"]


def test_recommended_k_follows_live_acceptance(live):  # noqa: F811
    """lkserve_spec_recommended_k / _expected_speedup from real requests: the copy draft (alpha ~1) is worth the
    configured K at this CPU's default step costs, the random draft (alpha ~0) is not worth speculating. The
    gateway prices K as the engine does (engine.step_cost: its measured step times where it has read them)."""
    from lkserve.engine.spec_k import choose_k_from_counts

    engine = live.state.engine
    seen = {}
    for draft in ("target", "random"):
        # a version name of its own: the window then holds only this test's requests
        res = live.handle.run(engine.swap_draft(str(live.handle.drafts[draft]), f"{draft}-kmetrics"))
        assert res.ok, res
        for i in range(6):
            r = httpx.post(f"{live.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                           json={"model": engine.model_id, "prompt": f"K policy {i}: the", "max_tokens": 48,
                                 "temperature": 1.0, "seed": i, "ignore_eos": True})
            assert r.status_code == 200, r.text
        s = scrape(live.url)
        version = f"{draft}-kmetrics"
        k = s[("lkserve_spec_recommended_k", (("version", version),))]
        speedup = s[("lkserve_spec_expected_speedup", (("version", version),))]
        _, drafted, accepted = serving.recent_position_counts(version)
        expect = choose_k_from_counts(drafted, accepted, engine.step_cost, 4, engine.settings.k_min_drafted)
        assert (k, speedup) == (expect.k, pytest.approx(expect.speedup))
        assert s[("lkserve_spec_k", ())] == 4
        seen[draft] = (k, speedup)
    live.handle.use_draft("random")
    print(f"\nrecommended K / expected speedup: {seen}")
    assert seen["target"][0] == 4 and seen["target"][1] > 2
    assert seen["random"][0] == 1 and seen["random"][1] < 1
    # the step costs it prices with, once the engine has read its worker's step times
    cost = live.handle.run(engine.refresh_step_cost())
    s = scrape(live.url)
    gauges = {int(dict(labels)["k"]): v for (name, labels), v in s.items() if name == "lkserve_spec_step_cost_seconds"}
    assert any(k > 0 for k in gauges) and all(0 < v < 1 for v in gauges.values()), gauges
    assert gauges == {k: pytest.approx(ms / 1000) for k, ms in cost.measured.items()}
