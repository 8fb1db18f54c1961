"""The draft model under training: load, choose trainable parameters, optimizer, one step, save.

The draft is the HF checkpoint the engine serves (LlamaForCausalLM-like: `model.model` the decoder, `lm_head` the
head). Logits are only computed for the rows that have a target (hidden states gathered first, then the head):
the LM head dominates the cost at a 49k vocabulary, so never run it over padding or unlabelled tokens.

Trainable parameters (`train_params`):
- "layers" (default): decoder layers + final norm; embeddings and a tied head frozen (what the preview measured).
- "layers+head": also an UNTIED lm_head (a tied head stays frozen: it is the embedding).
- "all": everything.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lkserve import losses
from lkserve.trainer.examples import Batch, needed_lengths, per_record

LOSSES = {
    "lk_lambda": losses.lk_lambda_loss,
    "lk_alpha": losses.lk_alpha_loss,
    "kl": losses.kl_loss,
    "tv": losses.tv_loss,
}


PRECISIONS = ("fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AVX512-BF16 or AMX), where bf16 autocast measured faster
    than fp32 (bench/train_speed.py); elsewhere oneDNN emulates bf16, unmeasured here, so fp32 stays the choice."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(model, precision: str):
    """The context of a training forward: bf16 autocast of the matmuls (weights stay fp32 masters) or nothing."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")


_HEAP_KEPT = False


def keep_freed_memory() -> bool:
    """Keep freed memory in the process heap instead of returning it to the kernel (glibc mallopt: no mmap for large
    blocks, no trimming). A training step allocates several [rows, vocabulary] tensors (133 MB each for an EAGLE-3
    batch of 4k rows x 8k ids); glibc serves every block above 32 MB with a fresh mmap, so each one page-faults its
    way in again (~50-90 ms per block on this CPU, measured in bench/train_speed.py). Kept, the heap is reused and
    the process stays at its peak footprint. Once per process; LKSERVE_KEEP_FREED_MEMORY=0 turns it off; a no-op
    where there is no glibc. Returns whether it is on."""
    global _HEAP_KEPT
    if _HEAP_KEPT or os.environ.get("LKSERVE_KEEP_FREED_MEMORY", "1") == "0":
        return _HEAP_KEPT
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        _HEAP_KEPT = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        _HEAP_KEPT = False
    return _HEAP_KEPT


def set_threads(n: int) -> None:
    """The worker shares the CPU with the engine: a fixed, small torch thread budget."""
    n = max(1, int(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (interop threads can only be set once per process)
        pass


def load_draft(model_dir: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    return model


def select_trainable(model, train_params: str = "layers") -> list[str]:
    """Freeze everything, then unfreeze per `train_params`; returns the trainable parameter names."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = []
    for name, p in model.named_parameters():
        if train_params == "all" or ".layers." in name or name == "model.norm.weight" or train_params == "layers+head" and name.startswith("lm_head") and not tied:
            on = True
        else:
            on = False
        p.requires_grad_(on)
        if on:
            names.append(name)
    if not names:
        raise ValueError(f"train_params={train_params!r} selects no parameter")
    return names


def row_hidden(model, batch: Batch) -> torch.Tensor:
    """The LM head's input [N, H] at the batch's target rows. Records of very different lengths run one by one, each
    cut to the tokens its rows need (examples.per_record; right padding, causal attention: the same states)."""
    B, L = batch.input_ids.shape
    need = needed_lengths(batch.row_b, batch.row_t, B)
    if not per_record(need, L):
        out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state[batch.row_b, batch.row_t]  # [N, H]
    flat = []
    for b in range(B):
        n = int(need[b])
        if n:
            mask = batch.attention_mask[b: b + 1, :n]
            flat.append(model.model(input_ids=batch.input_ids[b: b + 1, :n], attention_mask=mask).last_hidden_state[0])
    offsets = torch.cumsum(need, 0) - need
    return torch.cat(flat, 0)[offsets[batch.row_b] + batch.row_t]


def row_logits(model, batch: Batch) -> torch.Tensor:
    """Draft logits [N, V] of the batch's target rows (not divided by temperature)."""
    return model.lm_head(row_hidden(model, batch))


def head_rows(lm_head, hidden: torch.Tensor, batch, precision: str):
    """What a trainer hands the losses: the head's inputs (losses.HeadRows: for sparse targets the logits are never
    materialised, a block of rows at a time) when the head is a plain bias-free linear layer, else the logits. Both
    divided by the rows' temperatures (skipped when all are 1)."""
    if isinstance(lm_head, torch.nn.Linear) and lm_head.bias is None:
        return losses.HeadRows(hidden, lm_head.weight, batch.divisor(),
                               torch.bfloat16 if precision == "bf16" else None)
    with autocast(lm_head, precision):
        logits = lm_head(hidden)
    return batch.scale_logits(logits.float())


@dataclass
class StepResult:
    step: int
    loss: float
    alpha_per_position: list[float]
    lambda_per_position: list[float] | None
    rows: int
    seconds: float
    lr: float


def scheduled_lr(step: int, base_lr: float, *, warmup_steps: int = 0, lr_schedule: str = "constant",
                 total_steps: int = 10_000, min_lr_ratio: float = 0.1) -> float:
    """The lr of optimizer step `step` (0-based), for both trainer kinds: linear warm-up, then constant or cosine
    from base_lr down to min_lr_ratio * base_lr at total_steps (held there after)."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if lr_schedule == "cosine":
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    return base_lr


class DraftTrainer:
    def __init__(self, model_dir: str, *, loss: str = "lk_lambda", eta: float = 3.0, gamma: float = 0.8,
                 lr: float = 3e-3, grad_clip: float = 1.0, num_positions: int = 4, train_params: str = "layers",
                 lr_schedule: str = "constant", warmup_steps: int = 0, total_steps: int = 10_000,
                 min_lr_ratio: float = 0.1, weight_decay: float = 0.0, betas=(0.9, 0.95), model=None,
                 precision: str = "fp32"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; one of {sorted(LOSSES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
        self.precision = precision
        keep_freed_memory()
        self.model_dir = str(model_dir)
        self.model = model if model is not None else load_draft(model_dir)
        self.loss_name, self.eta, self.gamma = loss, eta, gamma
        self.base_lr, self.grad_clip, self.num_positions = lr, grad_clip, num_positions
        self.lr_schedule, self.warmup_steps, self.total_steps = lr_schedule, warmup_steps, total_steps
        self.min_lr_ratio = min_lr_ratio
        self.train_params = train_params
        self.trainable = select_trainable(self.model, train_params)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.step_count = 0

    # -- schedule ---------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return scheduled_lr(step, self.base_lr, warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                            total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)

    # -- one step ---------------------------------------------------------------------------------------------
    def loss_on(self, batch: Batch):
        with autocast(self.model, self.precision):
            hidden = row_hidden(self.model, batch)
        logits = head_rows(self.model.lm_head, hidden, batch, self.precision)
        fn = LOSSES[self.loss_name]
        kw = {"gamma": self.gamma, "num_positions": self.num_positions}
        if self.loss_name == "lk_lambda":
            kw["eta"] = self.eta
        return fn(logits, batch.target, batch.draft_position, None, **kw)

    def step(self, batch: Batch) -> StepResult:
        return train_step(self, batch, [p for p in self.model.parameters() if p.requires_grad])

    # -- state ------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (the frozen ones are the base checkpoint's)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in self.trainable}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def state_dict(self) -> dict:
        return {"model": self.trainable_state(), "optimizer": self.optimizer.state_dict(), "step": self.step_count,
                "loss": self.loss_name, "train_params": self.train_params}

    def load_state_dict(self, state: dict) -> None:
        self.load_trainable_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])


def train_step(trainer, batch, params: list) -> StepResult:
    """One AdamW step on `trainer.loss_on(batch)` (draft-model and EAGLE-3 trainers alike): the scheduled learning
    rate, backward, clipping of `params`, and what the step measured."""
    t0 = time.perf_counter()
    lr = trainer.lr_at(trainer.step_count)
    for g in trainer.optimizer.param_groups:
        g["lr"] = lr
    trainer.model.train()
    out = trainer.loss_on(batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if trainer.grad_clip and trainer.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, trainer.grad_clip)
    trainer.optimizer.step()
    trainer.model.eval()
    trainer.step_count += 1
    nan_to_none = lambda t: [None if math.isnan(x) else float(x) for x in t.tolist()]
    return StepResult(
        step=trainer.step_count,
        loss=float(out.loss.detach()),
        alpha_per_position=nan_to_none(out.alpha_per_position),
        lambda_per_position=None if out.lambda_per_position is None else nan_to_none(out.lambda_per_position),
        rows=batch.num_rows,
        seconds=time.perf_counter() - t0,
        lr=lr,
    )


def copy_model(model):
    """An independent in-memory copy (the serving reference for the gate)."""
    import copy

    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def q_from_logits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The draft's serving distribution per row: softmax(logits / T), one-hot argmax for greedy rows."""
    q = F.softmax(logits.float() / batch.logit_temperature()[:, None], dim=-1)
    g = batch.greedy
    if g.any():
        q[g] = F.one_hot(logits[g].argmax(-1), logits.shape[-1]).to(q.dtype)
    return q
