"""Acceptance counting with vLLM's definitions (docs/contracts.md, "Acceptance metrics").

D drafts; A_k = drafts whose positions 0..k were all accepted; p_k = A_k / D (unconditional);
c_k = p_k / p_{k-1} (conditional, p_{-1} = 1); acceptance length AL = tau = 1 + sum_k p_k.
The teacher-forced simulation feeds per-row hits hit_k(t) (step k's argmax equals the reference token);
a draft is accepted up to the first miss, so A_k counts rows with hit_0..hit_k all true.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def step_weights(num_steps: int, beta: float) -> list[float]:
    """FastMTP Eq. 2: alpha_k = beta^k / sum_j beta^j (beta 0.6, K 3 -> 0.5102, 0.3061, 0.1837)."""
    raw = [beta**k for k in range(num_steps)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class AcceptanceCounts:
    num_steps: int
    drafts: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # A_k, length num_steps

    def __post_init__(self) -> None:
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.num_steps

    @classmethod
    def from_hits(cls, hits: torch.Tensor, valid: torch.Tensor | None = None) -> AcceptanceCounts:
        """hits [K, N] bool (step k right at draft n); valid [N] bool selects which rows are drafts."""
        hits = hits.bool()
        if valid is not None:
            hits = hits[:, valid.bool()]
        chained = torch.cumprod(hits.to(torch.int64), dim=0)  # 1 while every earlier step also hit
        return cls(
            num_steps=hits.shape[0], drafts=int(hits.shape[1]), accepted_per_position=chained.sum(dim=1).tolist()
        )

    @classmethod
    def from_accept_lengths(cls, num_steps: int, accepted: list[int]) -> AcceptanceCounts:
        """From real speculative decoding: accepted[i] = number of draft tokens accepted at verification i."""
        per_pos = [sum(1 for a in accepted if a > k) for k in range(num_steps)]
        return cls(num_steps=num_steps, drafts=len(accepted), accepted_per_position=per_pos)

    def merge(self, other: AcceptanceCounts) -> AcceptanceCounts:
        if other.num_steps != self.num_steps:
            raise ValueError(f"cannot merge acceptance counts of K={self.num_steps} and K={other.num_steps}")
        return AcceptanceCounts(
            self.num_steps,
            self.drafts + other.drafts,
            [a + b for a, b in zip(self.accepted_per_position, other.accepted_per_position)],
        )

    @property
    def unconditional(self) -> list[float]:
        """p_k = A_k / D."""
        if self.drafts == 0:
            return [0.0] * self.num_steps
        return [a / self.drafts for a in self.accepted_per_position]

    @property
    def conditional(self) -> list[float]:
        """c_k = p_k / p_{k-1}, with p_{-1} = 1 (0 where p_{k-1} = 0)."""
        out, prev = [], 1.0
        for p in self.unconditional:
            out.append(p / prev if prev > 0 else 0.0)
            prev = p
        return out

    @property
    def acceptance_length(self) -> float:
        """AL = tau = 1 + sum_k p_k (counts the bonus token)."""
        return 1.0 + sum(self.unconditional)

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "drafts": self.drafts,
            "accepted_per_position": list(self.accepted_per_position),
            "p": self.unconditional,
            "conditional": self.conditional,
            "acceptance_length": self.acceptance_length,
        }
