#!/bin/bash
# Source this on a device machine (from the repo root) before any benchmark or GPU test:
#   source benchmarks/device_setup.sh
# The GPU image has torch/transformers/safetensors but neither `datasets`, the server's HTTP stack (fastapi, uvicorn),
# the peer (speculators) nor flash-linear-attention; they travel as wheels in the ignored folders .bench/whl and .whl
# (docs/benchmarks.md says how to rebuild them) and are installed once per machine into /tmp/site.
# Also keeps compiled kernels in /tmp between the calls of one warm machine, and NVLink multicast off (KINDS.md).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
STAMP="$(ls .bench/whl .whl 2>/dev/null | md5sum | cut -c1-12)"
if [ ! -f /tmp/site/.setup-$STAMP ]; then
  mkdir -p /tmp/site /tmp/fla
  if ! python3 -m pip install -q --no-index --find-links .bench/whl speculators==0.9.0 hs-connectors==0.9.0; then
    python3 benchmarks/peer/install_missing.py .bench/whl /tmp/site
  fi
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fla .whl/*.whl
  fi
  touch /tmp/site/.setup-$STAMP
fi
# flash-linear-attention is opt-in (`export PYTHONPATH=/tmp/fla:$PYTHONPATH`, e.g. for the verifier's server): once
# importable, transformers sends every Gated-DeltaNet forward to its Triton kernels, CPU reference forwards included.
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PWD/.device-bin:$PATH
mkdir -p .device-bin
printf '#!/bin/bash\nexec python3 -m mtptune.cli.main "$@"\n' > .device-bin/mtptune && chmod +x .device-bin/mtptune
