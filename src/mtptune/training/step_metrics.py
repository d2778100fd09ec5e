"""Per-step training/validation metrics, kept as sums so they add across micro-batches and ranks exactly.

Per step k: supervised tokens, CE / KL / TV sums, accuracy against the dataset label and against the verifier's
greedy token, and the teacher-forced acceptance simulation of contracts e: a draft at row t is accepted up to
the first step whose argmax differs from the verifier's greedy reference `argmax W_lm h_{t+k+1}`;
tau_sim = 1 + sum_k P(hit_0 .. hit_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtptune.metrics.acceptance import AcceptanceCounts

_FIELDS = (
    "tokens",
    "ce",
    "kl",
    "tv",
    "correct_label",
    "correct_verifier",
    "verifier_label_agree",
    "accepted",
    "ref_tokens",  # tokens compared with the verifier's greedy reference (training computes it on logged steps)
)


@dataclass
class StepMetrics:
    """Sums for K steps; `drafts` counts rows where all K steps are supervised (the simulated drafts)."""

    num_steps: int
    values: torch.Tensor  # [len(_FIELDS), K] float64, on the device the step runs on (no per-add sync)
    drafts: float | torch.Tensor = 0.0

    @classmethod
    def zeros(cls, num_steps: int, device: torch.device | str = "cpu") -> StepMetrics:
        return cls(num_steps, torch.zeros(len(_FIELDS), num_steps, dtype=torch.float64, device=device))

    def field(self, name: str) -> torch.Tensor:
        return self.values[_FIELDS.index(name)]

    def add(self, name: str, k: int, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.to(self.values.device, torch.float64)
        self.values[_FIELDS.index(name), k] += value

    def merge(self, other: StepMetrics) -> StepMetrics:
        values = self.values + other.values.to(self.values.device)
        return StepMetrics(self.num_steps, values, self.drafts + other.drafts)

    def to_flat(self) -> torch.Tensor:
        """One float64 vector, for a single all-reduce across ranks."""
        drafts = torch.as_tensor(self.drafts, dtype=torch.float64, device=self.values.device).reshape(1)
        return torch.cat([self.values.flatten(), drafts.to(self.values.device)])

    @classmethod
    def from_flat(cls, num_steps: int, flat: torch.Tensor) -> StepMetrics:
        flat = flat.to("cpu", torch.float64)
        return cls(num_steps, flat[:-1].reshape(len(_FIELDS), num_steps).clone(), float(flat[-1]))

    def acceptance(self) -> AcceptanceCounts:
        return AcceptanceCounts(self.num_steps, int(self.drafts), [round(a) for a in self.field("accepted").tolist()])

    def summary(self, step_weights: list[float], loss_kind: str, kl_weight: float = 1.0) -> dict[str, float]:
        """Means per step (`loss_step_k` is unweighted) plus the alpha-weighted `loss` and `tau_sim`."""
        out: dict[str, float] = {}
        tokens = self.field("tokens")
        denom = tokens.clamp(min=1)
        ref_denom = self.field("ref_tokens").clamp(min=1)
        per_step = {name: (self.field(name) / denom).tolist() for name in ("ce", "kl", "tv", "correct_label")}
        for name in ("correct_verifier", "verifier_label_agree"):
            per_step[name] = (self.field(name) / ref_denom).tolist()
        objective = _objective(per_step, loss_kind, kl_weight)
        acceptance = self.acceptance()
        for k in range(self.num_steps):
            out[f"loss_step_{k}"] = objective[k]
            out[f"ce_step_{k}"] = per_step["ce"][k]
            if loss_kind != "ce":
                out[f"kl_step_{k}"] = per_step["kl"][k]
                out[f"tv_step_{k}"] = per_step["tv"][k]
            out[f"acc_step_{k}"] = per_step["correct_label"][k]
            out[f"acc_verifier_step_{k}"] = per_step["correct_verifier"][k]
            out[f"cond_accept_step_{k}"] = acceptance.conditional[k]
            out[f"tokens_step_{k}"] = float(tokens[k])
        out["loss"] = sum(w * v for w, v in zip(step_weights, objective))
        out["verifier_label_agreement"] = per_step["verifier_label_agree"][0]
        out["tau_sim"] = acceptance.acceptance_length
        out["drafts"] = float(self.drafts)
        return out


def _objective(per_step: dict[str, list[float]], loss_kind: str, kl_weight: float) -> list[float]:
    if loss_kind == "ce":
        return per_step["ce"]
    if loss_kind == "kl":
        return per_step["kl"]
    if loss_kind == "tv":
        return per_step["tv"]
    return [c + kl_weight * kl for c, kl in zip(per_step["ce"], per_step["kl"])]
