"""The opt-in step timing (LKSERVE_STEP_TIMING=1, lkserve/engine/vllm/timing.py) that bench/step_cost.py reads:
on, a speculative engine reports nonzero drafting / verification / sampling times per step through lkserve_info;
off (the default), nothing is wrapped."""

from __future__ import annotations

import pytest

from tests.conftest import _capture, _env, _settings, _start, _stop, prompt_ids


@pytest.fixture(scope="module")
def timed_engine(tiny, engine_loop):
    from tests.conftest import EngineHandle

    # read by the worker extension in the engine-core process spawned here
    with _env(LKSERVE_STEP_TIMING="1"):
        engine = _start(engine_loop, _settings(tiny), _capture(), draft_version="random")
    yield EngineHandle(engine, engine_loop)
    _stop(engine_loop, engine)


def test_off_by_default_nothing_installed(spec_engine):
    info = spec_engine.run(spec_engine.engine.info())
    assert info["step_timing"] is None


def test_on_reports_parts_of_spec_steps(timed_engine):
    from lkserve.engine.vllm import sampling_params

    h = timed_engine
    before = h.run(h.engine.info())["step_timing"]
    sp = sampling_params(temperature=0.0, max_tokens=24, ignore_eos=True)
    h.generate_many([(p, sp) for p in prompt_ids(h, 3)])
    after = h.run(h.engine.info())["step_timing"]
    sec = {k: after["seconds"].get(k, 0.0) - before["seconds"].get(k, 0.0) for k in after["seconds"]}
    calls = {k: after["calls"].get(k, 0) - before["calls"].get(k, 0) for k in after["calls"]}

    steps = calls["target_forward"]  # worker steps that ran the target (an empty one, e.g. only finished requests, did not)
    assert steps >= 24 // 5  # at most K + 1 = 5 tokens a step
    assert steps <= calls["execute_model"] <= steps + 3, calls
    for part in ("drafting", "draft_forward", "draft_logits", "target_forward", "target_logits", "sampling",
                 "sample_tokens"):
        assert sec[part] > 0, (part, sec)
    # every decode step verifies and drafts; the draft model runs about K passes per drafting call
    assert calls["drafting"] >= steps - 1
    assert 3 <= calls["draft_forward"] / calls["drafting"] <= 5, calls
    # the parts lie inside the worker's two step halves
    worker = sec["execute_model"] + sec["sample_tokens"]
    inner = sec["drafting"] + sec["target_forward"] + sec["target_logits"] + sec["sampling"]
    assert inner <= worker, (inner, worker)
    assert sec["draft_forward"] + sec["draft_logits"] <= sec["drafting"]
