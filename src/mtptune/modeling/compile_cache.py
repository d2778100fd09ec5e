"""Where compiled kernels are kept between runs."""

from __future__ import annotations

import os

from mtptune.checkpoint.builtin_models import cache_root


def use_persistent_compile_cache() -> None:
    """Keep torch.compile's and Triton's compiled kernels under `$MTPTUNE_CACHE/compile` (unless TORCHINDUCTOR_CACHE_DIR
    / TRITON_CACHE_DIR say otherwise), so the second run on a machine reuses the first one's compilation of the
    head's steps and the verifier's kernels instead of paying it again (docs/benchmarks.md has both times)."""
    root = cache_root() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
