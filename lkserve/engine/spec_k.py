"""Choosing K (draft tokens per step) by measurement: the K that maximises expected tokens per second.

    E[tokens | K] = 1 + sum_{i<=K} prod_{j<=i} alpha_j        (alpha_j: P(position j accepted | 1..j-1 accepted))
    cost(K)       = c0 + c_draft*K + c_verify*(K+1)            (seconds per step; K=0 is no speculation)
    best K        = argmax_{1<=K<=Kmax} E[tokens | K] / cost(K);  speedup = that over 1 / cost(0)

cost(K) is measured where the engine has served at K (`cost_from_steps`: its own seconds per decode-only step, at
the batch size it serves most, each K against the most-served K's steps from the same stretch of time), with the
linear model as the prior for the K it has not; the engine probes a neighbouring K now and then so that the best K
is always measured, not extrapolated, and leaves the serving K for another measured one only when the gain exceeds
the noise of their measured costs (`worth_moving`).

What the serving counters give is not alpha_j. vLLM (and lkserve_spec_*_tokens_total{position}) count, per draft
position j, how often j was drafted and how often j was accepted; accepting j needs 1..j-1 accepted too, so
accepted_j / drafted_j = P(1..j all accepted) = prod_{i<=j} alpha_i already. `conditional_alphas` divides
neighbours to get alpha_j back (feeding the cumulative rates into the product would count the earlier positions
twice and pick too small a K).

Beyond the measured positions (j > the K the engine drafts now, or positions with fewer than `min_drafted` drafts),
alpha_j is extrapolated by holding the last measured conditional alpha (optionally times `decay` per extra
position): a draft that keeps 0.8 of its drafts at position 4 given 1..3 is assumed to keep 0.8 at 5 and 6 too.
That is optimistic when acceptance falls with depth (it usually does a little), so raising K above what was
measured should be re-checked once the engine drafts there; lowering K needs no extrapolation.

Pure Python (no vLLM, no torch): the gateway computes it per scrape, the engine applies it at a draft swap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepCost:
    """Seconds (or ms: only ratios matter) of one engine step with K drafts. `measured` {K: cost} wins over the
    linear model where it has K (K=0: a step without speculation)."""

    c0: float
    c_draft: float
    c_verify: float
    measured: Mapping[int, float] = field(default_factory=dict)
    spread: Mapping[int, float] = field(default_factory=dict)  # relative standard error of a measured K's cost

    def __call__(self, k: int) -> float:
        if k in self.measured:
            return float(self.measured[k])
        return self.c0 + self.c_draft * k + self.c_verify * (k + 1)


# Per-step milliseconds on this 2-core CPU, SmolLM2-135M target, bf16, eager, 1 stream (bench/step_cost.py,
# step_cost.json of 2026-12-03, K=4): no speculation 33.6 ms a step; the 2-layer draft 21.0 ms of drafting for 4
# passes (5.25 ms a pass, its 49k-vocabulary head half of it), the EAGLE-3 head 9.2 ms (2.3 ms a pass). Verifying
# 5 tokens instead of 1 cost no measurable time at 1 stream and 3.1 ms per extra position at 4 streams: 1 ms taken.
DEFAULT_COST_MS: dict[str, StepCost] = {
    "draft_model": StepCost(c0=32.6, c_draft=5.25, c_verify=1.0),
    "eagle3": StepCost(c0=32.6, c_draft=2.3, c_verify=1.0),
    "ngram": StepCost(c0=32.6, c_draft=0.04, c_verify=1.0),
}


def cost_from_profile(profile: Mapping, method: str, streams: str = "1_stream") -> StepCost:
    """A StepCost from bench/step_cost.py's JSON: c_draft = drafting_ms / K, c_verify = extra verification ms per
    extra verified position (over no_spec's, >= 0), c0 = no_spec's step minus one verified position."""
    k = int(profile["config"]["k"])
    plain, spec = profile["no_spec"][streams], profile[method][streams]
    c_draft = float(spec["drafting_ms"]) / k
    c_verify = max(0.0, (float(spec["verification_ms"]) - float(plain["verification_ms"])) / k)
    c0 = float(plain["step_ms"]) - c_verify
    return StepCost(c0=c0, c_draft=c_draft, c_verify=c_verify,
                    measured={0: float(plain["step_ms"]), k: float(spec["step_ms"])})


def cost_for(settings) -> StepCost | None:
    """The step-cost model an EngineSettings names: step_cost_file (bench/step_cost.py JSON, 1 stream), else
    step_cost_ms, else DEFAULT_COST_MS[method]; None for method "none"."""
    method = settings.method
    if method == "none":
        return None
    if settings.step_cost_file is not None:
        return cost_from_profile(json.loads(Path(settings.step_cost_file).read_text()), method)
    if settings.step_cost_ms:
        c = settings.step_cost_ms
        return StepCost(c0=float(c["c0"]), c_draft=float(c["c_draft"]), c_verify=float(c["c_verify"]))
    return DEFAULT_COST_MS.get(method, DEFAULT_COST_MS["draft_model"])


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and relative standard error of the mean."""
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, (var / len(xs)) ** 0.5 / m


def paired_ratio(samples: Sequence[Sequence[float]], ref: Sequence[Sequence[float]],
                 min_steps: int) -> tuple[float, float] | None:
    """A K's seconds per step over the reference K's on the reference steps that ran in the same stretch of time
    ([age_s, seconds] pairs; the samples' own span and as long again on either side): on a machine whose load moves,
    two Ks timed minutes apart differ by more than their costs do. Returns (ratio, its relative standard error), or
    None with fewer than min_steps reference steps in that stretch."""
    ages = [a for a, _ in samples]
    lo, hi = min(ages), max(ages)
    w = max(hi - lo, 1.0)
    local = [s for a, s in ref if lo - w <= a <= hi + w]
    if len(local) < min_steps:
        return None
    (m, se), (mr, ser) = _mean_se([s for _, s in samples]), _mean_se(local)
    return m / mr, (se ** 2 + ser ** 2) ** 0.5


def cost_from_steps(rows: Sequence[Mapping], prior: StepCost, min_steps: int = 20) -> StepCost:
    """cost(K) from the engine's own step times (lkserve_step_costs rows: k, batch, steps, mean_s, samples), at the
    batch size the traffic ran most steps at. The K with the most steps is the reference, at its mean; another K
    costs the reference's mean times its `paired_ratio` where their steps overlap in time (its own mean where they
    do not). Between and beyond the measured Ks a line fitted through them (one measured K: the prior scaled to
    it). cost(0) is never measured while speculating: the prior's, scaled by measured over prior at the measured
    K (it only moves the reported speedup, not the best K). Returns `prior` while no K has min_steps steps."""
    steps_at: dict[int, int] = {}
    by_batch: dict[int, dict[int, Mapping]] = {}
    for r in rows:
        b = int(r["batch"])
        steps_at[b] = steps_at.get(b, 0) + int(r["steps"])
        if int(r["steps"]) >= min_steps:
            by_batch.setdefault(b, {})[int(r["k"])] = r
    if not by_batch:
        return prior
    at = by_batch[max(by_batch, key=lambda b: (steps_at[b], b))]
    ref = max(at, key=lambda k: (int(at[k]["steps"]), k))
    measured = {k: float(r["mean_s"]) * 1000.0 for k, r in at.items()}
    spread = {k: _mean_se([s for _, s in r["samples"]])[1] for k, r in at.items() if r.get("samples")}
    for k, r in at.items():
        pr = paired_ratio(r["samples"], at[ref]["samples"], min_steps) if k != ref and r.get("samples") else None
        if pr is not None:
            measured[k], spread[k] = measured[ref] * pr[0], pr[1]
    ks = sorted(measured)
    scale = sum(measured[k] / prior(k) for k in ks) / len(ks)
    if len(ks) == 1:  # the prior's shape at this machine's speed now
        return StepCost(c0=prior.c0 * scale, c_draft=prior.c_draft * scale, c_verify=prior.c_verify * scale,
                        measured={0: prior(0) * scale, **measured}, spread=spread)
    mk = sum(ks) / len(ks)
    mc = sum(measured[k] for k in ks) / len(ks)
    slope = max(0.0, sum((k - mk) * (measured[k] - mc) for k in ks) / sum((k - mk) ** 2 for k in ks))
    return StepCost(c0=mc - slope * mk, c_draft=slope, c_verify=0.0, measured={0: prior(0) * scale, **measured},
                    spread=spread)


def conditional_alphas(drafted: Sequence[int], accepted: Sequence[int], min_drafted: int = 1) -> list[float]:
    """Per-position counters (0-based: drafted[j] steps drafted position j, accepted[j] accepted it) -> alpha_j =
    P(j accepted | 0..j-1 accepted), for the leading positions with at least `min_drafted` drafts (the list stops
    at the first position with fewer). Estimated as r_j / r_{j-1}, r_j = accepted[j] / drafted[j]: steps that
    draft fewer positions (the end of a request, max_model_len) then do not bias it."""
    out: list[float] = []
    prev = 1.0
    for d, a in zip(drafted, accepted):
        if d < max(1, min_drafted):
            break
        r = min(1.0, a / d)
        out.append(min(1.0, r / prev) if prev > 0 else 0.0)
        prev = r
    return out


def extend_alphas(alphas: Sequence[float], k_max: int, decay: float = 1.0) -> list[float]:
    """alpha_1..alpha_k_max from the measured leading ones: hold the last (times `decay` per extra position)."""
    out = [float(a) for a in alphas[:k_max]]
    if not out:
        raise ValueError("no measured position to extrapolate from")
    while len(out) < k_max:
        out.append(max(0.0, min(1.0, out[-1] * decay)))
    return out


def expected_tokens(alphas: Sequence[float], k: int) -> float:
    """E[tokens emitted by one step | K=k] = 1 + sum_{i<=k} prod_{j<=i} alpha_j (the bonus/recovered token + the
    accepted prefix). alphas: conditional, at least k of them."""
    total, run = 1.0, 1.0
    for a in alphas[:k]:
        run *= a
        total += run
    return total


@dataclass(frozen=True)
class KChoice:
    k: int  # the best K in 1..k_max
    speedup: float  # its expected tokens/s over no speculation's (< 1: not speculating is better)
    expected_tokens: float  # E[tokens | k] per step
    alphas: list[float]  # conditional alpha_1..alpha_k_max used (measured, then extrapolated)
    measured_positions: int  # how many of them were measured
    speedup_by_k: dict[int, float]  # every K's expected tokens/s over no speculation's

    @property
    def speculate(self) -> bool:
        return self.speedup > 1.0


def choose_k(alphas: Sequence[float], cost: StepCost, k_max: int, decay: float = 1.0) -> KChoice:
    """The K in 1..k_max maximising E[tokens | K] / cost(K), from conditional alphas (measured leading ones; the
    rest extrapolated, see `extend_alphas`). Ties go to the smaller K."""
    if k_max < 1:
        raise ValueError("k_max must be >= 1")
    full = extend_alphas(alphas, k_max, decay)
    base = 1.0 / cost(0)
    by_k = {k: expected_tokens(full, k) / cost(k) / base for k in range(1, k_max + 1)}
    best = max(by_k, key=lambda k: (by_k[k], -k))
    return KChoice(k=best, speedup=by_k[best], expected_tokens=expected_tokens(full, best), alphas=full,
                   measured_positions=min(len(alphas), k_max), speedup_by_k=by_k)


def worth_moving(choice: KChoice, cost: StepCost, current: int | None, sigmas: float) -> bool:
    """Whether to leave the serving K for choice.k: always, unless both Ks are measured (cost.spread has them) and
    the expected gain is within `sigmas` standard errors of their step-cost difference, which on a shared machine
    is most small differences. A K never measured is a move worth making once (it gets measured)."""
    if current is None or choice.k == current or current not in choice.speedup_by_k:
        return True
    if sigmas <= 0 or choice.k not in cost.spread or current not in cost.spread:
        return True
    gain = choice.speedup_by_k[choice.k] / choice.speedup_by_k[current] - 1.0
    return gain > sigmas * (cost.spread[choice.k] ** 2 + cost.spread[current] ** 2) ** 0.5


def choose_k_from_counts(drafted: Sequence[int], accepted: Sequence[int], cost: StepCost, k_max: int,
                         min_drafted: int = 50, decay: float = 1.0) -> KChoice | None:
    """`choose_k` from per-position counters; None while position 0 has fewer than `min_drafted` drafts."""
    alphas = conditional_alphas(drafted, accepted, min_drafted)
    if not alphas:
        return None
    return choose_k(alphas, cost, k_max, decay)
