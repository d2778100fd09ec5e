"""Muon for the head's weight matrices with AdamW for the rest, as ONE optimizer (`--optimizer muon`).

speculators 0.9.0 trains with `torch.optim.Muon` on every 2-D weight matrix (both dimensions > 1; embeddings and LM
heads excepted, which the MTP head does not train) and `torch.optim.AdamW` on everything else (norms), stepping a list
of two optimizers. The trainer here drives one optimizer, one LR scheduler and one state dict, so `MuonWithAdamW`
holds both and shares their parameter groups and state: the scheduler scales every group's lr, `state_dict()` and
`load_state_dict()` cover both (a resumed run continues both), `zero_grad` clears both.

Defaults as speculators 0.9.0: Muon's lr = --lr unless --muon-lr, with `adjust_lr_fn="match_rms_adamw"` (the
update's RMS matched to AdamW's, so AdamW's lr carries over), momentum 0.95 (Nesterov), 5 Newton-Schulz steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def is_muon_matrix(param: torch.Tensor) -> bool:
    """Muon orthogonalizes matrices: 2-D, both dimensions > 1 (a [1, N] 'matrix' is a vector)."""
    return param.ndim == 2 and min(param.shape) > 1


class MuonWithAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        muon_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        fused: bool = False,
    ) -> None:
        params = list(params)
        matrices = [p for p in params if is_muon_matrix(p)]
        others = [p for p in params if not is_muon_matrix(p)]
        if not matrices:
            raise ValueError("--optimizer muon: the head has no 2-D weight matrix to train with Muon")
        lr_muon = lr if muon_lr is None else muon_lr
        self._muon = torch.optim.Muon(matrices, lr=lr_muon, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self._adamw = torch.optim.AdamW(others, lr=lr, betas=betas, weight_decay=0.0, fused=fused) if others else None
        groups = [*self._muon.param_groups, *(self._adamw.param_groups if self._adamw else [])]
        super().__init__(groups, {})  # the same group dicts: a scheduler's lr changes reach both optimizers
        self._link()

    def _link(self) -> None:
        """Point both inner optimizers at this optimizer's groups and state (again after `load_state_dict`)."""
        n = len(self._muon.param_groups)
        self._muon.param_groups = self.param_groups[:n]
        self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = self.param_groups[n:]
            self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        if self._adamw is not None:
            self._adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()
