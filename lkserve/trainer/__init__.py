"""The adaptation worker: keeps fine-tuning the draft on captured verification records with LK losses, gates
candidates on held-out acceptance, publishes versions, rolls back bad ones. See docs/worker.md.

    from lkserve.trainer import run_worker, Worker
    run_worker(settings)                          # what `lkserve worker` calls
    Worker(settings).run()                        # settings.redis.url and settings.engine.draft_model set
"""

from lkserve.drafts import DraftRegistry


def __getattr__(name):  # lazy: importing the registry must not pull in torch/transformers
    if name in ("Worker", "run_worker", "resolve_models"):
        from lkserve.trainer import worker

        return getattr(worker, name)
    raise AttributeError(name)


__all__ = ["DraftRegistry", "Worker", "resolve_models", "run_worker"]
