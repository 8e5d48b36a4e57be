"""The autotuner's host path, in the default suite: every autotuned kernel launched through Triton's
``Autotuner`` with our pruning function and key, under the interpreter (or compiled on CUDA) with an injected
timing function. A broken autotune call fails here, not on a user's GPU.

The fake timer runs each candidate once (so every benchmarked config really executes) and reports a time that
favours one chosen config, which must then be the one used."""

from __future__ import annotations

import inspect

import pytest
import torch

from vivit_kernels.ops import _gemm, _triton
from vivit_kernels.ops import attention as attn_mod
from vivit_kernels.ops import patch_embed as pe

from helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton


class FakeTimer:
    """Times a candidate by its config: ``favour`` (a config_key) takes 1 ms, any other 2 ms."""

    def __init__(self, favour: tuple | None = None):
        self.favour = favour
        self.benchmarked: list[tuple] = []
        self.by_tuner: dict[int, list[tuple]] = {}

    def __call__(self, kernel_call, quantiles):
        closure = inspect.getclosurevars(kernel_call).nonlocals  # the candidate and the Autotuner Triton passes
        kernel_call()
        key = _triton.config_key(closure["config"])
        self.benchmarked.append(key)
        self.by_tuner.setdefault(id(closure["self"]), []).append(key)
        ms = 1.0 if key == self.favour else 2.0
        return [ms, ms, ms]


def _reset(tuner) -> None:
    tuner.cache.clear()


def _keys(configs) -> list[tuple]:
    return sorted(_triton.config_key(c) for c in configs)


def test_gemm_autotune_prunes_keys_and_picks_the_fastest():
    tuner = _gemm._gemm_tuned
    _reset(tuner)
    row = _gemm.GEMM_CONFIGS[(2, "ieee", "main")]
    favour = _triton.config_key(row[-1])  # not the first: a tuner that ignores timings picks row[0]
    timer = FakeTimer(favour)
    a = torch.randn(70, 40, device=DEVICE).half()
    b = (torch.randn(40, 50, device=DEVICE) * 0.2).half()
    bias = torch.randn(50, device=DEVICE).half()
    out = torch.empty(70, 50, device=DEVICE, dtype=torch.float16)
    with _triton.autotuning(timer):
        _gemm.gemm(a, b, out, bias=bias)
        assert sorted(timer.benchmarked) == _keys(row)  # pruned to the case's row, every config run once
        assert _triton.config_key(tuner.best_config) == favour
        assert_close(out, (a.float() @ b.float() + bias.float()), 2e-2, name="tuned gemm")

        n_before = len(timer.benchmarked)
        _gemm.gemm(a, b, out, bias=bias)  # same key: the cached choice, no new benchmark
        assert len(timer.benchmarked) == n_before
        assert len(tuner.cache) == 1

        _gemm.gemm(a[:33], b, out[:33], bias=bias)  # a new M is a new key: tuned again
        assert len(timer.benchmarked) == 2 * n_before
        assert len(tuner.cache) == 2

        dgelu_row = _gemm.GEMM_CONFIGS[(2, "ieee", "dgelu")]
        timer.benchmarked.clear()
        h = torch.randn(70, 50, device=DEVICE).half()
        act = torch.empty_like(out)
        _gemm.gemm(a, b, out, dgelu_of=h, pre=act)  # the gelu-backward epilogue: its own row
        assert sorted(timer.benchmarked) == _keys(dgelu_row)


@pytest.mark.parametrize("tokens", [70, 300], ids=["short-row", "long-row"])
@pytest.mark.parametrize("tuner_name, table_name, favour_index", [
    ("_attn_fwd_tuned", "FWD_ROWS", -1), ("_attn_bwd_dkdv_tuned", "DKDV_ROWS", 1),
    ("_attn_bwd_dq_tuned", "DQ_ROWS", 0),
])
def test_attention_autotune(tuner_name, table_name, favour_index, tokens):
    tuner = getattr(attn_mod, tuner_name)
    # head_dim 64, 2-byte elements, this device's architecture; up to SHORT_N tokens the short sequences' row
    row = getattr(attn_mod, table_name)[(64, 2, attn_mod.arch_of(DEVICE), tokens <= attn_mod.SHORT_N)]
    _reset(tuner)
    timer = FakeTimer(_triton.config_key(row[favour_index]))
    qkv = torch.randn(1, tokens, 3, 2, 64, device=DEVICE).to(torch.float16).requires_grad_()
    with _triton.autotuning(timer):
        out = attn_mod.flash_attention_qkv(qkv)
        out.backward(torch.randn_like(out))
    assert sorted(timer.by_tuner[id(tuner)]) == _keys(row)  # this kernel benchmarked exactly its row
    assert _triton.config_key(tuner.best_config) == timer.favour
    ref = qkv.detach().float().requires_grad_()
    ref_out = attn_mod.attention_ref(*ref.unbind(2))
    assert_close(out.float(), ref_out, 1e-2, name="out")


def test_a_biased_attention_tunes_over_the_bias_rows():
    """Proportional attention (a per-key bias) leaves out the configs that spill with it (the compile gate):
    its launch benchmarks exactly its bias row; on sm_80 that row is one config short of the plain one."""
    tuner = attn_mod._attn_fwd_tuned
    _reset(tuner)
    key = (32, 2, attn_mod.arch_of(DEVICE), False)  # head_dim 32, 2-byte elements, a long sequence
    row, plain = attn_mod.FWD_BIAS_ROWS[key], attn_mod.FWD_ROWS[key]
    if key[2] == 80:
        assert len(row) == len(plain) - 1
    timer = FakeTimer(_triton.config_key(row[0]))
    q = torch.randn(1, 300, 2, 32, device=DEVICE).half()
    bias = torch.rand(1, 300, device=DEVICE)
    with _triton.autotuning(timer):
        out = attn_mod.flash_attention(q, q, q, bias=bias)
    assert sorted(timer.by_tuner[id(tuner)]) == _keys(row)
    ref = attn_mod.attention_ref(q.float(), q.float(), q.float(), bias=bias)
    assert_close(out.float(), ref, 1e-2, name="biased out")


def test_attention_key_separates_sequence_lengths():
    tuner = attn_mod._attn_fwd_tuned
    _reset(tuner)
    timer = FakeTimer()
    with _triton.autotuning(timer):
        for n in (40, 40, 90):
            q = torch.randn(1, n, 2, 32, device=DEVICE).half()
            attn_mod.flash_attention(q, q, q)
    row = attn_mod.FWD_ROWS[(32, 2, attn_mod.arch_of(DEVICE), True)]  # both lengths are short sequences
    assert len(timer.benchmarked) == 2 * len(row)  # N=40 tuned once, N=90 tuned again
    assert len(tuner.cache) == 2


def test_patch_embed_autotune():
    tuner = pe._fwd_tuned
    _reset(tuner)
    row = pe.PATCH_CONFIGS["fwd"][(4, "ieee")]
    timer = FakeTimer(_triton.config_key(row[-1]))
    x = torch.randn(1, 4, 3, 32, 32, device=DEVICE)
    w = torch.randn(16, 3, 2, 16, 16, device=DEVICE) * 0.05
    b, cls, pos = (
        torch.randn(16, device=DEVICE),
        torch.randn(1, 1, 16, device=DEVICE),
        torch.randn(1, 9, 16, device=DEVICE),
    )
    with _triton.autotuning(timer):
        out = pe.patch_embed(x, w, b, cls, pos, allow_tf32=False)
    assert sorted(timer.benchmarked) == _keys(row)
    assert _triton.config_key(tuner.best_config) == timer.favour
    assert_close(out, pe.patch_embed_ref(x, w, b, cls, pos), 1e-4, name="patch_embed")


def test_without_autotuning_one_fixed_config():
    """Outside autotuning(): the interpreter launches its fixed config, and a GPU with VIVIT_KERNELS_AUTOTUNE=0 (this
    suite) the case's first shipped config; neither fills the autotuner's cache."""
    tuner = _gemm._gemm_tuned
    _reset(tuner)
    a = torch.randn(20, 16, device=DEVICE)
    _gemm.gemm(a, a.t(), torch.empty(20, 20, device=DEVICE))
    assert len(tuner.cache) == 0
    args = (a.half(),) + (None,) * (len(tuner.arg_names) - 1)
    meta = dict(DOT_PRECISION="ieee", DGELU=True)
    assert tuner.vivit_first_config(args, meta) is _gemm.GEMM_CONFIGS[(2, "ieee", "dgelu")][0]
