"""Plain results the engine hands to the gateway, the metrics and the worker (no vLLM types)."""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineStopped(RuntimeError):
    """The engine is shutting down: a request it aborted (or refused) for that reason. The gateway answers 503."""


@dataclass
class TokenLogprob:
    """The target model's log-probability of one token at one position, and the most likely tokens there (vLLM's
    default `logprobs_mode=raw_logprobs`: log_softmax of the raw logits, before penalties, temperature, top-k/p)."""

    token_id: int
    token: str  # the token's text as vLLM decodes it alone (byte-fallback pieces corrected from the context)
    logprob: float
    rank: int  # 1 = the most likely token at this position
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), most likely first


@dataclass
class SpecStats:
    """Per-request speculative decoding statistics (from vLLM's per-request 'detailed' metrics)."""

    num_spec_tokens: int
    steps: int
    drafted: int
    accepted: int
    per_step_drafted: list[int] = field(default_factory=list)
    per_step_accepted: list[int] = field(default_factory=list)
    per_position_drafted: list[int] = field(default_factory=list)  # [K]: steps that drafted position j
    per_position_accepted: list[int] = field(default_factory=list)  # [K]: steps that accepted position j

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def verified_positions(self) -> int:
        """Drafted positions the rejection sampler decided on: all accepted ones plus the first rejected one."""
        return sum(min(a + 1, d) for a, d in zip(self.per_step_accepted, self.per_step_drafted))

    @classmethod
    def from_steps(cls, num_spec_tokens: int, histogram: list[int], num_draft_tokens: int,
                   per_step_drafted: list[int], per_step_accepted: list[int]) -> SpecStats:
        """From per-step counts: histogram[j] = steps that accepted exactly j drafts."""
        k = int(num_spec_tokens)
        return cls(num_spec_tokens=k, steps=sum(histogram), drafted=int(num_draft_tokens),
                   accepted=sum(j * c for j, c in enumerate(histogram)),
                   per_step_drafted=list(per_step_drafted), per_step_accepted=list(per_step_accepted),
                   per_position_drafted=[sum(1 for d in per_step_drafted if d > j) for j in range(k)],
                   per_position_accepted=[sum(1 for a in per_step_accepted if a > j) for j in range(k)])
