"""`worker_extension_cls`: vLLM mixes `LkserveWorkerExtension` into its worker class; every method name starts with
lkserve_ and is called with `collective_rpc`. Arguments and results are plain data (tensors do not survive the trip
between processes)."""

from __future__ import annotations

import functools
import logging
import os
import threading

from lkserve.capture.accumulator import CaptureState
from lkserve.capture.record import record_to_wire
from lkserve.capture.sink import make_capture_sink
from lkserve.config import CaptureSettings
from lkserve.engine.vllm import draft_probs, hooks, patches, reload, spec_k, timing

logger = logging.getLogger("lkserve.engine")


class LkserveWorkerExtension:
    """`self` is vLLM's worker (`self.model_runner`, `self.vllm_config`)."""

    def _lkserve_init(self) -> None:
        if getattr(self, "_lkserve_ready", False):
            return
        patches.check_vllm_version()
        patches.apply_cpu_fixes()  # plugins already did it in this process; idempotent
        patches.apply_empty_draft_fix()
        draft_probs.apply_placeholder_fix()  # after vLLM registered its CPU kernels (worker init)
        draft_probs.install_placeholder_rows(self.model_runner)
        self._lkserve_lock = threading.RLock()
        self._lkserve_capture: CaptureState | None = None
        self._lkserve_swapper = reload.make_swapper(self, version="base")
        timing.install_inner(self.model_runner)  # LKSERVE_STEP_TIMING=1 only; the parts, inside the capture hooks
        hooks.install_runner_hooks(self)
        timing.install_outer(self.model_runner)  # the two step halves, outside them
        if spec_k.k_max(self.model_runner):
            spec_k.install_k_limit(self.model_runner)
            spec_k.install_step_clock(self.model_runner)  # outermost: a step's whole time, capture included
        self._lkserve_ready = True

    def _lkserve_lookup(self):
        return functools.partial(hooks.request_info, self.model_runner)

    def lkserve_configure_capture(self, settings: dict, sink: dict | None = None, model_id: str = "",
                                  seed: int = 0, initial_version: str | None = None) -> dict:
        """`settings`: CaptureSettings.model_dump(); `sink`: a `make_sink` spec (None: a memory sink)."""
        self._lkserve_init()
        capture = CaptureSettings.model_validate(settings)
        with self._lkserve_lock:
            old = self._lkserve_capture
            if old is not None:
                old.flush_all(self._lkserve_lookup())
                try:
                    old.sink.close()
                except Exception as e:  # noqa: BLE001
                    logger.debug("lkserve: closing the previous sink failed: %r", e)
            swapper = self._lkserve_swapper
            if initial_version and not swapper.history:
                swapper.version = initial_version
            self._lkserve_capture = CaptureState(capture, make_capture_sink(sink, capture.queue_size),
                                                 model_id=model_id, seed=seed, draft_version=swapper.version)
            return self.lkserve_info()

    def lkserve_set_capture(self, enabled: bool, sample_rate: float | None = None) -> dict:
        self._lkserve_init()
        with self._lkserve_lock:
            cap = self._lkserve_capture
            if cap is None:
                return {"ok": False, "reason": "capture not configured"}
            if sample_rate is not None and not 0.0 <= float(sample_rate) <= 1.0:
                return {"ok": False, "reason": "sample_rate must be in [0, 1]", **cap.info()}
            cap.set_enabled(enabled, sample_rate, self._lkserve_lookup())
            return {"ok": True, **cap.info()}

    def lkserve_drain_capture(self, finished: list[str] | None = None) -> list[dict]:
        """Records held by a memory sink. `finished`: external ids of requests the caller saw finish; their
        records are flushed now (vLLM only tells the worker about finished requests at the next step, and this RPC
        may run before it)."""
        self._lkserve_init()
        cap = self._lkserve_capture
        if cap is None:
            return []
        if finished:
            with self._lkserve_lock:
                cap.finish_external(finished, self._lkserve_lookup())
        if not hasattr(cap.sink, "drain"):
            return []
        return [record_to_wire(r) for r in cap.sink.drain()]

    def lkserve_swap_draft(self, path: str, version: str, sha256: str | dict | None = None) -> dict:
        self._lkserve_init()
        with self._lkserve_lock:
            cap = self._lkserve_capture

            def before_apply():
                # records carry one draft version: close what the old weights verified
                if cap is not None:
                    cap.flush_all(self._lkserve_lookup())

            apply = functools.partial(reload.reload_draft, self) if reload.has_draft(self) else None
            res = self._lkserve_swapper.swap(path, version, sha256, apply, before_apply=before_apply)
            if res["ok"] and cap is not None:
                cap.draft_version = res["version"]
            level = logging.INFO if res["ok"] else logging.WARNING
            logger.log(level, "lkserve: draft swap to %s: %s (%.3fs)", version, res["reason"], res["seconds"])
            return res

    def lkserve_set_spec_k(self, k: int | None) -> dict:
        """Draft at most k tokens per step from the next step on (None: the configured K)."""
        self._lkserve_init()
        with self._lkserve_lock:
            res = spec_k.set_k_limit(self.model_runner, k)
        logger.info("lkserve: spec K -> %s: %s", res.get("k"), res["reason"])
        return res

    def lkserve_step_costs(self, max_age_s: float | None = None, reset: bool = False) -> list[dict]:
        """Measured seconds per decode-only step by (K, batch size): cost(K) for the K policy; reset: forget them."""
        self._lkserve_init()
        if reset:
            spec_k.reset_step_costs(self.model_runner)
        return spec_k.step_costs(self.model_runner, max_age_s)

    def lkserve_draft_info(self) -> dict:
        self._lkserve_init()
        return self._lkserve_swapper.info()

    def lkserve_info(self) -> dict:
        self._lkserve_init()
        cap = self._lkserve_capture
        return {
            "pid": os.getpid(),
            "vllm_version": patches.vllm_version(),
            **patches.fix_states(),
            "placeholder_fix": dict(draft_probs.placeholder_state),
            "draft_probs_fix": dict(self.model_runner._lkserve_draft_probs),
            "draft": self._lkserve_swapper.info(),
            "capture": cap.info() if cap is not None else None,
            "aux_hidden_state_layers": hooks.aux_layers(self.model_runner),
            "step_timing": timing.snapshot(self.model_runner),  # None unless LKSERVE_STEP_TIMING=1
            "spec_k": spec_k.k_info(self.model_runner),
            "step_costs": [{k: v for k, v in r.items() if k != "samples"} for r in spec_k.step_costs(self.model_runner)],
        }
