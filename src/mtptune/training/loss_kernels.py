"""Which kernel computes a training step's LM head + cross-entropy (`--loss-kernel`).

* `auto` (default): `liger` where it can run (a CUDA device, `--loss ce`, liger-kernel installed), else `ours`.
  Measured on one H200 at the 9B shapes: the whole training step 225.7 → 216.3 ms and 0.95 GiB less peak memory with
  liger (docs/benchmarks.md, "Trainer step"); CPU runs, KL / TV losses and machines without the package keep `ours`.
* `ours`: `fused_linear_loss` — chunked cuBLAS matmuls, a compiled CE, the input gradient computed in the forward;
  every loss kind (ce, kl, tv, ce+kl), any device, and the argmax the metrics need.
* `liger`: liger-kernel's fused linear cross-entropy (the same structure: chunked matmuls, a Triton CE kernel that
  writes the logit gradient in place; it returns the argmax too). CUDA only, `--loss ce` only. Two device syncs per
  call inside the library (a `.item()` on the target count, a `torch.equal` on the upstream gradient).

cut-cross-entropy (logits never written) was measured beside them and is not offered: 3x slower than `ours` at the
9B shapes and its bf16-accumulated input gradient 17 % off the reference (docs/benchmarks.md, "LM-head loss kernels").

KL / TV need the verifier's distribution at every row as well as the head's, which liger does not compute: every
loss but `ce` takes `ours`. The LM head is frozen, so only the input gradient is computed (liger skips the weight
gradient when the weight does not require grad).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtptune.errors import ConfigError

if TYPE_CHECKING:  # torch stays unimported here: TrainConfig.validate() calls check_loss_kernel
    import torch

DEFAULT_LOSS_KERNEL = "auto"
LOSS_KERNELS: tuple[str, ...] = ("auto", "ours", "liger")
_MODULES = {"liger": "liger_kernel"}
_PACKAGES = {"liger": "liger-kernel"}

# kernel(hidden [n, H] bf16/fp16, weight [V, H] frozen, targets [n]) -> (sum of CE over rows (differentiable wrt
# hidden), argmax [n] or None).
CeKernel = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], tuple["torch.Tensor", "torch.Tensor | None"]]


@dataclass(frozen=True)
class LibraryKernel:
    fn: CeKernel
    gives_argmax: bool  # False: steps whose metrics are read (logged steps) use `ours`
    needs_cuda: bool = True


def check_loss_kernel(kernel: str, loss_kind: str) -> None:
    """ConfigError for an unknown kernel, a library kernel with a loss it cannot compute, or a library not installed."""
    if kernel not in LOSS_KERNELS:
        raise ConfigError(f"--loss-kernel must be one of {', '.join(LOSS_KERNELS)}, got {kernel!r}.")
    if kernel in ("auto", "ours"):
        return
    if loss_kind != "ce":
        raise ConfigError(
            f"--loss-kernel {kernel} computes cross-entropy only; --loss {loss_kind} needs the verifier's distribution "
            "at every row too, which only --loss-kernel ours computes."
        )
    if not _installed(kernel):
        raise ConfigError(
            f"--loss-kernel {kernel} needs the {_PACKAGES[kernel]} package: pip install {_PACKAGES[kernel]}"
        )


def resolve_loss_kernel(kernel: str, loss_kind: str, device_type: str) -> str:
    """The kernel a run uses: `auto` becomes `liger` on a CUDA device for `--loss ce` when liger-kernel is importable,
    `ours` otherwise; an explicit choice stays (check_loss_kernel has vetted it)."""
    if kernel != "auto":
        return kernel
    usable = loss_kind == "ce" and _installed("liger") and (device_type == "cuda" or not KERNELS["liger"].needs_cuda)
    return "liger" if usable else "ours"


def _installed(kernel: str) -> bool:
    return kernel not in _MODULES or importlib.util.find_spec(_MODULES[kernel]) is not None


def _liger(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # chunk_mem_const 16: ~2048-row chunks at this vocabulary (liger's default of 1 makes ~128-row chunks, whose
    # input-gradient matmul has too few output tiles to fill the GPU); benchmarks/loss_kernels.py measures both.
    out = liger_fused_linear_cross_entropy(
        hidden, weight, targets, reduction="sum", return_predicted_tokens=True, chunk_mem_const=16
    )
    return out.loss, out.predicted_tokens


# Registered by name (tests add pure-PyTorch stand-ins).
KERNELS: dict[str, LibraryKernel] = {"liger": LibraryKernel(_liger, True)}


def uses_library(kernel: str, needs_argmax: bool) -> bool:
    """Whether a training step's CE goes through library kernel `kernel` (else through `ours`)."""
    lib = KERNELS.get(kernel)
    return lib is not None and (lib.gives_argmax or not needs_argmax)


def library_ce(
    kernel: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over rows of -log softmax(hidden @ weight^T)[target] in fp32, argmax or None) through a library kernel;
    hidden is cast to the weight's dtype (the libraries' matmuls take one dtype)."""
    lib = KERNELS.get(kernel)
    if lib is None:
        raise ConfigError(f"--loss-kernel {kernel!r} is not a library kernel ({', '.join(KERNELS)})")
    if lib.needs_cuda and hidden.device.type != "cuda":
        raise ConfigError(f"--loss-kernel {kernel} runs Triton kernels: it needs a CUDA device (got {hidden.device}).")
    loss, argmax = lib.fn(hidden.to(weight.dtype), weight, targets)
    return loss.float(), argmax
