#!/bin/bash
# Build the two git-ignored wheel folders a device call carries (the device machines have no network), on an x86-64
# box with PyPI, from the repo root:
#
#   bash benchmarks/device_wheels.sh          # -> .bench/whl and .whl, checked against benchmarks/device_image.txt
#
# .bench/whl: the peer (speculators 0.9.0 + hs-connectors 0.9.0) and what it and mtptune's server import that the
#             device image lacks; a few alternatives the installer picks from on the device (benchmarks/wheels.py):
#             datasets 4.8.5 if the image's pyarrow is < 24 (datasets 5.1.0 needs >= 24), fsspec and typing-extensions
#             if the image's are outside what datasets / pydantic accept. openai stays on 2.x: 3.x needs httpx2,
#             httpcore2 and truststore, none of which the image has.
# .whl:       kernels and tools: flash-linear-attention (the verifier trunk of the built-in server), liger-kernel and
#             cut-cross-entropy (--loss-kernel, benchmarks/loss_kernels.py), py-spy.
# Every version is exact; wheels are fetched --no-deps for CPython 3.12 manylinux x86-64 (the device: Python 3.12.3,
# torch 2.11.0+cu130, triton 3.6.0, transformers 5.17.0). The check step resolves every Requires-Dist against the
# image's list plus the folder and prints MISSING for anything neither has; it exits non-zero then.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=(
  speculators==0.9.0 hs-connectors==0.9.0
  datasets==5.1.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.2.0
  loguru==0.7.3 openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5
  annotated-types==0.8.0 typing-extensions==4.16.0
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 uvicorn==0.54.0
)
KERNELS=(fla-core==0.6.0 flash-linear-attention==0.6.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 py-spy==0.4.3)
BENCH_ROOTS=speculators,hs-connectors,fastapi,uvicorn,datasets
KERNEL_ROOTS=flash-linear-attention,liger-kernel,cut-cross-entropy,py-spy
P=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

fetch() {  # fetch DIR SPEC...: one pip call per spec (two versions of one name cannot share a call)
  local dir=$1; shift
  mkdir -p "$dir"
  for spec in "$@"; do
    python3 -m pip download -q --disable-pip-version-check --no-deps "${P[@]}" -d "$dir" "$spec" 2>&1 \
      | grep -v "is ignored: it is neither" || true
    name=${spec%%==*}; version=${spec#*==}
    ls "$dir"/"$(echo "$name" | tr - _)"-"$version"-*.whl > /dev/null 2>&1 \
      || ls "$dir"/"$name"-"$version"-*.whl > /dev/null 2>&1 || { echo "MISSING: no wheel for $spec"; exit 1; }
  done
}

rm -rf .bench/whl .whl
fetch .bench/whl "${BENCH[@]}"
fetch .whl "${KERNELS[@]}"
rc=0
echo "== .bench/whl (roots $BENCH_ROOTS)"
python3 benchmarks/wheels.py check --image benchmarks/device_image.txt --roots "$BENCH_ROOTS" .bench/whl || rc=1
echo "== .whl (roots $KERNEL_ROOTS)"
python3 benchmarks/wheels.py check --image benchmarks/device_image.txt --roots "$KERNEL_ROOTS" .whl || rc=1
tree=$(git archive HEAD | wc -c)
total=$(( $(cat .bench/whl/*.whl .whl/*.whl | wc -c) + tree ))
echo "carried: .bench/whl $(du -sb .bench/whl | cut -f1) B, .whl $(du -sb .whl | cut -f1) B, working tree ~$tree B;" \
  "total $(( total / 1048576 )) MiB of the 64 MiB a call may carry"
exit $rc
