#!/bin/bash
# Source this on a device machine (from the repo root) before any benchmark or GPU test:
#   source benchmarks/device_setup.sh
# The GPU image has torch/transformers/safetensors but neither `datasets`, the server's HTTP stack (fastapi, uvicorn),
# the peer (speculators), liger-kernel, cut-cross-entropy nor flash-linear-attention; they travel as wheels in the
# ignored folders .bench/whl and .whl (built by benchmarks/device_wheels.sh, exact versions) and are installed once per
# machine by benchmarks/wheels.py, which resolves every requirement against the image and prints `MISSING ...` for
# anything neither has. Afterwards DEVICE_SETUP_MISSING lists the imports that failed ("" when all is well).
# Also keeps compiled kernels in /tmp between the calls of one warm machine, and NVLink multicast off (KINDS.md).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
STAMP="$(ls .bench/whl .whl 2>/dev/null | md5sum | cut -c1-12)"
if [ ! -f /tmp/site/.setup-$STAMP ]; then
  mkdir -p /tmp/site /tmp/fla
  if ls .bench/whl/*.whl > /dev/null 2>&1; then
    python3 benchmarks/wheels.py install --target /tmp/site --roots speculators,hs-connectors,fastapi,uvicorn,datasets \
      .bench/whl | grep -v "^unused"
  else
    echo "device_setup: no .bench/whl carried (the peer, datasets and the server's HTTP stack stay missing)"
  fi
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 benchmarks/wheels.py install --target /tmp/site --roots liger-kernel,cut-cross-entropy,py-spy .whl \
      | grep -v "^unused"
    python3 benchmarks/wheels.py install --target /tmp/fla --roots flash-linear-attention .whl | grep -v "^unused"
  fi
  touch /tmp/site/.setup-$STAMP
fi
# flash-linear-attention is opt-in (`export PYTHONPATH=/tmp/fla:$PYTHONPATH`, e.g. for the verifier's server): once
# importable, transformers sends every Gated-DeltaNet forward to its Triton kernels, CPU reference forwards included.
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PWD/.device-bin:/tmp/site/bin:$PATH
mkdir -p .device-bin
printf '#!/bin/bash\nexec python3 -m mtptune.cli.main "$@"\n' > .device-bin/mtptune && chmod +x .device-bin/mtptune
# What each carried folder is for, imported once per install (one process): a failure is named here, loudly, every
# time this file is sourced, and listed in DEVICE_SETUP_MISSING.
if [ ! -f /tmp/site/.missing-$STAMP ]; then
  _imports=""
  [ -d .bench/whl ] && _imports="datasets fastapi uvicorn speculators.train.cli"
  [ -d .whl ] && _imports="$_imports liger_kernel.ops.fused_linear_cross_entropy cut_cross_entropy fla"
  PYTHONPATH=$PYTHONPATH:/tmp/fla python3 - $_imports > /tmp/site/.missing-$STAMP 2> /dev/null <<'PY'
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name, end=" ")
PY
  unset _imports
fi
DEVICE_SETUP_MISSING="$(cat /tmp/site/.missing-$STAMP)"
[ -n "$DEVICE_SETUP_MISSING" ] && echo "!!! device_setup: cannot import: $DEVICE_SETUP_MISSING(benchmarks/wheels.py printed MISSING lines at install)"
export DEVICE_SETUP_MISSING
