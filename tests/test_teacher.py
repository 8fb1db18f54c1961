"""Teacher-forced bootstrap records (lkserve.trainer.teacher) against what the real engine captures, and their
text sources against the reserved domains."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lkserve.capture.record import hidden_states_array
from lkserve.trainer import teacher


def _served(handle, n: int = 4, max_tokens: int = 40):
    from vllm import SamplingParams

    from tests.conftest import prompt_ids

    handle.drain()
    sp = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    handle.generate_many([(p, sp) for p in prompt_ids(handle, n)])
    records = [r for r in handle.drain() if r.num_positions]
    assert records
    return records


def _compare_distributions(records, model, aux_layer_ids=None):
    """Teacher-forced top-k at each captured position vs the captured top-k: (max |dp| over matched ids,
    fraction of positions with the same top-1, aux rows compared, max |d aux| relative to the row scale)."""
    max_dp, same_top1, n, aux_err, aux_rows = 0.0, 0, 0, 0.0, 0
    for r in records:
        ctx = [int(t) for t in r.context_token_ids]
        import torch

        logits, aux = teacher.forward_window(model, torch.tensor(ctx), aux_layer_ids)
        tf = teacher.window_record(torch.tensor(ctx), logits, aux, top_k=r.topk_ids.shape[1], temperature=1.0,
                                   num_positions=4)
        for i, p in enumerate(r.positions):
            j = int(p) - 1  # teacher positions are 1 .. L-1
            got = dict(zip(tf.topk_ids[j].tolist(), tf.topk_probs[j].astype(np.float32).tolist()))
            for tid, pr in zip(r.topk_ids[i].tolist(), r.topk_probs[i].astype(np.float32).tolist()):
                if tid in got:
                    max_dp = max(max_dp, abs(got[tid] - pr))
                elif pr > 0.02:  # a captured token with real mass missing from the teacher's top-k
                    max_dp = max(max_dp, pr)
            same_top1 += int(tf.topk_ids[j, 0] == r.topk_ids[i, 0])
            n += 1
        hs = hidden_states_array(r)
        if aux_layer_ids and hs is not None:
            mine = aux[r.hidden_start: r.hidden_start + hs.shape[0]].numpy()
            scale = np.abs(hs).max(-1, keepdims=True) + 1e-6
            aux_err = max(aux_err, float((np.abs(mine - hs) / scale).max()))
            aux_rows += hs.shape[0]
    return max_dp, same_top1 / n, aux_rows, aux_err


@pytest.mark.timeout(600)
def test_teacher_distributions_match_served_capture(spec_engine, tiny):
    """At every position the engine verified, the teacher-forced target distribution is the captured one (same
    model, same context, T=1): an off-by-one in positions or a different softmax would fail this."""
    spec_engine.use_draft("random")
    records = _served(spec_engine)
    model = teacher.load_target(tiny.target)
    max_dp, top1, _, _ = _compare_distributions(records, model)
    print(json.dumps({"records": len(records), "max_abs_dp": max_dp, "same_top1": top1}))
    assert max_dp < 0.01 and top1 > 0.98


@pytest.mark.timeout(900)
def test_teacher_hidden_states_match_eagle3_capture(tiny, engine_loop, eagle3_heads):
    """The aux hidden states the teacher pass records are the ones vLLM's EAGLE-3 path captures (layer i's input,
    i == num_layers: the last layer's output before the final norm)."""
    from tests.conftest import AUX_LAYERS, _stop, start_eagle3_engine

    handle = start_eagle3_engine(tiny, engine_loop, eagle3_heads.random, "random")
    try:
        records = _served(handle, n=3, max_tokens=32)
    finally:
        _stop(engine_loop, handle.engine)
    model = teacher.load_target(tiny.target)
    max_dp, top1, rows, aux_err = _compare_distributions(records, model, AUX_LAYERS)
    print(json.dumps({"records": len(records), "aux_rows": rows, "max_rel_aux_err": aux_err, "max_abs_dp": max_dp}))
    assert rows > 0 and aux_err < 0.01  # the capture stores fp16 words here
    assert max_dp < 0.01 and top1 > 0.98


def test_teacher_records_label_every_position(tiny):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    model = teacher.load_target(tiny.target)
    seqs = [tok("def f(x):\n    return x + 1\n" * 30)["input_ids"]]
    recs = teacher.teacher_records(model, seqs, top_k=8, num_positions=4, aux_layer_ids=[0, 2], window=64)
    n = len(seqs[0])
    lens = [min(64, n - a) for a in range(0, n, 64) if n - a >= 8]
    assert [len(r.context_token_ids) for r in recs] == lens
    r = recs[0]
    assert r.num_positions == 63 and r.topk_ids.shape == (63, 8)
    assert np.array_equal(r.draft_token_ids, r.context_token_ids[1:])
    assert set(r.draft_index.tolist()) == {0, 1, 2, 3}
    assert r.hidden_states.shape == (64, 2 * 128)  # tiny hidden size 128, two aux layers
    p = torch.softmax(model(input_ids=torch.tensor(seqs[0][:64])[None]).logits[0, 9].float(), -1)
    assert int(r.topk_ids[9, 0]) == int(p.argmax())  # position 10 is predicted by row 9


def test_package_sources_avoid_reserved_domains():
    """Installed distributions only: no file of the standard library or of Debian's package metadata, and the
    check itself recognises both (it must be able to fail)."""
    import json as stdlib_module

    files = teacher.package_files(max_files=3000)
    assert len(files) > 100
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    for f in files:
        p = f.resolve()
        assert not teacher.is_reserved(p), p
        assert "site-packages" in p.parts or "dist-packages" in p.parts or not p.is_relative_to(stdlib), p
        assert not str(p).startswith(("/usr/share/doc", "/var/lib/dpkg")), p
    assert not any("lkserve" in f.parts for f in files)
    assert teacher.is_reserved(stdlib_module.__file__)
    assert teacher.is_reserved("/usr/share/doc/bash/copyright")
    assert teacher.is_reserved("/var/lib/dpkg/status")
    names = {f.resolve().parts[f.resolve().parts.index("site-packages") + 1] for f in files
             if "site-packages" in f.resolve().parts}
    assert len(names) > 10  # interleaved across distributions, not one package's files


@pytest.mark.timeout(900)
def test_teacher_bootstrap_raises_heldout_alpha_and_registers(tiny, redis_url, tmp_path):
    """`lkserve draft bootstrap --source teacher` on the tiny models: its own engine (no speculation) writes the
    completions, the teacher pass labels every position, the worker's trainer raises held-out alpha on completions
    of prompts never trained on, and the result is the registry's current version."""
    from lkserve.drafts import DraftRegistry
    from lkserve.trainer import bootstrap
    from tests.test_bootstrap import _boot_settings, _fresh_prefix

    settings = _boot_settings(tiny, redis_url, tmp_path / "cache", _fresh_prefix(redis_url, "tboot"))
    registry = DraftRegistry(redis_url, "tboot")
    res = bootstrap_run(settings, registry, tmp_path / "state")
    print(json.dumps({"before": res.before["alpha_mean"], "after": res.after["alpha_mean"], "steps": res.steps,
                      "rows": res.after["rows"], "train_records": res.train_records,
                      "generate_seconds": round(res.generate_seconds, 1)}))
    assert res.after["rows"] >= 1000  # every position of the held-out completions is a label
    # stated margin: the served source's (x1.5 and +0.02 over the random draft on >= 1,000 held-out positions)
    b, a = res.before["alpha_mean"], res.after["alpha_mean"]
    assert a >= 1.5 * b and a >= b + 0.02, (res.before, res.after)
    assert registry.current() == res.version
    meta = registry.get(res.version)
    assert meta["source"] == "teacher"
    off = bootstrap.offline_settings(settings).trainer  # what it trained with: the CPU is the bootstrap's
    assert (meta["threads"], meta["precision"]) == (off.threads, off.precision)
    # the completions alone, as serving drafts them: fewer rows than the whole split, reported beside it
    assert 0 < res.after_completion["rows"] < res.after["rows"]
    assert meta["heldout_completion_alpha_after"] == res.after_completion["alpha_mean"]
    again = bootstrap_run(settings, registry, tmp_path / "state")  # the state's records: nothing generated again
    assert again.generate_seconds == 0.0 and again.train_records == res.train_records


def bootstrap_run(settings, registry, state_dir):
    from lkserve.trainer import bootstrap

    return bootstrap.run_bootstrap(settings, registry, max_positions=40_000, seed=0, state_dir=state_dir,
                                   source="teacher", max_prompts=80, max_tokens=64, max_prompt_tokens=64,
                                   concurrency=16)


def test_teacher_greedy_adds_each_train_prompts_greedy_completion(tiny, tmp_path):
    """`--greedy`: after the sampled completions, one T=0 completion per train prompt, so its every completion token
    is the target's own argmax (the teacher's top-1), while the T=1 samples mostly are not."""
    from lkserve.trainer import bootstrap
    from tests.test_bootstrap import _boot_settings

    settings = _boot_settings(tiny, None, tmp_path / "cache", "greedy")
    train, held, _ = bootstrap.teacher_split(settings, max_prompts=10, max_tokens=16, max_prompt_tokens=48,
                                             concurrency=8, samples=1, greedy=True)
    n_train = len(bootstrap.bootstrap_prompts(0.2, 10, 0)[0])
    assert len(train) == 2 * n_train and len(held) == 10 - n_train  # one window per sequence at these lengths

    def top1_rate(r, last=8):  # over the completion's last tokens: row i predicts token i + 1
        rows = range(len(r.context_token_ids) - 1 - last, len(r.context_token_ids) - 1)
        return np.mean([int(r.topk_ids[i, 0]) == int(r.context_token_ids[i + 1]) for i in rows])

    sampled, greedy = [top1_rate(r) for r in train[:n_train]], [top1_rate(r) for r in train[n_train:]]
    print(f"\ntop-1 agreement: sampled {np.mean(sampled):.3f}, greedy {np.mean(greedy):.3f}")
    assert np.mean(greedy) > 0.9 and np.mean(sampled) < 0.6


def test_completion_labels_keep_only_the_completion_from_each_windows_start(tiny):
    """`starts` tags each window with its first completion position in its own coordinates; completion_labels
    keeps the labels from there (a window wholly inside the prompt is dropped), with the same target rows, context
    and hidden states as the records labelling everything; untagged records give None."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    model = teacher.load_target(tiny.target)
    seq = tok("def f(x):\n    return x + 1\n" * 30)["input_ids"]
    kw = {"top_k": 8, "num_positions": 4, "aux_layer_ids": [0, 2], "window": 64}
    full = teacher.teacher_records(model, [seq], **kw)
    tagged = teacher.teacher_records(model, [seq], starts=[100], **kw)
    assert [r.tags["completion_start"] for r in tagged[:3]] == ["100", "36", "0"]
    assert [r.num_positions for r in tagged] == [r.num_positions for r in full]  # tagging labels everything
    part = teacher.completion_labels(tagged)
    assert len(part) == len(full) - 1  # window 0..63 lies before position 100: dropped
    first = part[0]  # the window at 64: positions 36.. of its own 1..63
    assert first.positions.tolist() == list(range(36, 64))
    assert np.array_equal(first.topk_ids, full[1].topk_ids[35:])
    assert np.array_equal(first.context_token_ids, full[1].context_token_ids)
    assert np.array_equal(first.hidden_states, full[1].hidden_states)
    assert [r.num_positions for r in part[1:]] == [r.num_positions for r in full[2:]]
    assert teacher.completion_labels(full) is None


def test_teacher_completion_labels_skip_every_prompt_position(tiny, tmp_path):
    """labels="completion": each record's labels start at its prompt's length (the chat template's generation
    prompt ends there), on both sides of the split; "all" labels the prompt too. Unknown labels are refused."""
    from lkserve.trainer import bootstrap
    from tests.test_bootstrap import _boot_settings

    settings = _boot_settings(tiny, None, tmp_path / "cache", "labels")
    kw = {"max_prompts": 10, "max_tokens": 16, "max_prompt_tokens": 48, "concurrency": 8}
    train, held, _ = bootstrap.teacher_split(settings, labels="completion", **kw)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.target))
    train_p, held_p = bootstrap.bootstrap_prompts(0.2, 10, 0)
    for recs, ps in ((train, train_p), (held, held_p)):
        assert len(recs) == len(ps)  # one window per sequence at these lengths
        for r, (_, text) in zip(recs, ps):
            n = len(bootstrap.encode(tok, text, 48))
            assert int(r.positions.min()) == n and int(r.positions.max()) == len(r.context_token_ids) - 1
    with pytest.raises(ValueError, match="labels"):
        bootstrap.teacher_split(settings, labels="prompt", **kw)
