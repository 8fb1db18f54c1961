"""The adaptation worker: keeps fine-tuning the draft on captured verification records with LK losses, gates
candidates on held-out acceptance, publishes versions, rolls back bad ones. See docs/worker.md.

    from lkserve.trainer import run_worker, Worker, WorkerConfig
    run_worker(settings)                          # what `lkserve worker` calls
"""

from lkserve.drafts import DraftRegistry


def __getattr__(name):  # lazy: importing the registry must not pull in torch/transformers
    if name in ("Worker", "WorkerConfig", "run_worker", "config_from_settings"):
        from lkserve.trainer import worker

        return getattr(worker, name)
    raise AttributeError(name)


__all__ = ["DraftRegistry", "Worker", "WorkerConfig", "config_from_settings", "run_worker"]
