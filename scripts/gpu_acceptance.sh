#!/usr/bin/env bash
# The acceptance run in one call on a GPU machine that has torch / triton / transformers but no package registry
# (a lent H200 with torch 2.11, triton 3.6, transformers 5.17, Python 3.12; a cloud image): install this checkout
# without touching those, build the CUDA extension there, run `vivit-kernels acceptance`, keep everything under
# OUT_DIR (default: $OUT when set, else bench/results).
#
#   bash scripts/gpu_acceptance.sh [BUDGET_S]        # default 420: install + run fit a 10-minute call
#
# Then commit OUT_DIR/<gpu>-<yyyy-mm-dd>/ under bench/results/ and run `python bench/update_readme.py`.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-420}"
OUT_DIR="${OUT:-bench/results}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/acceptance-$(date -u +%F).log"  # moved into the run's directory at the end
{
  echo "== $(date -u +%FT%TZ) $(uname -m), $("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  start=$(date +%s)
  # the extension for the GPU in hand only (sm_90 on a Hopper), to keep the build short; no index, no deps
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  VIVIT_KERNELS_CUDA_ARCHS="$arch" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || { echo "install failed"; exit 2; }
  echo "== installed in $(( $(date +%s) - start )) s (extension for sm_${arch/./})"
  date_tag=$(date -u +%F)
  gpu=$("$PY" -c "from vivit_kernels.tools.acceptance import gpu_slug; import torch; print(gpu_slug(torch.cuda.get_device_name()))")
  echo "$OUT_DIR/$gpu-$date_tag" > "$OUT_DIR/.last-run"
  "$PY" -m vivit_kernels acceptance --out "$OUT_DIR/$gpu-$date_tag" --budget-s "$BUDGET"
  code=$?
  echo "== acceptance exited with $code after $(( $(date +%s) - start )) s in all"
  exit $code
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ -f "$OUT_DIR/.last-run" ]; then
  run_dir=$(cat "$OUT_DIR/.last-run"); rm -f "$OUT_DIR/.last-run"
  [ -d "$run_dir" ] && mv "$LOG" "$run_dir/acceptance.log"
fi
exit "$status"
