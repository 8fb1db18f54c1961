"""EAGLE-3 fixtures: tiny heads for the tiny target, the non-speculative reference, and eagle3 engines.

At most one vLLM engine is alive at a time: `eagle3_reference` runs a short-lived non-speculative engine (then shuts
it down) before any eagle3 engine starts, and each eagle3 engine is module-scoped (`start_eagle3_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_engine import EngineHandle, _capture, _settings, _start, _stop

K = 4
AUX_LAYERS = [0, 1, 2]  # the tiny target has 2 layers: embedding output, after layer 1, after layer 2 (pre-norm)
TRUNC_VOCAB = 256  # of 512


@dataclass(frozen=True)
class Eagle3Heads:
    target: Path
    random: Path  # full vocabulary, every weight random (init="random")
    random_b: Path  # another seed (swap tests)
    trunc: Path  # truncated vocabulary (TRUNC_VOCAB ids, d2t/t2d), random init
    root: Path


@pytest.fixture(scope="session")
def eagle3_heads(tiny, tmp_path_factory):
    from lkserve.models.eagle3 import build_eagle3_head

    root = tmp_path_factory.mktemp("eagle3-heads")
    kw = {"aux_layer_ids": AUX_LAYERS, "num_speculative_tokens": K, "init": "random"}
    return Eagle3Heads(
        target=tiny.target,
        random=build_eagle3_head(tiny.target, root / "head-random", seed=0, **kw),
        random_b=build_eagle3_head(tiny.target, root / "head-random-b", seed=1, **kw),
        trunc=build_eagle3_head(tiny.target, root / "head-trunc", seed=0, draft_vocab_size=TRUNC_VOCAB, **kw),
        root=root,
    )


_CORPUS_IDS: dict = {}


def corpus_prompts(tokenizer, n: int, offset: int = 0, length: int = 24) -> list[list[int]]:
    """n distinct prompts of `length` tokens cut from stdlib text (the tiny tokenizer's corpus); prompt i starts
    at token (offset + i) * 2 * length (prompts with distinct offsets never overlap)."""
    from lkserve.models.tiny import _corpus_text

    if "ids" not in _CORPUS_IDS:
        _CORPUS_IDS["ids"] = tokenizer(_corpus_text())["input_ids"]
    ids = _CORPUS_IDS["ids"]
    out = []
    for i in range(n):
        a = ((offset + i) * 2 * length) % (len(ids) - length)
        out.append(ids[a: a + length])
    return out


def eagle3_settings(tiny, head: Path, **kw):
    base = {"method": "eagle3", "draft_model": str(head), "num_speculative_tokens": K}
    base.update(kw)
    return _settings(tiny, **base)


def eagle3_capture(**kw):
    base = {"hidden_states": True, "hidden_dtype": "fp16", "max_positions_per_record": 64}
    base.update(kw)
    return _capture(**base)


@pytest.fixture(scope="session")
def eagle3_reference(tiny, engine_loop):
    """Greedy outputs of the target without speculation, for the prompts of `reference_prompts` (engine stopped
    before returning, so no two engines ever run together)."""
    from vllm import SamplingParams

    engine = _start(engine_loop, _settings(tiny, method="none", draft_model=None), _capture(enabled=False))
    handle = EngineHandle(engine, engine_loop)
    try:
        prompts = corpus_prompts(engine.tokenizer, 6, offset=500)
        sp = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
        outs = handle.generate_many([(p, sp) for p in prompts])
        return {"prompts": prompts, "tokens": [o.token_ids for o in outs], "max_tokens": 48}
    finally:
        _stop(engine_loop, engine)


def start_eagle3_engine(tiny, engine_loop, head: Path, version: str, **capture_kw) -> EngineHandle:
    engine = _start(engine_loop, eagle3_settings(tiny, head), eagle3_capture(**capture_kw), draft_version=version)
    return EngineHandle(engine, engine_loop)
