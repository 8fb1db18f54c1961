"""One call that makes the default models ready: what `lkserve models prepare` and the demo use."""

from __future__ import annotations

import os
from pathlib import Path

from lkserve.models.draft import DEFAULT_NUM_LAYERS, derive_draft, draft_dir_for
from lkserve.models.smollm2 import TARGET_NAME, prepare_target


def prepare_default_models(
    cache_dir: str | os.PathLike, num_draft_layers: int = DEFAULT_NUM_LAYERS
) -> tuple[Path, Path]:
    """Convert SmolLM2-135M-Instruct (once) and derive the initial draft (once); return both directories.

    `<cache_dir>/models/SmolLM2-135M-Instruct` and `<cache_dir>/models/SmolLM2-135M-Instruct-draft-L2`.
    About 25 s the first time, milliseconds afterwards.
    """
    target_dir = prepare_target(cache_dir)
    draft_dir = derive_draft(
        target_dir, draft_dir_for(cache_dir, TARGET_NAME, num_draft_layers), num_layers=num_draft_layers
    )
    return target_dir, draft_dir
