"""`lkserve draft bootstrap` on the tiny models: the target's own generations through the real engine (capture on),
the worker's trainer, the worker's registry."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import pytest

from lkserve.trainer import bootstrap


def test_prompt_sources_avoid_reserved_domains():
    """Only the MT-bench and HumanEval wheels feed the bootstrap; the stdlib and Debian metadata are reserved."""
    tree = ast.parse(inspect.getsource(bootstrap))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"sysconfig", "lkserve.models.tiny", "lkserve.models.eagle3_head", "glob", "pathlib"}
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    for bad in ("/usr/lib/python", "/usr/share/doc", "/var/lib/dpkg", "python3.11/"):
        assert not any(bad in s for s in strings), bad
    keys = [k for k, _ in bootstrap.prompt_texts()]
    assert keys and all(k.startswith(("mtbench/", "HumanEval/")) for k in keys)


def test_heldout_split_is_stable_and_disjoint():
    prompts = bootstrap.prompt_texts()
    train, held = bootstrap.split_prompts(prompts, 0.2, seed=0)
    assert {k for k, _ in train}.isdisjoint({k for k, _ in held})
    assert len(train) + len(held) == len(prompts)
    assert 0.1 < len(held) / len(prompts) < 0.3
    assert bootstrap.split_prompts(prompts[:50], 0.2, seed=0)[1] == [p for p in held if p in prompts[:50]]


@pytest.mark.timeout(900)
def test_bootstrap_raises_heldout_alpha_and_registers(spec_engine, tiny, redis_url, tmp_path):
    from lkserve.checkpoint import WEIGHTS_FILE, sha256_file
    from lkserve.config import RedisSettings, Settings, TrainerSettings
    from lkserve.drafts import DraftRegistry
    from tests.conftest import _settings

    spec_engine.use_draft("random")
    train_r, held_r, _ = spec_engine.run(bootstrap.capture_split(
        spec_engine.engine, max_prompts=120, max_tokens=64, max_prompt_tokens=64, temperature=1.0, seed=0),
        timeout=600)
    assert train_r and held_r
    assert not {r.request_id for r in train_r} & {r.request_id for r in held_r}
    settings = Settings(cache_dir=tmp_path / "cache", redis=RedisSettings(url=redis_url, key_prefix="boot"),
                        engine=_settings(tiny),
                        trainer=TrainerSettings(base_version="random", train_params="all", threads=1, lr=1e-2,
                                                batch_positions=256, eval_every_steps=5, metrics_port=None))
    registry = DraftRegistry(redis_url, "boot")
    lines = []
    res = bootstrap.bootstrap_records(settings, registry, train_r, held_r, max_positions=10 * sum(
        r.num_positions for r in train_r), seed=0, progress=lambda *a: lines.append(a))
    print(json.dumps({"before": res.before["alpha_mean"], "after": res.after["alpha_mean"],
                      "tau_before": res.before["tau"], "tau_after": res.after["tau"], "steps": res.steps,
                      "rows": res.after["rows"], "train_seconds": round(res.train_seconds, 1)}))
    assert lines and res.steps >= 5
    assert res.after["rows"] >= 200
    # stated margin (as the closed loop's): held-out alpha x1.5 and +0.02 absolute over the untrained random draft,
    # on >= 200 held-out positions of prompts never trained on (per-row alpha sd ~0.1: +0.02 is several SEs; measured 0.036 -> 0.071 on 1,446 rows)
    b, a = res.before["alpha_mean"], res.after["alpha_mean"]
    assert a >= 1.5 * b and a >= b + 0.02, (res.before, res.after)
    meta = registry.get(res.version)
    assert meta is not None and registry.current() == res.version
    path = Path(meta["path"])
    assert meta["sha256"] == sha256_file(path / WEIGHTS_FILE)
    assert (path / "config.json").is_file()
    assert json.loads((path / "config.json").read_text()).get("torch_dtype", json.loads(
        (Path(tiny.random_draft) / "config.json").read_text()).get("torch_dtype")) == json.loads(
        (Path(tiny.random_draft) / "config.json").read_text()).get("torch_dtype")
    # the engine serves it (what the gateway's subscriber does on the announcement)
    swap = spec_engine.run(spec_engine.engine.swap_draft(meta["path"], res.version, meta["sha256"]))
    assert swap.ok, swap
    spec_engine.use_draft("random")


def test_draft_vocab_from_records_follows_target_mass():
    import numpy as np

    from lkserve.capture.synthetic import random_record

    rng = np.random.default_rng(0)
    recs = [random_record(rng, num_positions=8, k=4, context_len=32, vocab_size=1000) for _ in range(50)]
    hot = 777
    for r in recs[:40]:  # id 777 carries most of the target's mass on 40 records
        r.topk_ids[:, 0] = hot
        r.topk_probs[:, 0] = 0.9
    ids = bootstrap.draft_vocab_from_records(recs, 1000, 16, always=(3,))
    assert ids.numel() == 16 and bool((ids[1:] > ids[:-1]).all())
    assert hot in ids.tolist() and 3 in ids.tolist()
    # only ids the data gave mass to (plus the forced one)
    seen = {int(i) for r in recs for i in np.asarray(r.topk_ids).ravel()}
    assert set(ids.tolist()) <= seen | {3}
