"""One call that makes the default models ready: what `lkserve models prepare` and the demo use."""

from __future__ import annotations

import os
from pathlib import Path

from lkserve.models.draft import DEFAULT_NUM_LAYERS, derive_draft, draft_dir_for
from lkserve.models.smollm2 import TARGET_NAME, prepare_target

# The default EAGLE-3 head's draft vocabulary: the most frequent target ids (measured on SmolLM2, the head ran at
# 61.6 tok/s with 8,192 ids against 57.4 with all 49,152; docs/eagle3.md)
DEFAULT_HEAD_VOCAB = 8192


def prepare_default_models(
    cache_dir: str | os.PathLike, num_draft_layers: int = DEFAULT_NUM_LAYERS, method: str = "draft_model"
) -> tuple[Path, Path]:
    """Convert SmolLM2-135M-Instruct (once) and derive the initial draft (once); return both directories.

    `<cache_dir>/models/SmolLM2-135M-Instruct` and `<cache_dir>/models/SmolLM2-135M-Instruct-draft-L2`, or with
    method="eagle3" a new (untrained) EAGLE-3 head `<cache_dir>/models/SmolLM2-135M-Instruct-eagle3-v8192-prompts`
    instead of the draft model (its vocabulary counted on the MT-bench + HumanEval prompts: `-prompts`, so a head a
    cache built on the old stdlib vocabulary is never reused). About 25 s the first time, milliseconds afterwards.
    """
    target_dir = prepare_target(cache_dir)
    if method == "eagle3":
        import torch

        from lkserve.models.eagle3 import build_eagle3_head

        head_dir = Path(cache_dir) / "models" / f"{TARGET_NAME}-eagle3-v{DEFAULT_HEAD_VOCAB}-prompts"
        return target_dir, build_eagle3_head(target_dir, head_dir, seed=0, draft_vocab_size=DEFAULT_HEAD_VOCAB,
                                             dtype=torch.bfloat16)
    draft_dir = derive_draft(
        target_dir, draft_dir_for(cache_dir, TARGET_NAME, num_draft_layers), num_layers=num_draft_layers
    )
    return target_dir, draft_dir
