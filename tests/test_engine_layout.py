"""`engine.layout` decides where vLLM's worker runs, also for an engine started after one of the other layout in the
same process (VLLM_ENABLE_V1_MULTIPROCESSING is process-wide: lkserve sets it both ways)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import _capture, _settings, prompt_ids

pytestmark = pytest.mark.slow


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_layout_decides_where_the_worker_runs(tiny, engine_loop, nospec_engine):
    from lkserve.engine.engine import Engine
    from lkserve.engine.vllm import sampling_params

    # the session's engines are in_process: the worker runs in the engine core, a child of this process
    worker = nospec_engine.run(nospec_engine.engine.info())["pid"]
    assert nospec_engine.engine.layout == "in_process" and ppid(worker) == os.getpid()

    settings = _settings(tiny, method="none", draft_model=None, layout="multiprocess")
    engine = engine_loop.run(Engine.create(settings, _capture(enabled=False)), timeout=600)  # in_process=None
    try:
        assert engine.layout == "multiprocess"
        info = engine_loop.run(engine.info())
        core = ppid(info["pid"])
        assert core != os.getpid() and ppid(core) == os.getpid()  # worker -> engine core -> this process
        # the RPCs and generation cross the extra boundary: same greedy tokens as the in-process engine
        sp = sampling_params(temperature=0.0, max_tokens=16, ignore_eos=True)
        prompt = prompt_ids(nospec_engine, 1)[0]

        async def tokens(e):
            out = []
            async for ch in e.generate(prompt, sp, f"layout-{id(e)}", capture=False):
                out += ch.token_ids
            return out

        assert engine_loop.run(tokens(engine)) == nospec_engine.run(tokens(nospec_engine.engine))
    finally:
        engine_loop.run(engine.shutdown(), timeout=120)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # set both ways: the next in_process engine resets it
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as conftest left it for the rest of the session
