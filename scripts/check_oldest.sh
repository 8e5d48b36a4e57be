#!/usr/bin/env bash
# Prove the oldest supported versions on a machine without a GPU: torch 2.11 with the triton it brings (3.6),
# transformers 5.17 (what common GPU images ship), in a venv of their own beside the current install.
#
#   bash scripts/check_oldest.sh [VENV_DIR]      # default: .venv-oldest (ignored by git)
#
# What it checks, in this order (each step prints what it runs; the first failure stops it):
#   1. the package installs against those versions (the C++ extension's CPU part builds with torch 2.11);
#   2. `import vivit_kernels` and `vivit-kernels info` work and report the old versions;
#   3. the compile gate for sm_90 under Triton 3.6: every shipped kernel config compiles, without spills,
#      within shared memory (vivit-kernels compile-report --arch 90);
#   4. the CPU test suite's model, kernel and ecosystem tests under those versions: eager / sdpa / auto models against
#      transformers 5.17, the factorised models (Models 2-4), and the Triton kernels in Triton 3.6's interpreter;
#   5. `vivit-kernels acceptance --dry-run`.
# The venv reuses this machine's site-packages for everything else (the nvidia-* wheels, pytest, peft, ...):
# only torch, triton and transformers are replaced, so nothing big is downloaded twice. The checks run on a
# copy of the working tree in VENV_DIR/src (tracked and untracked, not ignored, files): an editable install
# builds the extension in place, and one built against torch 2.11 must not replace the checkout's own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-oldest}"
TORCH="${OLDEST_TORCH:-2.11.0}"; TRITON="${OLDEST_TRITON:-3.6.0}"; TRANSFORMERS="${OLDEST_TRANSFORMERS:-5.17.0}"
JOBS="${JOBS:-2}"

step() { echo; echo "== $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "venv $VENV (system site-packages visible, torch / triton / transformers of its own)"
  python -m venv --system-site-packages "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
BIN="$(dirname "$PY")"
SRC="$VENV/src"
step "install torch==$TORCH triton==$TRITON transformers==$TRANSFORMERS"
# --no-deps for torch: its CUDA libraries are the nvidia-* wheels already installed beside the newer torch
"$PY" -m pip install --quiet --no-deps "torch==$TORCH" "triton==$TRITON"
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
"$PY" -c "import vivit_kernels, vivit_kernels.model, vivit_kernels.providers; print('import ok', vivit_kernels.__version__)"
"$BIN/vivit-kernels" info

step "compile gate, sm_90, Triton $TRITON"
"$BIN/vivit-kernels" compile-report --arch 90 -j "$JOBS" --json compile-report-sm90.json | tail -n 3

step "tests under torch $TORCH / Triton $TRITON / transformers $TRANSFORMERS (CPU; Triton in its interpreter)"
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_model_parity.py tests/test_model_triton.py tests/test_providers.py \
  tests/test_attention.py tests/test_linear.py tests/test_layer_norm.py tests/test_patch_embed.py \
  tests/test_checkpoint.py tests/test_ecosystem.py tests/test_compat.py tests/test_acceptance.py \
  tests/test_guard.py tests/test_architecture.py tests/test_factorized.py

step "vivit-kernels acceptance --dry-run"
"$BIN/vivit-kernels" acceptance --dry-run --out acceptance-dry-run
echo
echo "oldest supported versions: all checks passed"
