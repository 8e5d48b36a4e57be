#!/usr/bin/env bash
# Prove a supported end of our version ranges on a machine without a GPU, in a venv of its own beside the current
# install:
#   oldest: torch 2.11 with the triton it brings (3.6), transformers 5.17 (what common GPU images ship);
#   newest: the newest Triton our range admits (3.9, which the newest torch brings) beside this machine's torch, and
#           this machine's transformers.
#
#   bash scripts/check_versions.sh oldest|newest [VENV_DIR]      # default VENV_DIR: .venv-oldest / .venv-newest
#
# What it checks, in this order (each step prints what it runs; the first failure stops it):
#   1. the package installs against those versions (the C++ extension's CPU part builds against that torch);
#   2. `import vivit_kernels` and `vivit-kernels info` work and report those versions;
#   3. the compile gate for sm_90 under that Triton: every shipped kernel config compiles, without spills, within
#      shared memory (vivit-kernels compile-report --arch 90);
#   4. the CPU test suite's model, kernel and ecosystem tests under those versions: eager / sdpa / auto models
#      against that transformers, the factorised models (Models 2-4), and the Triton
#      kernels (token merging's included) in that Triton's interpreter;
#   5. `vivit-kernels acceptance --dry-run`: tests/test_acceptance.py in that list runs it (and checks every
#      section of what it writes), so it is not run a second time here.
# The venv reuses this machine's site-packages for everything else (the nvidia-* wheels, pytest, peft, ...): only
# the versions named above are replaced (torchvision with torch: it is built against one torch), so nothing big is
# downloaded twice. The checks run on a copy of the working tree in VENV_DIR/src (tracked and untracked, not
# ignored, files): an editable install builds the extension in place, and one built against another torch must not
# replace the checkout's own.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH="${1:-}"
case "$WHICH" in
  oldest)
    TORCH="${OLDEST_TORCH:-2.11.0}"; TORCHVISION="${OLDEST_TORCHVISION:-0.26.0}"; TRITON="${OLDEST_TRITON:-3.6.0}"
    TRANSFORMERS="${OLDEST_TRANSFORMERS:-5.17.0}" ;;
  newest)
    TORCH="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"; TORCHVISION=""
    TRITON="${NEWEST_TRITON:-3.9.0}"
    TRANSFORMERS="$(python -c 'import transformers; print(transformers.__version__)')" ;;
  *) echo "usage: bash scripts/check_versions.sh oldest|newest [VENV_DIR]" >&2; exit 2 ;;
esac
VENV="${2:-.venv-$WHICH}"
JOBS="${JOBS:-2}"

step() { echo; echo "== [$WHICH] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "venv $VENV (system site-packages visible, the checked versions of its own)"
  python -m venv --system-site-packages "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
BIN="$(dirname "$PY")"
SRC="$VENV/src"
step "install torch==$TORCH triton==$TRITON transformers==$TRANSFORMERS${TORCHVISION:+ torchvision==$TORCHVISION}"
# --no-deps for torch and triton: torch's CUDA libraries are the nvidia-* wheels already installed beside the
# current torch; the newest Triton is checked beside the current torch, whose own pin names an older one
"$PY" -m pip install --quiet --no-deps "torch==$TORCH" "triton==$TRITON" ${TORCHVISION:+"torchvision==$TORCHVISION"}
"$PY" -m pip install --quiet "transformers==$TRANSFORMERS" "setuptools>=64,<82" wheel  # the build's own needs
step "copy the working tree to $SRC; install vivit_kernels from it (CPU part of the extension, against torch $TORCH)"
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$SRC"
(cd "$SRC" && VIVIT_KERNELS_SKIP_CUDA_BUILD=1 "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .)
cd "$SRC"
"$PY" - <<PYEOF
import torch, triton, transformers
got = (torch.__version__.split("+")[0], triton.__version__, transformers.__version__)
want = ("$TORCH", "$TRITON", "$TRANSFORMERS")
assert got == want, f"the venv runs {got}, expected {want}"
print("versions:", got)
PYEOF

step "import vivit_kernels; vivit-kernels info"
"$PY" -c "import vivit_kernels, vivit_kernels.model, vivit_kernels.auto.choose; print('import ok', vivit_kernels.__version__)"
"$BIN/vivit-kernels" info

step "compile gate, sm_90, Triton $TRITON"
"$BIN/vivit-kernels" compile-report --arch 90 -j "$JOBS" --json "compile-report-sm90.json" | tail -n 3

step "tests under torch $TORCH / Triton $TRITON / transformers $TRANSFORMERS (CPU; Triton in its interpreter)"
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_model_parity.py tests/test_model_triton.py tests/test_choose.py \
  tests/test_attention.py tests/test_linear.py tests/test_layer_norm.py tests/test_patch_embed.py \
  tests/test_checkpoint.py tests/test_ecosystem.py tests/test_compat.py tests/test_acceptance.py \
  tests/test_guard.py tests/test_architecture.py tests/test_factorized.py tests/test_token_merge.py

echo
echo "$WHICH supported versions: all checks passed"
