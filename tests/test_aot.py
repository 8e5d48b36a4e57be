"""The ahead-of-time GPU compile gate: every shipped Triton config compiles for sm_80 and sm_90, without
register spills and within the architecture's shared memory. Runs on the CPU (no GPU needed)."""

from __future__ import annotations

import importlib
import os

import pytest

from vivit_kernels import aot
from vivit_kernels.ops import attention as attn_mod
ln_mod = importlib.import_module("vivit_kernels.ops.layer_norm")  # the module (ops.layer_norm is the function)
lin_mod = importlib.import_module("vivit_kernels.ops.linear")  # the module (ops.linear is the function)
pe_mod = importlib.import_module("vivit_kernels.ops.patch_embed")  # the module (ops.patch_embed is the function)


@pytest.fixture(scope="module")
def results():
    # one compile process per core (2 here; a GPU server has many more), at most 16
    return aot.run(aot.collect_cases(), archs=(80, 90), jobs=max(2, min(16, os.cpu_count() or 2)), progress=False)


def test_every_shipped_config_passes_the_gate(results):
    failing = [r for r in results if not r.ok]
    assert not failing, "\n" + aot.format_table(failing)


def test_gate_covers_every_attention_config(results):
    """Each table entry x dtype x head_dim x arch is compiled (fp32 twice: IEEE and TF32 products)."""
    n_dims = len(attn_mod.AOT_HEAD_DIMS)
    expected = 0
    for head_dim in attn_mod.AOT_HEAD_DIMS:
        block_d = attn_mod.block_d_for(head_dim)
        for size, n_dtypes in ((2, 2), (4, 2)):  # fp16 + bf16; fp32 ieee + fp32 tf32
            for table in (attn_mod.FWD_CONFIGS, attn_mod.DKDV_CONFIGS, attn_mod.DQ_CONFIGS):
                expected += len(table[(block_d, size)]) * n_dtypes
    expected += 3 * n_dims  # the delta pre-processing kernel, per dtype and head_dim
    got = [r for r in results if r.case.name.startswith("attn")]
    assert len(got) == 2 * expected


def test_gate_covers_every_gemm_config(results):
    """Each GEMM table entry in every launch variant of its kind, per dtype (fp32: IEEE and TF32)."""
    variants = lin_mod.gemm_launch_variants()
    expected = 0
    for (size, precision, kind), configs in lin_mod.GEMM_CONFIGS.items():
        n_variants = sum(1 for _, v in variants if lin_mod._kind(v) == kind)
        expected += len(configs) * n_variants * (2 if size == 2 else 1)  # fp16 and bf16 share the 2-byte rows
    assert len([r for r in results if r.case.name == "gemm"]) == 2 * expected


def test_gate_covers_layer_norm_and_patch_embed(results):
    assert len([r for r in results if r.case.name.startswith("layer_norm")]) == 2 * 2 * 3 * len(ln_mod.LN_CONFIGS)
    expected = 0
    for table, rows in pe_mod.PATCH_CONFIGS.items():
        for (size, precision), configs in rows.items():
            per_tubelet = len(pe_mod.AOT_TUBELETS) + (1 if table != "dx" else 0)  # + the no-bias variant
            expected += len(configs) * per_tubelet * (2 if size == 2 else 1)
    assert len([r for r in results if r.case.name.startswith("patch_embed")]) == 2 * expected


def test_results_are_real_measurements(results):
    for r in results:
        assert r.registers and r.registers <= 255, r
        assert r.shared is not None and 0 < r.occupancy <= 1, r


def test_gate_catches_a_spilling_config():
    """fp32 attention with IEEE products and 64 x 64 tiles on 4 warps spills: the gate must say so."""
    cases = [c for c in attn_mod.aot_cases(head_dims=(64,)) if c.kernel == "_attn_fwd_kernel" and c.label.startswith("fp32 ")]
    constexprs = dict(cases[0].constexprs, BLOCK_M=64, BLOCK_N=64)
    bad = aot.AotCase(cases[0].module, cases[0].kernel, cases[0].signature, tuple(sorted(constexprs.items())), 4, 3,
                      "fp32 d=64 64x64 w4 s3", cases[0].divisible)
    [result] = aot.run([bad], archs=(80,), jobs=1, progress=False)
    assert not result.ok
    assert any("spills" in p for p in result.problems), result.problems


def test_shared_memory_limit_is_enforced():
    case = attn_mod.aot_cases(head_dims=(64,))[0]
    for arch, limit in ((80, 163 * 1024), (90, 227 * 1024)):
        at = aot.AotResult(case, arch, registers=128, spill_stores=0, spill_loads=0, shared=limit)
        over = aot.AotResult(case, arch, registers=128, spill_stores=0, spill_loads=0, shared=limit + 1)
        assert aot.problems(at) == []
        assert aot.problems(over) == [f"shared memory {limit + 1} B > {limit} B"]


def test_compile_report_cli(tmp_path):
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "vivit_kernels", "compile-report", "--kernel", "preprocess", "--arch", "80",
         "--json", str(tmp_path / "r.json"), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "attn_bwd_preprocess" in out.stdout and "0 failing" in out.stdout
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 3 * len(attn_mod.AOT_HEAD_DIMS) and all(r["ok"] for r in rows)
