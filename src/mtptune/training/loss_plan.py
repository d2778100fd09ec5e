"""Which rows of a packed micro-batch each MTP step supervises, worked out on the host before the step.

The loss gathers supervised rows (only they reach the 248k-vocabulary LM head). Finding them on the GPU means a
boolean index, i.e. a device-to-host sync per step k, each of which drains the GPU queue mid-step. The rows depend
only on the token ids, the loss mask and the document boundaries, which the host has anyway, so the batch loader
computes them here, in its background thread, and the step itself never waits on the device.

Indices are flat positions into the [B, T] micro-batch. Row t of step k predicts x_{t+k+2} (docs/contracts.md, "Targets") and is
compared with the verifier's greedy token computed from the post-norm state at t+k+1 (docs/contracts.md, "Acceptance metrics").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtptune.modeling.head import step_targets


@dataclass(frozen=True)
class LossPlan:
    rows: tuple[torch.Tensor, ...]  # per step k: flat indices of the supervised rows, int64
    targets: tuple[torch.Tensor, ...]  # per step k: the dataset token x_{t+k+2} of those rows
    reference_rows: torch.Tensor  # flat positions t+k+1 whose greedy verifier token some step compares with
    draft_rows: torch.Tensor  # flat indices of rows supervised at every step: the simulated drafts

    @property
    def counts(self) -> list[int]:
        """N_k of this micro-batch (host ints: the shapes are known without a sync)."""
        return [r.numel() for r in self.rows]

    @classmethod
    def build(cls, input_ids: torch.Tensor, loss_mask: torch.Tensor, position_ids: torch.Tensor, K: int) -> LossPlan:
        rows, targets = [], []
        needed = torch.zeros(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        every = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
        for k in range(K):
            step_ids, valid = step_targets(input_ids, loss_mask, position_ids, k)
            valid = valid.reshape(-1)
            index = valid.nonzero().squeeze(-1)
            rows.append(index)
            targets.append(step_ids.reshape(-1)[index])
            needed[index + k + 1] = True  # t+k+1 stays inside the row's document, hence inside the [B, T] row
            every &= valid
        return cls(tuple(rows), tuple(targets), needed.nonzero().squeeze(-1), every.nonzero().squeeze(-1))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LossPlan:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return LossPlan(
            tuple(move(r) for r in self.rows),
            tuple(move(t) for t in self.targets),
            move(self.reference_rows),
            move(self.draft_rows),
        )

    def pin_memory(self) -> LossPlan:
        def pin(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory()

        return LossPlan(
            tuple(pin(r) for r in self.rows),
            tuple(pin(t) for t in self.targets),
            pin(self.reference_rows),
            pin(self.draft_rows),
        )
