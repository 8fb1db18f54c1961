"""The few things the worker does differently for a draft model and for an EAGLE-3 head.

Everything else in the loop (stream intake, replay, gate, registry, publish, rollback, crash safety) is the same for
both, so the worker holds one of these and never branches on the kind of draft:

    trainer(start_dir)       a DraftTrainer / Eagle3Trainer warm-started from a checkpoint directory
    batch(records)           a training batch (ValueError: nothing usable in these records)
    evaluate(model, records) held-out acceptance per draft position (EvalResult, what the gate compares)
    load(path) / copy(model) the serving reference the gate compares against
    save(model, out_dir)     the checkpoint the engine will hot-swap, in the base checkpoint's dtype
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

from lkserve.checkpoint import checkpoint_float_dtype


@dataclass(kw_only=True)
class TrainingKnobs:
    """What both kinds take from the settings (TrainerSettings, EngineSettings)."""

    loss: str
    eta: float
    gamma: float
    lr: float
    grad_clip: float
    num_positions: int  # K
    max_context: int
    batch_positions: int
    warmup_steps: int
    lr_schedule: str = "constant"
    total_steps: int = 100_000
    precision: str = "fp32"


@dataclass(kw_only=True)
class DraftModelOps(TrainingKnobs):
    """A small causal LM drafting on its own (vLLM method "draft_model")."""

    train_params: str

    def trainer(self, start_dir):
        from lkserve.trainer.train import DraftTrainer

        return DraftTrainer(start_dir, loss=self.loss, eta=self.eta, gamma=self.gamma, lr=self.lr,
                            grad_clip=self.grad_clip, num_positions=self.num_positions,
                            train_params=self.train_params, lr_schedule=self.lr_schedule,
                            warmup_steps=self.warmup_steps, total_steps=self.total_steps, precision=self.precision)

    def batch(self, records):
        from lkserve.trainer.examples import build_batch

        return build_batch(records, self.max_context, num_positions=self.num_positions)

    def evaluate(self, model, records):
        from lkserve.trainer.gate import evaluate

        return evaluate(model, records, self.num_positions, self.batch_positions, self.max_context)

    def load(self, path):
        from lkserve.trainer.train import load_draft

        return load_draft(path)

    def copy(self, model):
        from lkserve.trainer.train import copy_model

        return copy_model(model)

    @staticmethod
    def save(model, out_dir: Path, source_dir) -> None:
        dtype = checkpoint_float_dtype(source_dir)
        to_save = model if dtype is None or dtype == model.dtype else copy.deepcopy(model).to(dtype)
        to_save.save_pretrained(str(out_dir), safe_serialization=True)


@dataclass(kw_only=True)
class Eagle3Ops(TrainingKnobs):
    """An EAGLE-3 head (vLLM method "eagle3"): drafts from the target's aux hidden states, which the records must
    carry (CaptureSettings.hidden_states). `target_dir` supplies the frozen token embedding the head shares."""

    target_dir: str

    def trainer(self, start_dir):
        from lkserve.trainer.eagle3 import Eagle3Trainer

        return Eagle3Trainer(self.load(start_dir), loss=self.loss, eta=self.eta, gamma=self.gamma, lr=self.lr,
                             grad_clip=self.grad_clip, num_steps=self.num_positions, max_context=self.max_context,
                             warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule,
                             total_steps=self.total_steps, precision=self.precision)

    def batch(self, records):
        from lkserve.trainer.eagle3 import build_eagle3_batch

        return build_eagle3_batch(records, self.num_positions, self.max_context)

    def evaluate(self, model, records):
        from lkserve.trainer.eagle3 import evaluate_head

        return evaluate_head(model, records, self.num_positions, self.batch_positions, self.max_context)

    def load(self, path):
        from lkserve.models.eagle3 import load_head

        return load_head(path, self.target_dir)

    def copy(self, model):
        return copy.deepcopy(model).eval()

    @staticmethod
    def save(model, out_dir: Path, source_dir) -> None:
        """The base head's config.json (architecture never changes in training; a warm-started production head keeps
        every key of its own) and the trained weights in the base head's dtype."""
        import torch
        from safetensors.torch import save_file

        from lkserve.models.eagle3 import WEIGHTS

        dtype = checkpoint_float_dtype(source_dir) or torch.float32
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.saved_state().items()}
        save_file(state, str(Path(out_dir) / WEIGHTS), metadata={"format": "pt"})
        shutil.copy2(Path(source_dir) / "config.json", Path(out_dir) / "config.json")


def ops_for(settings):
    """The ops of `settings.engine.method`, with the knobs of `settings.trainer` (lkserve.config.Settings)."""
    t, engine = settings.trainer, settings.engine
    common = {"loss": t.loss, "eta": t.eta, "gamma": t.gamma, "lr": t.lr_for(engine.method), "grad_clip": t.grad_clip,
              "num_positions": engine.num_speculative_tokens, "max_context": engine.max_model_len,
              "batch_positions": t.batch_positions, "warmup_steps": t.warmup_steps, "lr_schedule": t.lr_schedule,
              "total_steps": t.total_steps, "precision": t.precision}
    if engine.method == "draft_model":
        return DraftModelOps(train_params=t.train_params, **common)
    if engine.method == "eagle3":
        if not engine.target_model:
            raise ValueError("method='eagle3' needs target_model: the head shares the target's token embedding")
        return Eagle3Ops(target_dir=str(engine.target_model), **common)
    raise ValueError(f"the worker trains method 'draft_model' or 'eagle3', not {engine.method!r}")
