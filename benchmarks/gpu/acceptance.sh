#!/usr/bin/env bash
# The GPU acceptance run, on one H100/H200, in at most ~8 minutes with the installs: results under $OUT.
#
#   bash benchmarks/gpu/acceptance.sh [--budget-s 420]     # on the GPU machine (wheels from prepare.sh in .whl/)
#   bash benchmarks/gpu/acceptance.sh --dry-run            # on any CPU machine: every check's CPU-runnable part
#
# The bare GPU image has torch and timm but no DeepSpeed or open_clip and reaches no registry: prepare.sh (run
# beforehand on a machine with registry access) puts the missing wheels in .whl/, installed here into /tmp/site.
# DALI's wheel (~200 MB) cannot travel: its GPU checks are skipped and the report says so.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/acceptance}"
mkdir -p "$OUT"
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image's wheels (a dry run uses this machine's)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "acceptance: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-}"
[ -z "$DS_ACCELERATOR" ] && unset DS_ACCELERATOR
[ "$dry" = 1 ] && export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python3 benchmarks/gpu/acceptance.py --out "$OUT" "$@" 2>&1 | tee "$OUT/acceptance.log"
exit "${PIPESTATUS[0]}"
