"""The EAGLE-3 head as a plain PyTorch module: the model vLLM serves, unrolled for training (training-time test).
Serving code (checkpoint build/load in lkserve/models/eagle3.py) needs only this; the trainer
(lkserve/trainer/eagle3.py) imports it.

The module mirrors `vllm/model_executor/models/llama_eagle3.py` (vLLM 0.32) exactly, with the same weight names,
so a state dict saved from here loads in vLLM unchanged (speculators layout, see lkserve/models/eagle3.py):

    fc.weight                                   [H, n_aux * H_target]   combine_hidden_states (applied once)
    layers.0.input_layernorm.weight             [H]                     norm of the token embedding
    layers.0.hidden_norm.weight                 [H]                     norm of the hidden-state input
    layers.0.self_attn.{q,k,v}_proj.weight      [heads * head_dim, 2H]  attention over [embeds, hidden]
    layers.0.self_attn.o_proj.weight            [H, heads * head_dim]
    layers.0.post_attention_layernorm.weight    [H]
    layers.0.mlp.{gate,up,down}_proj.weight     SiLU-gated MLP
    norm.weight                                 [H]
    lm_head.weight                              [V_draft, H]
    d2t                                         [V_draft] int64 OFFSETS (target id - draft id); only if truncated
    t2d                                         [V_target] bool (which target ids the draft vocabulary holds)

The token embedding is the target's (frozen, never saved: vLLM shares the target's embedding when the head has none).

How vLLM runs the head (llm_base_proposer.propose), with a_j the concatenated aux hidden states of the target at
position j and x the tokens:
- first pass, every position j the target verified: input (embed(x_{j+1}), fc(a_j)) at rotary position j; causal
  attention over the head's KV of all earlier positions. The output at the last position drafts token 0.
- step k >= 1: input (embed(draft k-1), h_{k-1}) where h_{k-1} is the previous step's pre-norm output, at rotary
  position j + k; it attends to the first-pass KV of positions <= j and to the KV of its own earlier steps.
Training-time test (TTT) unrolls exactly that for every position j of a window at once: step k's query at j attends
to the step-0 keys at j' <= j (causal) and to the keys of steps 1..k at j ("diagonal").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lkserve import losses


@dataclass
class Eagle3Spec:
    """Architecture of an EAGLE-3 head (one decoder layer)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    norm_before_residual: bool = True  # the speculators default (vLLM reads it from the speculators config)
    hidden_act: str = "silu"

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids) or 3

    @property
    def truncated(self) -> bool:
        return self.draft_vocab_size != self.vocab_size


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class _Attention(nn.Module):
    def __init__(self, spec: Eagle3Spec):
        super().__init__()
        h, nh, nkv, hd = spec.hidden_size, spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(2 * h, nh * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, h, bias=False)
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Neox-style rotary embedding. x [B, L, n, hd], pos [B, L] long."""
        ang = pos.to(torch.float32)[..., None] * self.inv_freq  # [B, L, hd/2]
        cos, sin = ang.cos()[:, :, None, :].to(x.dtype), ang.sin()[:, :, None, :].to(x.dtype)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def qkv(self, x: torch.Tensor, pos: torch.Tensor):
        B, L, _ = x.shape
        q = self.rope(self.q_proj(x).view(B, L, self.nh, self.hd), pos)
        k = self.rope(self.k_proj(x).view(B, L, self.nkv, self.hd), pos)
        v = self.v_proj(x).view(B, L, self.nkv, self.hd)
        return q, k, v

    def attend(self, q, k0, v0, extra_k: list, extra_v: list) -> torch.Tensor:
        """q [B, L, nh, hd]; causal over step-0 keys k0/v0 [B, L, nkv, hd]; plus the same-position keys of every
        earlier step (extra_k/extra_v, each [B, L, nkv, hd]). Returns [B, L, nh * hd]."""
        B, L, nh, hd = q.shape
        rep = nh // self.nkv
        exp = lambda t: t.repeat_interleave(rep, dim=2)  # GQA: [B, L, nh, hd]
        scale = 1.0 / math.sqrt(hd)
        qh = q.transpose(1, 2)  # [B, nh, L, hd]
        s0 = torch.matmul(qh, exp(k0).transpose(1, 2).transpose(-1, -2)) * scale  # [B, nh, L, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s0 = s0.masked_fill(~causal, float("-inf"))
        extras = [((q * exp(k)).sum(-1) * scale).transpose(1, 2)[..., None] for k in extra_k]  # [B, nh, L, 1]
        w = torch.softmax(torch.cat([s0, *extras], dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(w[..., :L], exp(v0).transpose(1, 2))  # [B, nh, L, hd]
        for i, v in enumerate(extra_v):
            out = out + w[..., L + i: L + i + 1] * exp(v).transpose(1, 2)
        return out.transpose(1, 2).reshape(B, L, nh * hd)


class _MLP(nn.Module):
    def __init__(self, spec: Eagle3Spec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, spec: Eagle3Spec):
        super().__init__()
        self.spec = spec
        self.self_attn = _Attention(spec)
        self.mlp = _MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.hidden_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def inputs(self, embeds: torch.Tensor, hidden: torch.Tensor):
        """(attention input [.., 2H], residual [.., H]) exactly as vLLM's layer 0."""
        e = self.input_layernorm(embeds)
        if self.spec.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = self.hidden_norm(hidden)
        return torch.cat([e, hidden], dim=-1), residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        residual = attn_out + residual
        h = self.mlp(self.post_attention_layernorm(residual))
        return h + residual  # pre-norm output (what the next step takes as its hidden input)


class Eagle3Head(nn.Module):
    """One-layer EAGLE-3 head; `embed_tokens` is the target's, frozen and not part of the saved state."""

    def __init__(self, spec: Eagle3Spec, embed_weight: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        if embed_weight is not None:
            with torch.no_grad():
                self.embed_tokens.weight.copy_(embed_weight)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(spec.num_aux * spec.target_hidden_size, spec.hidden_size, bias=False)
        self.layers = nn.ModuleList([_Layer(spec)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.draft_vocab_size, bias=False)
        # vocabulary map (speculators: d2t offsets, t2d mask); identity when not truncated
        self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(spec.vocab_size, dtype=torch.bool))

    # -- vocabulary ------------------------------------------------------------------------------------------
    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """target_ids [V_draft]: the target id of each draft token (ascending, distinct)."""
        ids = torch.as_tensor(target_ids, dtype=torch.long)
        assert ids.shape == (self.spec.draft_vocab_size,)
        self.d2t.copy_(losses.d2t_to_offsets(ids))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def d2t_map(self) -> torch.Tensor | None:
        """Plain draft->target id map for the losses, None when the vocabulary is not truncated."""
        return losses.d2t_from_offsets(self.d2t) if self.spec.truncated else None

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: everything but the (target's) embedding; d2t/t2d only if truncated."""
        sd = {k: v.detach().clone().contiguous() for k, v in self.state_dict().items() if not k.startswith("embed_tokens")}
        if not self.spec.truncated:
            sd.pop("d2t"), sd.pop("t2d")
        return sd

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("embed_tokens")]

    # -- forward ---------------------------------------------------------------------------------------------
    def unroll(self, tokens: torch.Tensor, aux: torch.Tensor, pos0: torch.Tensor, num_steps: int) -> list[torch.Tensor]:
        """Training-time test. tokens [B, L + num_steps] with tokens[:, i] = x_{s+i} (s = window start), aux
        [B, L, n_aux * H_t] = a_{s..s+L-1}, pos0 [B] = s. Returns num_steps pre-norm hidden states [B, L, H]:
        step k at index j drafts x_{s+j+2+k}."""
        _B, L, _ = aux.shape
        layer = self.layers[0]
        attn = layer.self_attn
        ar = torch.arange(L, device=aux.device)
        g = self.fc(aux.to(self.fc.weight.dtype))  # combine_hidden_states
        keys, vals, outs = [], [], []
        hidden = g
        for k in range(num_steps):
            emb = self.embed_tokens(tokens[:, 1 + k: 1 + k + L])
            x, residual = layer.inputs(emb, hidden)
            q, kk, vv = attn.qkv(x, pos0[:, None] + ar[None] + k)
            if k == 0:
                k0, v0 = kk, vv
                o = attn.attend(q, k0, v0, [], [])
            else:
                keys.append(kk)
                vals.append(vv)
                o = attn.attend(q, k0, v0, keys, vals)
            hidden = layer.after_attention(attn.o_proj(o), residual)
            outs.append(hidden)
        return outs

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [.., V_draft] from pre-norm hidden states."""
        return self.lm_head(self.norm(prenorm))
