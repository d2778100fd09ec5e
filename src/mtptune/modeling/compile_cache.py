"""Where compiled kernels are kept between runs."""

from __future__ import annotations

import os

from mtptune.checkpoint.builtin_models import cache_root


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's and Triton's compiled kernels, and Triton's autotuning results, under
    `$MTPTUNE_CACHE/compile` (unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR / TRITON_CACHE_AUTOTUNING say
    otherwise), so the second run on a machine reuses the first one's compilation and tuning of the head's steps and
    the verifier's kernels instead of paying them again (docs/benchmarks.md has both times)."""
    root = cache_root() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    # Triton's autotuner keeps each kernel's winning config per shape key in TRITON_CACHE_DIR only when this is set,
    # and reads it when the kernel is defined (at import): flash-linear-attention tunes the verifier's kernels per
    # batch size and token count, seconds each, which a warm machine then skips. Set before anything imports Triton
    # kernels: `mtptune`'s entry point calls this first.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
