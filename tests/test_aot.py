"""The ahead-of-time GPU compile gate: every shipped Triton config compiles for sm_80 and sm_90, without
register spills and within the architecture's shared memory. Runs on the CPU (no GPU needed)."""

from __future__ import annotations

from compile_gate import reads_sass

from vivit_kernels.ops import _gemm
from vivit_kernels.ops import attention as attn_mod
from vivit_kernels.ops import layer_norm as ln_mod
from vivit_kernels.ops import patch_embed as pe_mod
from vivit_kernels.tools import aot


def test_every_shipped_config_passes_the_gate(gate_results):
    failing = [r for r in gate_results if not r.ok]
    assert not failing, "\n" + aot.format_table(failing)


def test_gate_covers_every_attention_config(gate_results):
    """Each table row's entries x dtype x head_dim, on the architecture whose row it is (fp32 twice: IEEE and
    TF32 products), and the delta pre-processing kernel on both."""
    n_dims = len(attn_mod.AOT_HEAD_DIMS)
    expected = 0
    for head_dim in attn_mod.AOT_HEAD_DIMS:
        block_d = attn_mod.block_d_for(head_dim)
        for size, n_dtypes in ((2, 2), (4, 2)):  # fp16 + bf16; fp32 ieee + fp32 tf32
            for table in (attn_mod.FWD_ROWS, attn_mod.DKDV_ROWS, attn_mod.DQ_ROWS):
                for arch in (80, 90):
                    # sm_90's 2-byte forward twice: through tensor descriptors and through pointers
                    variants = 2 if table is attn_mod.FWD_ROWS and arch == 90 and size == 2 else 1
                    expected += len(attn_mod.unique_configs(table, block_d, size, arch)) * n_dtypes * variants
    expected += 2 * 3 * n_dims  # the delta pre-processing kernel, per arch, dtype and head_dim
    # two batch dimensions (the factorised models' views, TWO_BATCH): bf16's short rows, every variant, + the
    # pre-processing kernel per arch
    for head_dim in attn_mod.AOT_HEAD_DIMS:
        block_d = attn_mod.block_d_for(head_dim)
        for table in (attn_mod.FWD_ROWS, attn_mod.DKDV_ROWS, attn_mod.DQ_ROWS):
            for arch in (80, 90):
                variants = 2 if table is attn_mod.FWD_ROWS and arch == 90 else 1
                expected += len(table[(block_d, 2, arch, True)]) * variants
    expected += 2 * n_dims
    # proportional attention (a per-key bias: HAS_BIAS), bf16: every config of the bias rows, every variant
    for head_dim in attn_mod.AOT_HEAD_DIMS:
        block_d = attn_mod.block_d_for(head_dim)
        for table in (attn_mod.FWD_BIAS_ROWS, attn_mod.DKDV_BIAS_ROWS, attn_mod.DQ_BIAS_ROWS):
            for arch in (80, 90):
                variants = 2 if table is attn_mod.FWD_BIAS_ROWS and arch == 90 else 1
                expected += len(attn_mod.unique_configs(table, block_d, 2, arch)) * variants
    attention = [r for r in gate_results if r.case.name.startswith("attn")]
    assert len(attention) == expected
    two = [r for r in attention if dict(r.case.constexprs).get("TWO_BATCH")]
    assert two and all("2-batch" in r.case.label and "bf16" in r.case.label for r in two)
    biased = [r for r in attention if dict(r.case.constexprs).get("HAS_BIAS")]
    assert biased and all(" bias " in r.case.label and "bf16" in r.case.label for r in biased)


def test_gate_covers_every_gemm_config(gate_results):
    """Each GEMM table entry in every launch variant of its kind, per dtype (fp32: IEEE and TF32): the pointer
    kernel on sm_80 and sm_90, the tensor-descriptor kernel on sm_90."""
    variants = _gemm.gemm_launch_variants()
    for name, table, n_archs in (("gemm", _gemm.GEMM_CONFIGS, 2), ("gemm_tma", _gemm.TMA_CONFIGS, 1)):
        expected = 0
        for (size, _precision, kind), configs in table.items():
            n_variants = sum(1 for _, v in variants if _gemm._kind(v) == kind)
            expected += len(configs) * n_variants * (2 if size == 2 else 1)  # fp16 and bf16 share the 2-byte rows
        assert len([r for r in gate_results if r.case.name == name]) == n_archs * expected, name


def test_sm90_fp16_bf16_configs_use_wgmma_and_gemms_use_tma(gate_results):
    """On sm_90 every fp16 / bf16 config of every matrix-multiplying kernel issues wgmma (not Ampere's mma.sync),
    and every shipped GEMM config of the sm_90 kernel, and the attention forward's tensor-descriptor variant, load
    their tiles through TMA."""
    checked = [r for r in gate_results if reads_sass(r.case, r.arch)]
    assert len(checked) > 400
    for r in checked:
        assert r.mma == "wgmma", (r.case.name, r.case.label, r.mma)
        if r.case.name == "gemm_tma" or (r.case.name == "attn_fwd" and " tma " in r.case.label):
            assert r.loads == "TMA", (r.case.name, r.case.label, r.loads)


def test_static_targets_on_sm90_bf16(gate_results):
    """The hot-loop targets (SASS instructions, a proxy for speed): each GEMM variant's best shipped config, forward
    <= 50 per MFLOP, dX (with the gelu_fast backward) and dW <= 70; attention forward <= 7.5 per score element."""
    labels = {r.case.label.split(" ")[1] for r in gate_results if r.case.name == "gemm_tma"}
    for variant in sorted(labels):
        role = variant.split(":")[0]
        best = min(r.work for r in gate_results if r.arch == 90 and r.case.name == "gemm_tma" and r.work is not None
                   and r.case.label.startswith("bf16 ") and r.case.label.split(" ")[1] == variant)
        assert best <= (50 if role == "fwd" else 70), (variant, best)
    for variant in ("bf16 d=64 tma ", "bf16 d=64 BLOCK"):  # the sm_90 default (TMA) and the pointer fallback
        attention = [r.work for r in gate_results if r.arch == 90 and r.case.name == "attn_fwd"
                     and r.case.label.startswith(variant)]
        assert attention and min(attention) <= 7.5, (variant, attention)


def test_vivit_b_weight_gradients_fill_132_sms():
    """Every ViViT-B weight-gradient GEMM (K = 8 x 3137 tokens, or one clip's 3137) splits over K until output
    tiles x K ranges give at least one full wave on 132 SMs."""
    configs = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for table in (_gemm.GEMM_CONFIGS, _gemm.TMA_CONFIGS)
               for (size, _, kind), row in table.items() if size == 2 and kind == "main" for c in row}
    for tokens in (3137, 8 * 3137):
        for out_f, in_f in ((768, 768), (3072, 768), (768, 3072)):  # q/k/v/o projections, FC1, FC2
            n_splits, k_split = _gemm._splits(out_f, in_f, tokens, 132)
            assert k_split % 64 == 0 and (n_splits - 1) * k_split < tokens <= n_splits * k_split
            for bm, bn in configs:
                programs = -(-out_f // bm) * -(-in_f // bn) * n_splits
                assert programs >= 132, (out_f, in_f, tokens, bm, bn, programs)
    # the patch embedding's dW (768 x 3*2*16*16), reduced over 8 x 14 x 14 tubelets per clip
    for tubelets in (1568, 8 * 1568):
        n_splits, m_split = _gemm._splits(768, 1536, tubelets, 132, tile=(128, 128))
        assert m_split % 64 == 0 and (n_splits - 1) * m_split < tubelets <= n_splits * m_split
        for cfg in pe_mod.PATCH_CONFIGS["dw"][(2, "ieee")]:
            programs = -(-768 // cfg.kwargs["BLOCK_M"]) * -(-1536 // cfg.kwargs["BLOCK_N"]) * n_splits
            assert programs >= 132, (tubelets, cfg.label(), programs)


def test_gate_covers_layer_norm_and_patch_embed(gate_results):
    # per config, dtype and arch: the forward and three backward variants (all, frozen weight, no dx)
    layer_norm = [r for r in gate_results if r.case.name.startswith("layer_norm")]
    assert len(layer_norm) == (1 + 3) * 2 * 3 * len(ln_mod.LN_CONFIGS)
    expected = 0
    for table, rows in pe_mod.PATCH_CONFIGS.items():
        for (size, _precision), configs in rows.items():
            # + the forward's no-bias variant / the dW kernel's unsplit one, for ViViT-B's tubelet
            per_tubelet = len(pe_mod.AOT_TUBELETS) + (1 if table != "dx" else 0)
            expected += len(configs) * per_tubelet * (2 if size == 2 else 1)
    assert len([r for r in gate_results if r.case.name.startswith("patch_embed")]) == 2 * expected


def test_results_are_real_measurements(gate_results):
    for r in gate_results:
        assert r.registers and r.registers <= 255, r
        assert r.shared is not None and 0 < r.occupancy <= 1, r


def test_gate_catches_a_spilling_config(tmp_path, monkeypatch):
    """fp32 attention with IEEE products and 64 x 64 tiles on 4 warps spills: the gate must say so, compiled cold
    (read from the log of Triton's own ptxas run) and from Triton's cache (our ptxas run on its PTX)."""
    cases = [
        c for c in attn_mod.aot_cases(head_dims=(64,)) if c.kernel == "_attn_fwd_kernel" and c.label.startswith("fp32 ")
    ]
    constexprs = dict(cases[0].constexprs, BLOCK_M=64, BLOCK_N=64)
    bad = aot.AotCase(cases[0].module, cases[0].kernel, cases[0].signature, tuple(sorted(constexprs.items())), 4, 3,
                      "fp32 d=64 64x64 w4 s3", cases[0].divisible)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # the spawned compile workers read it
    [cold] = aot.run([bad], archs=(80,), jobs=1, progress=False)
    [cached] = aot.run([bad], archs=(80,), jobs=1, progress=False)
    assert (cold.ptxas_log, cached.ptxas_log) == ("triton", "ptxas")
    for result in (cold, cached):
        assert not result.ok
        assert any("spills" in p for p in result.problems), result.problems
    assert (cold.registers, cold.spill_stores, cold.spill_loads) == (
        cached.registers, cached.spill_stores, cached.spill_loads)


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
    assert len(rows) == 4 * len(attn_mod.AOT_HEAD_DIMS) and all(r["ok"] for r in rows)  # 3 dtypes + bf16 2-batch


def test_reference_rows_compile_and_ours_keep_up():
    """The tutorial-like reference kernels compile through the same harness, with the instruction kinds their
    designs imply; our best sm_90 bf16 forward GEMM stays within 10% of the best reference matmul's hot-loop count
    and our TMA attention forward within 25% of the reference attention's (a static proxy, counted the same way)."""
    refs = aot.run(aot.collect_cases("ref_", references=True), archs=(80, 90), jobs=2, progress=False)
    assert refs and all(r.ok for r in refs), "\n" + aot.format_table([r for r in refs if not r.ok])
    for r in refs:
        if r.arch == 90:
            assert r.mma == "wgmma", (r.case.label, r.mma)
        if "TMA" in r.case.label:
            assert r.loads == "TMA", (r.case.label, r.loads)
    ours = aot.run([c for c in aot.collect_cases() if (c.name == "gemm_tma" and c.label.startswith("bf16 fwd:plain "))
                    or (c.name == "attn_fwd" and c.label.startswith("bf16 d=64 tma "))], archs=(90,), jobs=2,
                   progress=False)

    def best(rows, name):
        work = [r.work for r in rows if r.arch == 90 and r.case.name == name and r.work is not None]
        assert work, name
        return min(work)

    assert best(ours, "gemm_tma") <= 1.1 * best(refs, "ref_matmul_tma_persistent")
    assert best(ours, "attn_fwd") <= 1.25 * best(refs, "ref_attention_fwd")
