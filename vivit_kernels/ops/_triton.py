"""Shared Triton plumbing: availability, interpreter detection, bf16 emulation under the interpreter,
device checks and kernel-config tables.

Nothing here touches CUDA at import: config tables are plain data, and the device is looked at only when a
kernel is about to launch.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as e:  # noqa: BLE001 - any failure means "no Triton", reported by backend_status
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = e

# Kernels defined while this is true are interpreted (numpy on the CPU), not compiled.
INTERPRET = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
if INTERPRET:
    from .._compat import fix_interpreter_scalars

    fix_interpreter_scalars()  # Triton 3.6's interpreter with a newer numpy (see there)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Our kernels' floating-point contraction, stated rather than left to Triton's default: multiply-adds fused into FMAs
# (Triton's default up to 3.9, which every kernel was validated with; 3.10 turns the default off). Every launch and
# the compile gate pass it.
FP_FUSION = True


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of a kernel: tile sizes (meta-parameters) plus warps and pipeline stages."""

    meta: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def make(cls, num_warps: int, num_stages: int, **meta: int) -> KernelConfig:
        return cls(tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict[str, int]:
        return dict(self.meta)

    def label(self) -> str:
        tiles = " ".join(f"{k}={v}" for k, v in self.meta)
        return f"{tiles} w{self.num_warps} s{self.num_stages}"

    def to_triton(self):
        return triton.Config(self.kwargs, num_warps=self.num_warps, num_stages=self.num_stages)


def tile_configs(*rows: tuple[int, int, int, int, int]) -> list[KernelConfig]:
    """GEMM-style configs from (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) rows, grouped 8 row tiles at a time."""
    return [KernelConfig.make(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8) for m, n, k, w, s in rows]


# Kernel launches by kernel name (incremented on every launch; tests count launches per layer with it).
LAUNCHES: collections.Counter = collections.Counter()
# Called as hook(kernel_name, args) before every launch (the test suite records the devices of the tensors).
LAUNCH_HOOKS: list[Callable[[str, tuple], None]] = []


def config_key(c) -> tuple:
    """Identity of a KernelConfig or triton.Config: its meta-parameters, warps and stages."""
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


class _Benchmarker:
    """The timing function Triton's autotuner calls as ``fn(kernel_call, quantiles)``: Triton's own benchmarker
    for the active driver (CUDA events on a GPU) unless one is installed with :func:`autotuning` (tests inject a
    fake timer to run the autotuner's host path under the interpreter)."""

    timer: Callable | None = None
    # None: autotune on a GPU unless VIVIT_KERNELS_AUTOTUNE=0; True inside autotuning() (also under the interpreter)
    forced: bool | None = None

    def __call__(self, kernel_call, quantiles):
        if self.timer is not None:
            return self.timer(kernel_call, quantiles)
        from triton.runtime import driver

        return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


BENCHMARKER = _Benchmarker()
# VIVIT_KERNELS_AUTOTUNE=0: launch the first shipped config of each case instead of timing them all (the test
# suite does this, and tests every shipped config on its own); read when a kernel launches.
AUTOTUNE_ENV = "VIVIT_KERNELS_AUTOTUNE"


@contextlib.contextmanager
def autotuning(timer: Callable | None = None):
    """Within this block autotuned launches run through Triton's autotuner, also under the interpreter and with
    VIVIT_KERNELS_AUTOTUNE=0, timed by ``timer(kernel_call, quantiles) -> [median, p20, p80]`` (milliseconds;
    None: Triton's benchmarker)."""
    previous = BENCHMARKER.timer, BENCHMARKER.forced
    BENCHMARKER.timer, BENCHMARKER.forced = timer, True
    try:
        yield
    finally:
        BENCHMARKER.timer, BENCHMARKER.forced = previous


def _autotune_now() -> bool:
    if BENCHMARKER.forced:
        return True
    return not INTERPRET and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def autotuned(kernel, table: dict, row_of: Callable[[dict, dict], tuple], key: list[str]):
    """``triton.autotune`` over every config of ``table``; a call benchmarks only ``table[row_of(args,
    kwargs)]``, the shipped configs of its case (e.g. head_dim and element size). Nothing touches the
    device before the first launch."""
    configs = {config_key(c): c.to_triton() for row in table.values() for c in row}

    def prune(all_configs, named_args, **kwargs):
        wanted = {config_key(c) for c in table[row_of(named_args, kwargs)]}
        return [c for c in all_configs if config_key(c) in wanted]

    tuner = triton.autotune(configs=list(configs.values()), key=key, prune_configs_by={"early_config_prune": prune},
                            do_bench=BENCHMARKER)(kernel)
    tuner.vivit_first_config = lambda args, meta: table[row_of(dict(zip(tuner.arg_names, args, strict=False)), meta)][0]
    return tuner


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device: launches run in device_guard


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from Triton's allocator. Triton keeps the allocator in
    a context variable, so a thread that never set one (autograd runs CUDA backwards on its own device threads)
    has none: before each tensor-descriptor launch, give the current context torch's caching allocator unless
    it already has an allocator (the user's own is kept)."""
    if INTERPRET:
        return
    try:
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # a Triton without this layout: set ours each time (cheap)
        pass
    triton.set_allocator(_torch_scratch)


def tma_compatible(*tensors: torch.Tensor) -> bool:
    """Whether TMA can read these tensors: on a Hopper (or newer) GPU, unit inner stride, a 16-byte aligned
    base, and 16-byte aligned strides in every other dimension (the kernels add batch / head offsets to the
    base, so those strides count too)."""
    for t in tensors:
        if INTERPRET or t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] < 9:
            return False
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any((t.stride(d) * t.element_size()) % 16 for d in range(t.dim() - 1)):
            return False
    return True


def kernel_name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


def launch(tuned, plain, grid: Callable[[dict], tuple], args: tuple, meta: dict, config: KernelConfig | None,
           interpreter_config: KernelConfig | None = None) -> None:
    """Launch ``plain`` with a fixed config (a test's choice, or ``interpreter_config`` under the
    interpreter), or through the autotuner ``tuned`` (on a GPU unless VIVIT_KERNELS_AUTOTUNE=0; always inside
    :func:`autotuning`). ``grid(meta_params)`` gives the grid."""
    name = kernel_name(plain)
    LAUNCHES[name] += 1
    for hook in LAUNCH_HOOKS:
        hook(name, args)
    with device_guard(next(a for a in args if isinstance(a, torch.Tensor))):
        if config is None and tuned is not None:
            if _autotune_now():
                tuned[grid](*args, **meta, enable_fp_fusion=FP_FUSION)
                return
            if not INTERPRET:  # VIVIT_KERNELS_AUTOTUNE=0 on a GPU: the case's first shipped config
                config = tuned.vivit_first_config(args, meta)
        config = config or interpreter_config
        plain[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                   num_stages=config.num_stages, enable_fp_fusion=FP_FUSION)


@torch.compiler.assume_constant_result
def default_allow_tf32() -> bool:
    """float32 kernels follow torch's matmul setting: TF32 products unless the precision is "highest"
    (torch's default). A constant to torch.compile (read when a graph is traced)."""
    return torch.get_float32_matmul_precision() != "highest"


def resolve_tf32(allow_tf32: bool | None) -> bool:
    """Every op's ``allow_tf32=None`` convention: None follows torch's matmul precision (default_allow_tf32)."""
    return default_allow_tf32() if allow_tf32 is None else bool(allow_tf32)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """The kernels' DOT_PRECISION constexpr: "tf32" for float32 with TF32 allowed, else "ieee"."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels need stride 1 along the last dimension; anything else is copied once (documented per op)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def saved_outputs_only(ctx, *outputs: torch.Tensor) -> None:
    """For an op's extra outputs that exist only for its backward (a pre-activation, LayerNorm's statistics, the
    attention logsumexp): not differentiable, and no gradient is made up for them. Autograd would otherwise
    hand the backward a zero tensor of each one's size (a memset per call: 154 MB per MLP layer at
    ViViT-B, batch 8); unused gradients then arrive as None, the main output's included."""
    ctx.mark_non_differentiable(*outputs)
    ctx.set_materialize_grads(False)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check_launchable(*tensors: torch.Tensor, what: str) -> None:
    """Raise a clear error when the Triton kernels cannot run on these tensors here."""
    if not HAS_TRITON:
        raise RuntimeError(f"{what} needs Triton, which failed to import: {TRITON_IMPORT_ERROR}")
    device = tensors[0].device
    if device.type == "meta" or isinstance(tensors[0], FakeTensor):
        return  # shapes only (FakeTensorMode, meta tensors): nothing is launched
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{what}: all inputs must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{what} runs Triton kernels, which need a CUDA device; these tensors are on the CPU. To run the "
            "kernels on the CPU in the Triton interpreter (slow; for testing), set TRITON_INTERPRET=1 before "
            "importing vivit_kernels. Otherwise move the model and inputs to a CUDA device, or use "
            "attn='sdpa' / 'eager'."
        )
    raise RuntimeError(f"{what} supports CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def emulate_bf16(dtype: torch.dtype) -> bool:
    """Under the interpreter, bf16 ``tl.dot`` returns garbage and fp32->bf16 casts truncate; kernels then
    keep bf16 operands in fp32 registers and round to bf16 explicitly (see ``round_to_bf16``)."""
    return INTERPRET and dtype == torch.bfloat16


if HAS_TRITON:

    @triton.jit
    def grouped_tile_order(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of linear tile index ``tile`` in grouped order: GROUP_M row tiles take each column
        tile in turn, so a column tile of B is reused from L2 while it is there."""
        width = GROUP_M * num_n
        first_m = (tile // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (tile % width) % size_m, (tile % width) // size_m

    @triton.jit
    def round_to_bf16(x):
        """fp32 -> fp32 holding the nearest bf16 value (round half to even), as a GPU's cvt.rn.bf16 does."""
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        u = u & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)

    @triton.jit
    def to_dot_operand(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """Round an fp32 tile to the operand dtype of the next tl.dot.

        On a GPU this is a plain cast. Under the interpreter with bf16 the tile stays fp32 but holds exactly
        the bf16 values, so an fp32 dot of such tiles equals a bf16 MMA with fp32 accumulation.
        """
        if EMULATE_BF16:
            return round_to_bf16(x)
        else:
            return x.to(dtype)

    @triton.jit
    def load_operand(ptrs, mask, EMULATE_BF16: tl.constexpr, HAS_MASK: tl.constexpr):
        """Load a tile, upcast to fp32 (exact) under the interpreter with bf16."""
        if HAS_MASK:
            x = tl.load(ptrs, mask=mask, other=0.0)
        else:
            x = tl.load(ptrs)
        if EMULATE_BF16:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def to_output(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """Cast an fp32 result to the output dtype with round-to-nearest, also under the interpreter."""
        if EMULATE_BF16:
            x = round_to_bf16(x)
        return x.to(dtype)
