"""Draft hot-swap without vLLM: validate a candidate checkpoint against the live draft, keep the last good weights
for rollback, refuse tensors the draft shares with the target. The reload itself is `engine/vllm/reload.py`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lkserve.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_finite,
    safetensors_meta,
    validate_files,
)

logger = logging.getLogger("lkserve.engine")


class SwapError(Exception):
    pass


def shared_with_target(draft, target) -> set[str]:
    """Names of draft parameters that ARE target parameters (same storage), e.g. an EAGLE-3 head's embed_tokens
    (vLLM shares the target's when the head has none). Names in checkpoint form too (no leading model.)."""
    if target is None:
        return set()
    ptrs = {p.data_ptr() for p in target.parameters() if p.numel()}
    out = set()
    for name, p in draft.named_parameters(remove_duplicate=False):
        if p.numel() and p.data_ptr() in ptrs:
            out.add(name)
            out.add(name.removeprefix("model."))
    return out


def check_not_shared(state_dict: dict, shared: set[str]) -> None:
    """Loading a tensor the draft shares with the target would overwrite the TARGET's weights."""
    clash = sorted(n for n in state_dict
                   if any(n == s or n.endswith("." + s) or s.endswith("." + n) for s in shared))
    if clash:
        raise SwapError(f"checkpoint writes tensors the draft shares with the target: {clash[:3]}")


class DraftSwapper:
    """Validates a draft checkpoint against the live draft's layout (taken from `base_path`, the checkpoint the
    engine started with), then hands its state dict to `apply`; on a failed apply, re-applies the last good one."""

    def __init__(self, base_path: Path | None, version: str, serving_dtype=None):
        self.base_path = base_path
        self.version = version
        self.serving_dtype = serving_dtype  # float tensors are cast to it (vLLM's loader casts at start-up too)
        self.sha256 = None
        self.ref_meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self.ref_config: dict[str, Any] = {}
        self.last_good: dict | None = None  # HF-layout state dict of the version now serving (for rollback)
        self.history: list[dict[str, Any]] = []
        if base_path is not None and base_path.is_dir():
            self.ref_meta = safetensors_meta(base_path)
            self.sha256 = checkpoint_sha256(base_path)
            cfg = base_path / "config.json"
            if cfg.exists():
                self.ref_config = json.loads(cfg.read_text())

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "base_path": str(self.base_path),
                "num_tensors": len(self.ref_meta), "swaps": len(self.history)}

    def validate(self, path: Path, sha256: str | dict | None) -> tuple[dict, str]:
        """(state dict in the serving dtype, checkpoint sha256); raises CheckpointError for a file not to serve."""
        actual = validate_files(Path(path), sha256, self.ref_meta, self.ref_config)
        return load_finite(Path(path), self.serving_dtype), actual

    def swap(self, path: str, version: str, sha256, apply: Callable[[dict], None] | None,
             before_apply: Callable[[], None] | None = None) -> dict[str, Any]:
        """Never raises for a bad checkpoint: the old weights keep serving and the result says why.
        `apply` None: the engine has no draft model."""
        t0 = time.perf_counter()
        res = {"ok": False, "version": self.version, "requested_version": version, "sha256": self.sha256,
               "reason": "", "seconds": 0.0, "validate_seconds": 0.0, "apply_seconds": 0.0}
        try:
            if apply is None:
                raise SwapError("this engine has no draft model (method is not draft_model or eagle3)")
            sd, actual = self.validate(Path(path), sha256)
            t1 = time.perf_counter()
            res["validate_seconds"] = t1 - t0
            if self.last_good is None and self.base_path is not None:
                self.last_good = load_finite(self.base_path)
            if before_apply is not None:
                before_apply()
            self._apply_or_roll_back(apply, sd)
            res["apply_seconds"] = time.perf_counter() - t1
            self.last_good = sd
            self.version, self.sha256 = version, actual
            res.update(ok=True, version=version, sha256=actual, reason="ok")
        except (SwapError, CheckpointError) as e:
            res["reason"] = str(e)
        except Exception as e:
            res["reason"] = f"unexpected error: {e!r}"
            logger.exception("lkserve: draft swap failed")
        res["seconds"] = time.perf_counter() - t0
        self.history.append({k: res[k] for k in ("ok", "version", "requested_version", "reason", "seconds")})
        del self.history[:-50]
        return res

    def _apply_or_roll_back(self, apply: Callable[[dict], None], sd: dict) -> None:
        try:
            apply(sd)
        except Exception as e:
            rollback = "no backup"
            if self.last_good:
                try:
                    apply(self.last_good)
                    rollback = "rolled back"
                except Exception as e2:  # noqa: BLE001
                    rollback = f"rollback failed: {e2!r}"
            raise SwapError(f"reload failed ({e!r}); {rollback}") from e

