"""Draft hot-swap: between steps, under load, validated first, never breaking the engine."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lkserve.checkpoint import checkpoint_sha256
from tests.conftest import K, prompt_ids

pytestmark = pytest.mark.slow


def _sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


@pytest.mark.parametrize("recompute_running", [False, True])
def test_swap_under_concurrent_requests(spec_engine, nospec_engine, recompute_running):
    """Random draft (acceptance ~0) -> the target's weights, swapped while 6 greedy requests stream: none fails,
    outputs stay exactly the non-speculative ones, requests started after the swap accept everything. Running
    requests keep the draft KV the old weights computed for their prefix, unless recompute_running=True re-prefills
    them, after which they accept everything too."""
    spec_engine.use_draft("random")
    engine = spec_engine.engine
    spec_engine.drain()
    prompts = prompt_ids(spec_engine, 6)
    n_tokens = 96
    sp = _sp(temperature=0.0, max_tokens=n_tokens)
    reference = nospec_engine.generate_many([(p, sp) for p in prompts])
    tag = f"swap-live-{int(recompute_running)}-"

    async def scenario():
        progress = [0] * len(prompts)

        async def stream(i):
            toks, last = [], None
            async for ch in engine.generate(prompts[i], sp, f"{tag}{i}"):
                toks += ch.token_ids
                progress[i] = len(toks)
                last = ch
            return toks, last

        tasks = [asyncio.create_task(stream(i)) for i in range(len(prompts))]
        while min(progress) < 16:  # every request is well under way with the random draft
            await asyncio.sleep(0.01)
        at_swap = list(progress)
        res = await engine.swap_draft(str(spec_engine.drafts["target"]), "target",
                                      recompute_running=recompute_running)
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        return at_swap, res, outs

    at_swap, res, outs = spec_engine.run(scenario())
    print(f"\nswap under load (recompute_running={recompute_running}): ok={res.ok} seconds={res.seconds:.3f} "
          f"(validate {res.validate_seconds:.3f}, apply {res.apply_seconds:.3f}); tokens per request at swap {at_swap}")
    assert res.ok, res.reason
    assert engine.draft_version == "target" and engine.draft_sha256 == res.sha256
    assert all(not isinstance(o, BaseException) for o in outs), outs
    for (toks, last), ref in zip(outs, reference):
        assert last.finish_reason == "length"
        assert toks == ref.token_ids  # lossless across the swap
        acc = last.spec.per_step_accepted
        assert sum(acc[:2]) <= 2  # before the swap: the random draft
        if recompute_running:
            assert acc[-3:] == [K] * 3  # re-prefilled with the new draft: everything accepted
    # records never mix versions
    recs = [r for r in spec_engine.drain() if r.request_id.startswith(tag)]
    by_version = {v: [r for r in recs if r.draft_version == v] for v in ("random", "target")}
    assert by_version["random"] and by_version["target"]
    rate = {v: float(np.concatenate([r.accepted for r in rs]).mean()) for v, rs in by_version.items()}
    print(f"captured acceptance of the running requests by draft version: {rate}")
    assert rate["random"] < 0.2
    if recompute_running:
        assert rate["target"] > 0.9
    # requests submitted after the swap run at full acceptance, same prompts included
    fresh = spec_engine.generate_many([(p, _sp(temperature=0.0, max_tokens=32)) for p in prompts[:3]])
    assert all(f.spec.accepted == f.spec.drafted for f in fresh)


def test_prefix_cache_is_salted_with_the_draft_version(spec_engine):
    """The draft's KV shares prefix-cached blocks with the target's. A request after a swap that hit blocks cached
    under the old draft would draft from stale KV; the per-version salt prevents it."""
    engine = spec_engine.engine
    long_prompt = [t for p in prompt_ids(spec_engine, 8) for t in p]
    while len(long_prompt) < 300:
        long_prompt = long_prompt * 2
    long_prompt = long_prompt[:300]
    sp = _sp(temperature=0.0, max_tokens=24)
    rates = {}
    try:
        for salted in (False, True):
            engine._salt_prefix_cache = salted
            spec_engine.use_draft("random")
            spec_engine.generate(long_prompt + [7 + int(salted)], sp)  # caches the prompt's blocks under the random draft
            spec_engine.use_draft("target")
            r = spec_engine.generate(long_prompt + [7 + int(salted)], sp)
            rates[salted] = r.spec.accepted / r.spec.drafted
    finally:
        engine._salt_prefix_cache = True
    print(f"\nacceptance after swap on a prefix cached under the old draft: unsalted {rates[False]:.2f}, "
          f"salted {rates[True]:.2f}")
    assert rates[True] == 1.0
    assert rates[False] < 0.9  # shows the stale-KV effect the salt removes


def _probe(handle):
    """Greedy output + acceptance on fixed prompts: identical before and after a refused swap."""
    prompts = prompt_ids(handle, 2)
    res = handle.generate_many([(p, _sp(temperature=0.0, max_tokens=24)) for p in prompts])
    return [(r.token_ids, r.spec.per_step_accepted) for r in res]


def _corrupt_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    mutate(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_corrupt_checkpoints_are_refused_and_old_draft_keeps_serving(spec_engine, tiny, tmp_path):
    spec_engine.use_draft("random")
    engine = spec_engine.engine
    version, sha = engine.draft_version, engine.draft_sha256
    before = _probe(spec_engine)
    name = "model.layers.0.mlp.down_proj.weight"

    def nan(sd):
        sd[name] = sd[name].clone()
        sd[name][0, 0] = float("nan")

    def inf(sd):
        sd["model.norm.weight"] = sd["model.norm.weight"].clone()
        sd["model.norm.weight"][3] = float("inf")

    def shape(sd):
        sd[name] = sd[name][:, :-8].contiguous()

    def missing(sd):
        del sd["model.layers.1.self_attn.o_proj.weight"]

    def dtype(sd):  # an integer tensor where a float one belongs: not a draft checkpoint
        sd[name] = sd[name].to(torch.int32)

    cases = {
        "nan": (_corrupt_copy(tiny.copy_draft, tmp_path / "nan", nan), None, "non-finite"),
        "inf": (_corrupt_copy(tiny.copy_draft, tmp_path / "inf", inf), None, "non-finite"),
        "shape": (_corrupt_copy(tiny.copy_draft, tmp_path / "shape", shape), None, "shape mismatch"),
        "missing": (_corrupt_copy(tiny.copy_draft, tmp_path / "missing", missing), None, "tensor names differ"),
        "dtype": (_corrupt_copy(tiny.copy_draft, tmp_path / "dtype", dtype), None, "dtype mismatch"),
        "sha": (tiny.copy_draft, "0" * 64, "sha256 mismatch"),
        "absent": (tmp_path / "does-not-exist", None, "not a directory"),
    }
    for case, (path, want_sha, reason) in cases.items():
        res = spec_engine.run(engine.swap_draft(str(path), f"bad-{case}", sha256=want_sha))
        assert not res.ok, case
        assert reason in res.reason, (case, res.reason)
        assert res.version == version and engine.draft_version == version and engine.draft_sha256 == sha
    info = spec_engine.run(engine.draft_info())
    assert info["version"] == version and info["sha256"] == sha
    assert _probe(spec_engine) == before  # same outputs, same acceptance: the old weights are serving

    # the right checksum is accepted; then back to the random draft
    good_sha = checkpoint_sha256(tiny.copy_draft)
    res = spec_engine.run(engine.swap_draft(str(tiny.copy_draft), "target", sha256=good_sha))
    assert res.ok and res.sha256 == good_sha
    spec_engine.use_draft("random")
    assert _probe(spec_engine) == before


def test_swap_casts_a_checkpoint_stored_in_another_float_dtype(spec_engine, tiny, tmp_path):
    """The live tiny draft is fp32; a bf16 copy of the target's weights (as a trainer publishing in the serving
    dtype of a bf16 model would write) is cast on load and serves: acceptance jumps from the random draft's ~0 to
    most drafts at T=0 (not all: bf16 rounding flips near-tied argmaxes of a random-init target)."""
    spec_engine.use_draft("random")
    engine = spec_engine.engine
    prompts = prompt_ids(spec_engine, 3)

    def rate():
        out = spec_engine.generate_many([(p, _sp(temperature=0.0, max_tokens=32)) for p in prompts])
        return sum(o.spec.accepted for o in out) / sum(o.spec.drafted for o in out)

    random_rate = rate()

    def to_bf16(sd):
        for k in sd:
            sd[k] = sd[k].to(torch.bfloat16)

    path = _corrupt_copy(tiny.copy_draft, tmp_path / "bf16", to_bf16)
    try:
        res = spec_engine.run(engine.swap_draft(str(path), "target-bf16"))
        assert res.ok, res.reason
        bf16_rate = rate()
        print(f"\nbf16 checkpoint swapped into an fp32 draft: acceptance {bf16_rate:.3f} (random draft {random_rate:.3f})")
        assert random_rate < 0.2 and bf16_rate > 0.6
    finally:
        spec_engine.use_draft("random")


def test_swap_on_engine_without_draft_is_refused(nospec_engine, tiny):
    res = nospec_engine.run(nospec_engine.engine.swap_draft(str(tiny.copy_draft), "v"))
    assert not res.ok and "no draft model" in res.reason
