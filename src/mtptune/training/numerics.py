"""The NaN guard: a non-finite loss, gradient or weight stops the run; no checkpoint is written from that state.

A diverged head (one NaN weight is enough: every loss after it is NaN) used to train on, exit 0 and hand
`stitch` a head of NaN. The trainer checks without slowing the step down: the loss and the gradient norm of each
step stay on the device with its other metrics and are read where the loop syncs anyway (a logged step, and always
before a checkpoint or at the end of an epoch); the weights are checked before every checkpoint and once at the
start. `evaluate offline` refuses such a head too (an acceptance of 0.000 would look like a result).
"""

from __future__ import annotations

import torch

from mtptune.errors import MtpTuneError


class NonFiniteTraining(MtpTuneError):
    """The loss, a gradient or a weight became NaN or Inf: the run stops without saving that state."""


def non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of the parameters of `module` that hold a NaN or an Inf."""
    bad = []
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.numel() and not bool(torch.isfinite(param).all()):
                bad.append(name)
    return bad


def describe_tensors(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
