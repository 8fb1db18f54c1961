"""Draft weights into a running vLLM worker: the layerwise reload (a plain `load_weights` fails on CPU, where
layers repack their weights) and what the swapper needs to know of the live draft."""

from __future__ import annotations

from pathlib import Path

from lkserve.engine.swap import DraftSwapper, SwapError, check_not_shared, shared_with_target


def make_swapper(worker, version: str) -> DraftSwapper:
    """A swapper whose reference layout is the draft checkpoint the engine started with."""
    spec = worker.vllm_config.speculative_config
    cfg = getattr(spec, "draft_model_config", None) if spec is not None else None
    base = Path(cfg.model) if cfg is not None else None
    return DraftSwapper(base, version, serving_dtype=getattr(cfg, "dtype", None))


def has_draft(worker) -> bool:
    return worker.model_runner.get_draft_model() is not None


def reload_draft(worker, state_dict: dict) -> None:
    """Load an HF-layout state dict into the live draft, layer by layer, between two engine steps."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_draft_model()
    if model is None:
        raise SwapError("this engine has no draft model")
    # EAGLE-3: vLLM shares the target's embedding (and lm_head, when the head's equals it at start-up) with the head
    check_not_shared(state_dict, shared_with_target(model, runner.get_model()))
    draft_cfg = worker.vllm_config.speculative_config.draft_model_config
    with set_current_vllm_config(worker.vllm_config), torch.no_grad():
        initialize_layerwise_reload(model)
        model.load_weights(iter(state_dict.items()))
        finalize_layerwise_reload(model, draft_cfg)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            raise SwapError(f"non-finite live parameter after reload: {name}")
