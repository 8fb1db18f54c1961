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


def test_prompt_domains_select_the_sets_and_keep_each_prompts_side():
    """The demo bootstraps on the chat prompts only (its HumanEval phase is then a domain the draft never saw): a
    domain's prompts are exactly its keys, on the same side of the held-out split as with both domains."""
    both_train, both_held = bootstrap.bootstrap_prompts(0.2, None, seed=0)
    train, held = bootstrap.bootstrap_prompts(0.2, None, seed=0, domains=("mtbench",))
    assert train and held and all(k.startswith("mtbench/") for k, _ in train + held)
    assert train == [p for p in both_train if p[0].startswith("mtbench/")]
    assert held == [p for p in both_held if p[0].startswith("mtbench/")]
    code = bootstrap.prompt_texts(("humaneval",))
    assert code and all(k.startswith("HumanEval/") for k, _ in code)
    assert len(code) + len(train) + len(held) == len(bootstrap.prompt_texts())
    for bad in ((), ("stdlib",)):
        with pytest.raises(ValueError):
            bootstrap.prompt_texts(bad)


CAPTURE = {"max_prompts": 120, "max_tokens": 64, "max_prompt_tokens": 64, "temperature": 1.0}


@pytest.fixture(scope="module")
def boot_records(spec_engine):
    """(train, held-out, seconds): the bootstrap prompts served by the tiny target with the random draft."""
    spec_engine.use_draft("random")
    return spec_engine.run(bootstrap.capture_split(spec_engine.engine, seed=0, **CAPTURE), timeout=600)


def _boot_settings(tiny, redis_url, cache, prefix: str, **engine_kw):
    from lkserve.config import RedisSettings, Settings, TrainerSettings
    from tests.conftest import _settings

    return Settings(cache_dir=cache, redis=RedisSettings(url=redis_url, key_prefix=prefix),
                    engine=_settings(tiny, **engine_kw),
                    trainer=TrainerSettings(base_version="random", train_params="all", threads=1, lr=1e-2,
                                            batch_positions=256, eval_every_steps=5, metrics_port=None))


def _fresh_prefix(redis_url, prefix: str) -> str:
    import redis

    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(f"{prefix}:*"):
        r.delete(key)
    r.close()
    return prefix


def _served_acceptance(handle, prompts, max_tokens: int = 64) -> tuple[float, int, set]:
    """(accepted / verified drafted positions, positions, draft versions) of `prompts` served by `handle` at T=1,
    from the engine's own capture records."""
    import numpy as np
    from vllm import SamplingParams

    handle.drain()
    handle.generate_many([(p, SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True))
                          for p in prompts])
    records = handle.drain()
    acc = np.concatenate([np.asarray(r.accepted, dtype=bool) for r in records])
    return float(acc.mean()), int(acc.size), {r.draft_version for r in records}


@pytest.mark.timeout(900)
def test_bootstrap_raises_heldout_alpha_and_registers(spec_engine, tiny, redis_url, tmp_path, boot_records,
                                                      engine_loop):
    """Held-out alpha rises; the version is registered and served, by a hot swap and by a FRESH engine started
    from the registry's path (what `lkserve serve` does with a bootstrapped draft), whose own capture shows the
    bootstrapped draft accepted more often than the random one on held-out prompts."""
    from lkserve.checkpoint import WEIGHTS_FILE, sha256_file
    from lkserve.drafts import DraftRegistry
    from tests.conftest import EngineHandle, _capture, _settings, _start, _stop

    spec_engine.use_draft("random")
    train_r, held_r, _ = boot_records
    assert train_r and held_r
    assert not {r.request_id for r in train_r} & {r.request_id for r in held_r}
    settings = _boot_settings(tiny, redis_url, tmp_path / "cache", _fresh_prefix(redis_url, "boot"))
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

    # a fresh engine started on the registry's current version, on held-out prompts never trained on
    _, held_p = bootstrap.split_prompts(bootstrap.prompt_texts(), 0.2, seed=0)
    tok = spec_engine.engine.tokenizer
    prompts = [bootstrap.encode(tok, t, CAPTURE["max_prompt_tokens"]) for _, t in held_p[:48]]
    current = registry.get(registry.current())
    engine = _start(engine_loop, _settings(tiny, draft_model=current["path"]), _capture(),
                    draft_version=registry.current())
    try:
        fresh = EngineHandle(engine, engine_loop)
        assert fresh.engine.draft_version == res.version
        boot_acc, boot_n, versions = _served_acceptance(fresh, prompts)
    finally:
        _stop(engine_loop, engine)
    rand_acc, rand_n, rand_versions = _served_acceptance(spec_engine, prompts)
    print(json.dumps({"served_acceptance_bootstrapped": boot_acc, "positions": boot_n,
                      "served_acceptance_random": rand_acc, "positions_random": rand_n}))
    assert versions == {res.version} and rand_versions == {"random"}
    assert boot_n >= 500 and rand_n >= 500
    # stated margin: x1.3 the random draft's served acceptance (binomial SE at ~1,000 positions and p ~0.1 is
    # ~0.01, so the margin is several SEs)
    assert boot_acc >= 1.3 * rand_acc and boot_acc >= rand_acc + 0.02, (boot_acc, rand_acc)


def _train_positions(records) -> int:
    return sum(r.num_positions for r in records)


def test_offline_bootstrap_takes_the_cpus_and_native_bf16_the_online_worker_does_not():
    """The offline bootstrap (nothing serves beside it) trains on every CPU this process may use, in bf16 where the
    CPU has it natively; explicit bootstrap knobs win; the online worker's own threads/precision are left alone."""
    import os

    from lkserve.config import Settings, TrainerSettings
    from lkserve.trainer.train import native_bf16

    settings = Settings(trainer=TrainerSettings(threads=1, precision="fp32"))
    cpus = os.sched_getaffinity(0)
    off = bootstrap.offline_settings(settings).trainer
    assert (off.threads, off.precision) == (len(cpus), "bf16" if native_bf16() else "fp32")
    assert (settings.trainer.threads, settings.trainer.precision) == (1, "fp32")
    try:
        os.sched_setaffinity(0, {min(cpus)})  # a process allowed one CPU trains on one thread
        assert bootstrap.offline_settings(settings).trainer.threads == 1
    finally:
        os.sched_setaffinity(0, cpus)
    for precision in ("fp32", "bf16"):
        pinned = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={
            "bootstrap_threads": 3, "bootstrap_precision": precision})})
        assert (bootstrap.offline_settings(pinned).trainer.threads,
                bootstrap.offline_settings(pinned).trainer.precision) == (3, precision)


def test_training_evaluations_use_a_strided_heldout_sample():
    """The in-training evaluations take every n-th held-out record (both domains, about the asked positions); the
    whole split when it is small or no sample is asked."""
    from types import SimpleNamespace

    recs = [SimpleNamespace(num_positions=100, domain="chat" if i < 30 else "code") for i in range(40)]
    sample = bootstrap.eval_sample(recs, 1000)
    assert sample == recs[::4] and sum(r.num_positions for r in sample) == 1000
    assert {r.domain for r in sample} == {"chat", "code"}
    assert bootstrap.eval_sample(recs, None) is recs and bootstrap.eval_sample(recs, 4000) is recs
    assert len(bootstrap.eval_sample(recs, 1500)) == 14  # every 3rd: 1,400 positions


def test_records_are_saved_once_and_reused(boot_records, tmp_path):
    """The state directory keeps the captured records (lkserve.capture.codec): a rerun captures nothing; other
    capture settings or --fresh capture again."""
    from tests.test_capture_codec import assert_same_record

    train_r, held_r, _ = boot_records
    state = bootstrap.BootstrapState(tmp_path / "state")
    calls = []

    def capture():
        calls.append(1)
        return train_r, held_r, 1.5

    meta = {"prompts": "mtbench+humaneval", **CAPTURE}
    first = bootstrap.records_for(state, capture, meta)
    again = bootstrap.records_for(state, lambda: pytest.fail("captured again"), meta)
    assert calls == [1] and again[2] == 0.0
    assert len(again[0]) == len(train_r) and len(again[1]) == len(held_r)
    for a, b in zip([*again[0], *again[1]], [*train_r, *held_r]):
        assert_same_record(a, b)
    assert first[0] is train_r
    with pytest.raises(ValueError, match="fresh"):
        bootstrap.records_for(state, capture, {**meta, "max_tokens": 32})
    state.discard()
    bootstrap.records_for(state, capture, meta)
    assert calls == [1, 1]


@pytest.mark.timeout(1200)
def test_bootstrap_resumes_from_its_state(tiny, redis_url, tmp_path, boot_records):
    """To N positions in one go == to N/2, stop, rerun to N == interrupted (Ctrl-C) after 7 steps, rerun to N:
    the reruns continue from the saved step and positions (they run only the remaining steps) and, on this
    deterministic CPU (one thread, same seed, the pass's shuffle replayed), end with the SAME held-out alpha."""
    from lkserve.drafts import DraftRegistry

    train_r, held_r, _ = boot_records
    n = 3 * _train_positions(train_r)
    settings = _boot_settings(tiny, redis_url, tmp_path / "cache", _fresh_prefix(redis_url, "bootres"))
    registry = DraftRegistry(redis_url, "bootres")

    def run(state: str, budget: int, progress=lambda *a: None):
        return bootstrap.bootstrap_records(settings, registry, train_r, held_r, max_positions=budget, seed=0,
                                           state_dir=tmp_path / state, progress=progress)

    full = run("full", n)
    half = run("resume", n // 2)
    saved = bootstrap.BootstrapState(tmp_path / "resume").load_training()
    assert 0 < half.steps < full.steps and saved["trainer"]["step"] == half.steps
    assert saved["loop"]["positions"] == half.positions_trained >= n // 2
    steps_run = []
    resumed = run("resume", n, progress=lambda step, *a: steps_run.append(step))
    assert (resumed.resumed_step, resumed.resumed_positions) == (half.steps, half.positions_trained)
    assert steps_run == list(range(half.steps + 1, full.steps + 1))  # only the remaining steps ran
    assert (resumed.steps, resumed.positions_trained) == (full.steps, full.positions_trained)
    assert resumed.before == full.before  # the untrained draft's alpha, kept from the first run

    def stop_at(k):
        def progress(step, *a):
            if step >= k:
                raise KeyboardInterrupt

        return progress

    versions = len(registry.versions())
    with pytest.raises(KeyboardInterrupt):
        run("interrupted", n, progress=stop_at(7))
    assert len(registry.versions()) == versions  # an interrupted run publishes nothing
    assert bootstrap.BootstrapState(tmp_path / "interrupted").load_training()["trainer"]["step"] == 7
    after_ctrl_c = run("interrupted", n)
    assert after_ctrl_c.resumed_step == 7 and after_ctrl_c.steps == full.steps
    print(json.dumps({"full": [full.steps, full.positions_trained, full.after["alpha_mean"]],
                      "half": [half.steps, half.positions_trained, half.after["alpha_mean"]],
                      "resumed": [resumed.resumed_step, resumed.steps, resumed.after["alpha_mean"]],
                      "interrupted": [after_ctrl_c.resumed_step, after_ctrl_c.steps, after_ctrl_c.after["alpha_mean"]],
                      "before": full.before["alpha_mean"]}))
    assert full.after["alpha_mean"] > full.before["alpha_mean"] + 0.01  # it trained at all
    for res in (resumed, after_ctrl_c):
        assert [(h["step"], h["positions"]) for h in res.history] == [(h["step"], h["positions"]) for h in full.history]
        assert abs(res.after["alpha_mean"] - full.after["alpha_mean"]) < 1e-9, (res.after, full.after)
    # a state made with other settings is refused, not silently mixed
    other = settings.model_copy(update={"trainer": settings.trainer.model_copy(update={"lr": 3e-3})})
    with pytest.raises(ValueError, match="fresh"):
        bootstrap.bootstrap_records(other, registry, train_r, held_r, max_positions=n, state_dir=tmp_path / "full")


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


# ------------------------------------------------------------------------------------------------ EAGLE-3 vocabulary
_OPENED: list | None = None  # paths opened while a test records them (an audit hook cannot be removed)


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(args[0]))


def _opened_by(fn):
    """(fn(), every path Python opened while it ran: builtins.open, io.open, os.open, imports; PEP 578 audit
    events, so nothing in the code under test can read a file past it)."""
    import sys

    global _OPENED
    if not getattr(_opened_by, "hooked", False):
        sys.addaudithook(_audit)
        _opened_by.hooked = True
    _OPENED = []
    try:
        out = fn()
        return out, list(_OPENED)
    finally:
        _OPENED = None


def _reserved(path: str) -> bool:
    import sysconfig

    stdlib = str(Path(sysconfig.get_paths()["stdlib"]).resolve())
    p = str(Path(path).resolve())
    return p.startswith((stdlib + "/", "/usr/share/doc", "/var/lib/dpkg", "/usr/share/common-licenses"))


def test_default_real_target_vocabulary_reads_no_reserved_domain(tmp_path):
    """A real target's new head counts its truncated vocabulary on the MT-bench + HumanEval prompts, never on the
    stdlib (the old default) or Debian metadata; the tiny test tokenizer (vocab <= 512) keeps its stdlib corpus,
    which is also the recorder's positive control."""
    import json as json_

    from lkserve import prompts
    from lkserve.models import eagle3
    from lkserve.models.tiny import _save_tokenizer, train_tokenizer

    def target(name: str, vocab: int) -> Path:
        d = tmp_path / name
        d.mkdir()
        _save_tokenizer(train_tokenizer(vocab), d)  # the tokenizer alone is what the vocabulary needs
        (d / "config.json").write_text(json_.dumps({"vocab_size": vocab}))
        return d

    real, tiny_t = target("real", 1024), target("tiny", 512)
    eagle3.frequent_token_ids(tiny_t, 8)  # imports done: what follows records only the data the call reads
    for fn in (prompts._mtbench, prompts._humaneval):
        fn.cache_clear()
    (ids, source), opened = _opened_by(lambda: (eagle3.frequent_token_ids(real, 256), eagle3.default_vocab_text(real)[1]))
    assert source == "mtbench+humaneval prompts" and ids.numel() == 256
    assert not [p for p in opened if _reserved(p)], opened
    assert any(p.endswith("question.jsonl") for p in opened) and any(p.endswith("HumanEval.jsonl.gz") for p in opened)
    _, opened_tiny = _opened_by(lambda: eagle3.frequent_token_ids(tiny_t, 64))
    assert any(_reserved(p) and p.endswith("textwrap.py") for p in opened_tiny), opened_tiny  # the control
    # the head builder records where its vocabulary came from (what a bootstrap reads to rebuild it)
    tree = ast.parse(inspect.getsource(eagle3.default_vocab_text))
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not any(b in s for s in strings for b in ("/usr/lib/python", "/usr/share/doc", "/var/lib/dpkg"))


def _hot_records(rng, n: int, hot: list[int], hidden_dim: int):
    """Synthetic EAGLE-3 records (lkserve.capture.synthetic) whose top target id is one of `hot` at every
    position: those ids carry most of the target's mass."""
    import numpy as np

    from lkserve.capture.synthetic import random_record

    recs = []
    for i in range(n):
        r = random_record(rng, num_positions=12, k=8, context_len=40, vocab_size=512, hidden_dim=hidden_dim,
                          hidden_dtype="fp16", request_id=f"hot-{i}")
        for row in r.topk_ids:
            h = hot[int(rng.integers(len(hot)))]
            row[row == h] = row[0]  # keep the row's ids distinct
            row[0] = h
        r.topk_probs[:, 0] = np.float16(0.9)
        recs.append(r)
    return recs


@pytest.mark.timeout(300)
def test_bootstrap_rebuilds_a_new_heads_vocabulary_from_its_records(tiny, redis_url, tmp_path):
    """A new truncated head (build_eagle3_head) is rebuilt on the ids with the most target mass in the bootstrap
    records (ids its tiny-corpus vocabulary lacked), trained, published with that vocabulary and its source; a
    trained head (the published version) keeps its vocabulary."""
    import numpy as np
    import torch

    from lkserve.drafts import DraftRegistry
    from lkserve.models.eagle3 import build_eagle3_head, load_head, new_head_info, special_ids
    from tests.conftest import AUX_LAYERS, K

    head_dir = build_eagle3_head(tiny.target, tmp_path / "head", seed=0, draft_vocab_size=256,
                                 aux_layer_ids=AUX_LAYERS, num_speculative_tokens=K, init="random")
    assert new_head_info(head_dir)["vocab_source"] == "tiny test corpus"
    old = set((load_head(head_dir, tiny.target).d2t_map).tolist())
    hot = sorted(set(range(3, 512)) - old)[:40]
    assert len(hot) == 40
    rng = np.random.default_rng(0)
    train_r, held_r = _hot_records(rng, 40, hot, 3 * 128), _hot_records(rng, 10, hot, 3 * 128)
    settings = _boot_settings(tiny, redis_url, tmp_path / "cache", _fresh_prefix(redis_url, "bootvocab"),
                              method="eagle3", draft_model=str(head_dir))
    registry = DraftRegistry(redis_url, "bootvocab")
    res = bootstrap.bootstrap_records(settings, registry, train_r, held_r, max_positions=400, seed=0,
                                      state_dir=tmp_path / "state", progress=lambda *a: None)
    assert res.vocab["source"].startswith("bootstrap records") and res.vocab["replaced"] == "tiny test corpus"
    meta = registry.get(res.version)
    assert meta["draft_vocab"]["source"] == res.vocab["source"]
    served = load_head(meta["path"], tiny.target).d2t_map
    expected = bootstrap.draft_vocab_from_records(train_r, 512, 256, always=special_ids(tiny.target))
    assert torch.equal(served, expected)
    assert set(hot) <= set(served.tolist()) and not set(hot) & old
    assert set(special_ids(tiny.target)) <= set(served.tolist())
    # rerun with the same state: the rebuilt head is reused (not rebuilt from the base), training continues
    resumed = bootstrap.bootstrap_records(settings, registry, train_r, held_r, max_positions=800, seed=0,
                                          state_dir=tmp_path / "state", progress=lambda *a: None)
    assert resumed.resumed_step == res.steps > 0 and resumed.steps > res.steps
    assert resumed.vocab == res.vocab
    assert torch.equal(load_head(registry.get(resumed.version)["path"], tiny.target).d2t_map, expected)
    # the published version is a trained head: no rebuild, its own vocabulary is kept
    again = bootstrap.bootstrap_records(settings.model_copy(update={"engine": settings.engine.model_copy(
        update={"draft_model": meta["path"]})}), registry, train_r, held_r, max_positions=100, seed=0,
        progress=lambda *a: None)
    assert again.vocab["source"] == "the base head's own (trained) vocabulary"
    assert not list((tmp_path / "cache").glob(".bootstrap-head-*"))  # a stateless run leaves no temporary head
    assert torch.equal(load_head(registry.get(again.version)["path"], tiny.target).d2t_map, served)


@pytest.mark.timeout(600)
def test_a_rebuilt_vocabulary_is_hot_swapped_into_a_serving_head(tiny, engine_loop, tmp_path):
    """The rebuilt head has the base's draft_vocab_size, so a gateway serving the original new head accepts the
    bootstrapped one as a hot swap (what the announcement does): vLLM must then draft with the NEW d2t. Every
    drafted token lies in the new vocabulary, and some only in it (a swap that kept the old map could not draft
    those)."""
    import numpy as np
    from vllm import SamplingParams

    from lkserve.models.eagle3 import build_eagle3_head, load_head
    from tests.conftest import AUX_LAYERS, K, _stop, corpus_prompts, start_eagle3_engine

    head_dir = build_eagle3_head(tiny.target, tmp_path / "head", seed=0, draft_vocab_size=256,
                                 aux_layer_ids=AUX_LAYERS, num_speculative_tokens=K, init="random")
    old = set(load_head(head_dir, tiny.target).d2t_map.tolist())
    hot = sorted(set(range(3, 512)) - old)[:40]
    rebuilt = tmp_path / "rebuilt"
    info = bootstrap.rebuild_head_vocab(head_dir, tiny.target, _hot_records(np.random.default_rng(1), 40, hot, 0),
                                        rebuilt, K)
    assert info is not None and info["replaced"] == "tiny test corpus"
    new = set(load_head(rebuilt, tiny.target).d2t_map.tolist())
    assert set(hot) <= new - old
    handle = start_eagle3_engine(tiny, engine_loop, head_dir, "new-head")
    try:
        swap = handle.run(handle.engine.swap_draft(str(rebuilt), "rebuilt"))
        assert swap.ok, swap
        handle.drain()
        sp = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True)
        handle.generate_many([(p, sp) for p in corpus_prompts(handle.engine.tokenizer, 8, offset=700)])
        recs = [r for r in handle.drain() if r.draft_version == "rebuilt"]
    finally:
        _stop(engine_loop, handle.engine)
    drafted = {int(t) for r in recs for t in r.draft_token_ids}
    print(json.dumps({"drafted_ids": len(drafted), "only_in_new_vocab": len(drafted - old)}))
    assert len(drafted) >= 30
    assert drafted <= new, sorted(drafted - new)[:10]
    assert len(drafted - old) >= 3
