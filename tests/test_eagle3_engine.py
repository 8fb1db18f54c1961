"""EAGLE-3 heads served by vLLM through lkserve's engine: lossless at T=0, hidden-state capture exact, the plain
PyTorch head reproduces vLLM's drafts, hot-swap with validation. One eagle3 engine for the module (full vocabulary)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lkserve.capture.record import hidden_states_array
from tests.conftest import AUX_LAYERS, K, _stop, corpus_prompts, start_eagle3_engine

pytestmark = pytest.mark.slow


def _sp(**kw):
    from vllm import SamplingParams

    kw.setdefault("ignore_eos", True)
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def e3(tiny, eagle3_heads, engine_loop, eagle3_reference):
    handle = start_eagle3_engine(tiny, engine_loop, eagle3_heads.random, "random")
    handle.drafts = {"random": eagle3_heads.random, "random_b": eagle3_heads.random_b}
    yield handle
    _stop(engine_loop, handle.engine)


def _records_for(records, rid):
    return sorted([r for r in records if r.request_id == rid], key=lambda r: int(r.positions[0]))


def test_engine_reports_eagle3_aux_layers(e3):
    info = e3.run(e3.engine.info())
    assert info["aux_hidden_state_layers"] == AUX_LAYERS
    assert info["capture"]["hidden_states"] is True


@pytest.mark.parametrize("draft", ["random", "random_b"])
def test_greedy_eagle3_equals_non_speculative(e3, eagle3_reference, draft):
    e3.use_draft(draft)
    sp = _sp(temperature=0.0, max_tokens=eagle3_reference["max_tokens"])
    got = e3.generate_many([(p, sp) for p in eagle3_reference["prompts"]])
    for g, ref in zip(got, eagle3_reference["tokens"]):
        assert g.token_ids == ref
        assert g.spec is not None and g.spec.drafted > 0  # EAGLE-3 speculation really ran
    e3.use_draft("random")


def _hf_aux(model_dir, context):
    """The target's residual stream at vLLM's aux layer ids (0 = embedding output, i = after i layers), computed
    separately with transformers: [len(context), 3H]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    grabbed = {}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: grabbed.__setitem__(0, o))]
    for li, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, i, o, li=li: grabbed.__setitem__(li + 1, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(torch.tensor([[int(t) for t in context]]))
    for h in hooks:
        h.remove()
    return torch.cat([grabbed[i][0] for i in AUX_LAYERS], dim=-1).numpy()


def test_captured_hidden_states_match_transformers(e3, tiny):
    e3.use_draft("random")
    e3.drain()
    prompt = corpus_prompts(e3.engine.tokenizer, 1, offset=40)[0]
    res = e3.generate(prompt, _sp(temperature=0.8, max_tokens=40, seed=1))
    recs = _records_for(e3.drain(), res.request_id)
    assert recs and all(r.hidden_states is not None for r in recs)
    full = list(recs[-1].context_token_ids)
    ref = _hf_aux(tiny.target, full)
    D = ref.shape[1]
    checked = 0
    for r in recs:
        hs = hidden_states_array(r)
        assert hs.shape[1] == D == 3 * 128
        last = int(r.positions[-1])
        assert r.hidden_start + hs.shape[0] == last - 1  # up to the state the last drafted position needs
        assert r.hidden_start == 0  # short request: the whole prefix (hidden_context=1024)
        want = ref[r.hidden_start: r.hidden_start + hs.shape[0]]
        np.testing.assert_allclose(hs, want, rtol=2e-3, atol=2e-3 * float(np.abs(want).max()))
        checked += hs.shape[0]
    print(f"\nhidden states checked: {checked} rows x {D} against transformers (fp16 capture)")
    assert checked >= 40


def test_plain_torch_head_reproduces_vllm_draft_probabilities(e3, tiny, eagle3_heads):
    """The trainer's head, unrolled (training-time test) on the captured hidden states, gives the probability vLLM's
    head gave each drafted token (records' draft_probs), at every draft position: same weights, same inputs."""
    from lkserve.models.eagle3 import load_head
    from lkserve.trainer.eagle3 import build_eagle3_batch, row_logits

    e3.use_draft("random")
    e3.drain()
    T = 0.8
    prompts = corpus_prompts(e3.engine.tokenizer, 3, offset=60)
    res = e3.generate_many([(p, _sp(temperature=T, max_tokens=40, seed=i)) for i, p in enumerate(prompts)])
    ids = {r.request_id for r in res}
    recs = [r for r in e3.drain() if r.request_id in ids]
    head = load_head(eagle3_heads.random, tiny.target)
    batch = build_eagle3_batch(recs, K, all_steps=False)
    with torch.no_grad():
        q = torch.softmax(row_logits(head, batch, K) / T, -1)
    # draft token / prob of each row, in batch order
    dt, dp, di = [], [], []
    for r in recs:
        for i, p in enumerate(r.positions):
            j = int(p) - 2 - int(r.draft_index[i]) - int(r.hidden_start)
            if int(r.draft_index[i]) < K and j >= 0:
                dt.append(int(r.draft_token_ids[i])), dp.append(float(r.draft_probs[i])), di.append(int(r.draft_index[i]))
    assert len(dt) == batch.num_rows and batch.served.all()
    mine = q[torch.arange(len(dt)), torch.tensor(dt)].numpy()
    err = np.abs(mine - np.array(dp))
    by_pos = {k: int((np.array(di) == k).sum()) for k in range(K)}
    print(f"\nq(draft token): {len(dt)} rows {by_pos}, max |torch - vLLM| = {err.max():.2e}")
    assert by_pos[0] > 20 and by_pos[1] > 3  # step 0 and unrolled steps both checked
    assert err.max() < 5e-3


def test_wrong_heads_are_refused_and_the_live_head_keeps_serving(e3, tiny, eagle3_heads, eagle3_reference, tmp_path):
    """A swap validates an EAGLE-3 head against the live one before touching a weight: another draft vocabulary,
    other aux layers, a plain draft model, a wrong tensor shape and a non-finite weight are all refused with a
    reason, and the live head keeps serving (same T=0 tokens, same per-step acceptance)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from lkserve.models.eagle3 import build_eagle3_head

    e3.use_draft("random")
    engine = e3.engine
    version, sha = engine.draft_version, engine.draft_sha256
    sp = _sp(temperature=0.0, max_tokens=eagle3_reference["max_tokens"])

    def probe():
        outs = e3.generate_many([(p, sp) for p in eagle3_reference["prompts"]])
        return [(o.token_ids, o.spec.per_step_accepted) for o in outs]

    before = probe()

    def edited(name, edit_weights=None, edit_config=None):
        out = tmp_path / name
        shutil.copytree(eagle3_heads.random, out)
        if edit_weights:
            sd = load_file(str(out / "model.safetensors"))
            edit_weights(sd)
            save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        if edit_config:
            cfg = json.loads((out / "config.json").read_text())
            edit_config(cfg)
            (out / "config.json").write_text(json.dumps(cfg))
        return out

    def narrow_fc(sd):
        sd["fc.weight"] = sd["fc.weight"][:, :-8].contiguous()

    def nan_norm(sd):
        sd["norm.weight"] = sd["norm.weight"].clone()
        sd["norm.weight"][0] = float("nan")

    other_aux = build_eagle3_head(tiny.target, tmp_path / "aux", aux_layer_ids=[0, 2, 2], num_speculative_tokens=K,
                                  init="random")
    cases = {
        "truncated vocabulary": (eagle3_heads.trunc, "draft_vocab_size"),
        "other aux layers": (other_aux, "eagle_aux_hidden_state_layer_ids"),
        "a draft model": (tiny.random_draft, "tensor names differ"),
        "fc shape": (edited("fc", narrow_fc), "shape mismatch"),
        "non-finite": (edited("nan", nan_norm), "non-finite"),
        "other norm order": (edited("norm", edit_config=lambda c: c.update(norm_before_residual=False)),
                             "norm_before_residual"),
    }
    for case, (path, reason) in cases.items():
        res = e3.run(engine.swap_draft(str(path), f"bad-{case}"))
        print(f"\n{case}: refused: {res.reason}")
        assert not res.ok, case
        assert reason in res.reason, (case, res.reason)
        assert engine.draft_version == version and engine.draft_sha256 == sha
    assert probe() == before
