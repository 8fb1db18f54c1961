"""The recommended K in /metrics: per draft version, from the last ~k_window_steps verification steps' acceptance
per position (lkserve.metrics.serving.recent_position_counts) and the engine's step-cost model
(lkserve.engine.spec_k). Computed at scrape time (a few dozen float operations per version).

    lkserve_spec_recommended_k{version}            argmax_K E[tokens | K] / cost(K), K in 1..num_speculative_tokens
    lkserve_spec_expected_speedup{version}         that K's expected tokens/s over no speculation's (< 1: turn it off)
    lkserve_spec_expected_tokens_per_step{version} E[tokens | K] at that K
    lkserve_spec_conditional_acceptance{version, position}  the measured alpha_j (0-based position) it used
    lkserve_spec_window_steps{version}             steps in the window
    lkserve_spec_k                                 K the engine drafts per step now (engine.adaptive_k moves it)
    lkserve_spec_step_cost_seconds{k}              cost(K) the policy prices with: the engine's measured seconds per
                                                   decode-only step where it has them (k="0": the prior's, scaled)
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

from lkserve.engine.spec_k import StepCost, choose_k_from_counts, conditional_alphas, cost_for
from lkserve.metrics import serving


class KPolicyCollector:
    def __init__(self):
        self.cost: StepCost | None = None
        self.k_max = 0
        self.min_drafted = 50
        self.decay = 1.0
        self.engine = None

    def configure(self, engine_settings, engine=None) -> None:
        """From EngineSettings (the engine's own, where it has them): cost model, Kmax, window."""
        self.cost = cost_for(engine_settings)
        self.k_max = int(engine_settings.num_speculative_tokens)
        self.min_drafted = int(engine_settings.k_min_drafted)
        self.decay = float(engine_settings.k_decay)
        serving.set_window(engine_settings.k_window_steps)
        self.engine = engine

    def current_cost(self) -> StepCost | None:
        """The engine's cost(K) (measured step times where it has them), else the configured model."""
        return getattr(self.engine, "step_cost", None) or self.cost

    def choices(self) -> dict[str, tuple]:
        """{version: (KChoice | None, steps, measured alphas)} for the versions with recent counts."""
        out = {}
        cost = self.current_cost()
        if cost is None or self.k_max < 1:
            return out
        for version in serving.window_versions():
            steps, drafted, accepted = serving.recent_position_counts(version)
            choice = choose_k_from_counts(drafted, accepted, cost, self.k_max, self.min_drafted, self.decay)
            out[version] = (choice, steps, conditional_alphas(drafted, accepted, self.min_drafted))
        return out

    def collect(self):
        k = GaugeMetricFamily("lkserve_spec_recommended_k", "K maximising expected tokens/s (E[tokens|K]/cost(K)) "
                              "from recent acceptance per position and the step-cost model", labels=["version"])
        speedup = GaugeMetricFamily("lkserve_spec_expected_speedup", "Expected tokens/s at the recommended K over "
                                    "no speculation's (< 1: speculation does not pay)", labels=["version"])
        tokens = GaugeMetricFamily("lkserve_spec_expected_tokens_per_step", "E[tokens per step] at the "
                                   "recommended K", labels=["version"])
        alpha = GaugeMetricFamily("lkserve_spec_conditional_acceptance", "Recent P(position accepted | earlier "
                                  "positions accepted), 0-based position", labels=["version", "position"])
        steps_fam = GaugeMetricFamily("lkserve_spec_window_steps", "Verification steps in the recent window the "
                                      "recommendation reads", labels=["version"])
        for version, (choice, steps, alphas) in self.choices().items():
            steps_fam.add_metric([version], float(steps))
            for j, a in enumerate(alphas):
                alpha.add_metric([version, str(j)], a)
            if choice is not None:
                k.add_metric([version], float(choice.k))
                speedup.add_metric([version], choice.speedup)
                tokens.add_metric([version], choice.expected_tokens)
        yield from (k, speedup, tokens, alpha, steps_fam)
        now = GaugeMetricFamily("lkserve_spec_k", "Draft tokens per step the engine drafts now")
        current = getattr(self.engine, "spec_k", None)
        if current is not None:
            now.add_metric([], float(current))
        yield now
        cost_fam = GaugeMetricFamily("lkserve_spec_step_cost_seconds", "Seconds per decode-only engine step at K "
                                     "that the K policy prices with: measured where the engine served at K "
                                     "(k=0: the prior's no-speculation step, scaled)", labels=["k"])
        cost = self.current_cost()
        for k, ms in sorted((cost.measured if cost is not None else {}).items()):
            cost_fam.add_metric([str(k)], ms / 1000.0)
        yield cost_fam

    def summary(self, version: str | None) -> dict | None:
        """The dashboard's view of one version: recommended K, expected speedup, alphas, K drafted now, and the
        step costs it prices with (measured ms per step by K)."""
        if version is None:
            return None
        entry = self.choices().get(version)
        current = getattr(self.engine, "spec_k", None)
        cost = self.current_cost()
        step_ms = {str(k): ms for k, ms in sorted(cost.measured.items()) if k > 0} if cost is not None else {}
        if entry is None:
            return {"version": version, "k": None, "speedup": None, "expected_tokens": None, "alphas": [],
                    "window_steps": 0, "current_k": current, "speedup_by_k": {}, "step_cost_ms": step_ms}
        choice, steps, alphas = entry
        return {"version": version, "k": choice.k if choice else None, "speedup": choice.speedup if choice else None,
                "expected_tokens": choice.expected_tokens if choice else None, "alphas": alphas,
                "window_steps": steps, "current_k": current,
                "speedup_by_k": {str(k): v for k, v in choice.speedup_by_k.items()} if choice else {},
                "step_cost_ms": step_ms}


K_POLICY = KPolicyCollector()
REGISTRY.register(K_POLICY)
