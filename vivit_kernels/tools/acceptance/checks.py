"""Sections 1 to 3 of the acceptance run: the environment and its measured peaks; correctness at ViViT-B shapes
(every op of the registry, forward and every input gradient, against its reference by the suite's tolerance rule;
the whole model against transformers' eager attention); per-op speed of every registered implementation and of the
auto dispatcher, each checked before its time counts."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time

from .run import Acceptance, first_line, median_ms, ops_dtype, torch_dtype

__all__ = ["versions", "section_environment", "section_correctness", "section_ops"]


# ------------------------------------------------------------------------------------------------
# 1. Environment
# ------------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    from ... import __version__
    from ..._compat import installed_versions

    names = ("torch", "triton", "transformers", "huggingface_hub", "accelerate", "peft", "numpy", "av")
    return {"python": platform.python_version(), "vivit_kernels": __version__, **installed_versions(names)}


def _nvidia_smi(index: int) -> dict[str, str]:
    fields = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.limit", "pstate")
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia-smi": f"not available ({type(e).__name__})"}
    if out.returncode != 0:
        return {"nvidia-smi": f"failed: {out.stderr.strip()[:200]}"}
    return dict(zip(fields, (v.strip() for v in out.stdout.strip().split(",")), strict=False))


def section_environment(run: Acceptance) -> None:
    import torch

    from ..._devices import device_name
    from ...ops import _extension, _triton

    env = run.data["environment"]
    env["versions"] = versions()
    env["torch_cuda"] = torch.version.cuda or "none (CPU build)"
    env["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
    env["extension"] = list(_extension.status().values())
    env["triton_interpreter"] = bool(_triton.INTERPRET)
    env["host"] = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        env["device"] = props.name
        env["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            **{
                k: getattr(props, k)
                for k in ("clock_rate", "memory_clock_rate", "memory_bus_width")
                if hasattr(props, k)
            },
            **_nvidia_smi(run.device.index or 0),
        }
    else:
        env["device"] = device_name(run.device)
    run.save()

    def peaks():
        from ...ops.formulas import gemm_flops

        n, dtype = run.plan.matmul_n, ops_dtype(run.device)  # the per-op figures' dtype
        a = torch.randn(n, n, device=run.device, dtype=torch_dtype(dtype))
        b = torch.randn(n, n, device=run.device, dtype=torch_dtype(dtype))
        ms = median_ms(run, lambda: a @ b)
        env["peak_matmul_tflops"] = gemm_flops(n, n, n) / (ms * 1e-3) / 1e12
        env["peak_matmul"] = f"{dtype} {n}x{n}x{n}"
        nbytes = run.plan.copy_mib * 2**20
        src = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
        dst = torch.empty_like(src)
        ms = median_ms(run, lambda: dst.copy_(src))
        env["peak_copy_gbps"] = 2 * nbytes / (ms * 1e-3) / 1e9  # read + write
        env["peak_copy_bytes"] = nbytes

    run.step("environment", "measured peaks", "environment", peaks)


# ------------------------------------------------------------------------------------------------
# 2. Correctness
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _strict_fp32():
    """fp32 references in IEEE fp32: no TF32 in cuBLAS or cuDNN (cuDNN convolutions allow it by default)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _record_checks(run: Acceptance, section: str, case: str, shape: str, dtype: str, checks, seconds: float) -> None:
    ok = all(c.ok for c in checks)
    worst = max(checks, key=lambda c: c.error / c.allowed if c.allowed > 0 else math.inf)
    run.data[section].append({
        "case": case, "shape": shape, "dtype": dtype, "ok": ok, "seconds": round(seconds, 3),
        "worst": {"name": worst.name, "error": worst.error, "allowed": worst.allowed},
        "checks": [{"name": c.name, "error": c.error, "allowed": c.allowed, "ok": c.ok} for c in checks],
    })
    for c in checks:
        if not c.ok:
            run.fail(section, case, c.message(), shape=shape, dtype=dtype)


def _checked_ops() -> list[str]:
    """The registry's ops, in its order: what sections 2 and 3 check (a test narrows it)."""
    from ...ops.registry import OPS

    return list(OPS)


def _case(op: str, variant) -> str:
    return op if variant is None else f"{op} {variant}"


def _shape_text(args: tuple) -> str:
    return ", ".join("x".join(map(str, a.shape)) for a in args if hasattr(a, "shape"))


def section_correctness(run: Acceptance) -> None:
    """In the order that tells the most soonest: every op in bf16, the model in bf16, then fp32 (ops, model), then
    fp16. Each op's inputs, reference and our implementation come from its registry entry; an op a layer runs is
    checked in every dtype, the extension's ops in the dtypes their entries list."""
    import torch

    from ...ops.registry import OPS
    from ...testing import compare_to_reference

    shape = run.plan.shape(run.plan.correct_batch)

    def op_checks(dtype: str) -> None:
        for op in _checked_ops():
            entry = OPS[op]
            if not entry.backend and torch_dtype(dtype) not in entry.dtypes:
                continue
            why = entry.ours.available(run.device)
            if why:  # e.g. the extension built without its CUDA half: said, never a fallback checked in its place
                run.skip("correctness", f"{op} {dtype}", why)
                continue
            for variant in entry.variants:
                case = _case(op, variant)

                def check(entry=entry, variant=variant, case=case):
                    inputs = entry.sample_inputs(shape, torch.float32, run.device, True, variant)
                    start = time.perf_counter()
                    with _strict_fp32():
                        checks = compare_to_reference(entry.ours.fn, entry.reference, inputs, torch_dtype(dtype),
                                                      name=case)
                    run.sync()
                    _record_checks(run, "correctness", case, _shape_text(inputs), dtype, checks,
                                   time.perf_counter() - start)

                run.step("correctness", f"{case} {dtype}", "op", check, dtype=dtype)

    def model_check(dtype: str) -> None:
        run.step("correctness", f"model {dtype}", "model", lambda: _check_model(run, dtype),
                 shape=f"{run.plan.preset} batch {run.plan.model_batch}", dtype=dtype)

    for dtype in run.plan.correct_dtypes:
        op_checks(dtype)
        if dtype in ("bf16", "fp32"):
            model_check(dtype)


def _model_pair(preset: str, device):
    import torch

    from ...model import VivitConfig, VivitForVideoClassification

    cfg = VivitConfig.from_preset(preset)
    torch.manual_seed(0)
    eager = VivitForVideoClassification(cfg, attn="eager")
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = VivitForVideoClassification(cfg, attn="triton")
    ours.load_state_dict(eager.state_dict())
    return cfg, eager.to(device), ours.to(device)


def _check_model(run: Acceptance, dtype: str) -> None:
    """attn="triton" against transformers' eager attention, same weights: logits and every parameter gradient.
    fp32: strict (1e-3 of the reference's magnitude: 12 layers of 3137 tokens in IEEE fp32); bf16: the rule,
    against the fp32 eager model, with the bf16 eager model as PyTorch's own same-dtype error."""
    import torch

    from ...presets import image_hw
    from ...testing import judge_outputs

    start = time.perf_counter()
    cfg, eager, ours = _model_pair(run.plan.preset, run.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(run.plan.model_batch, cfg.num_frames, 3, *image_hw(cfg), generator=g).to(run.device)
    labels = torch.randint(0, cfg.num_labels, (run.plan.model_batch,), generator=g).to(run.device)
    names = [n for n, _ in eager.named_parameters()]

    def run_model(model, cast):
        model.zero_grad(set_to_none=True)
        out = model(x.to(cast), labels=labels)
        out.loss.backward()
        grads = dict(model.named_parameters())
        return out.logits.detach().float(), [None if grads[n].grad is None else grads[n].grad.detach().float()
                                             for n in names]

    with _strict_fp32():
        ref = run_model(eager, torch.float32)
        if dtype == "fp32":
            logits, grads = run_model(ours, torch.float32)
            checks = judge_outputs(logits, grads, ref, None, fp32_atol=1e-3, grad_names=names)
        else:
            low_dtype = torch_dtype(dtype)
            eager.to(low_dtype)
            ours.to(low_dtype)
            low = run_model(eager, low_dtype)
            logits, grads = run_model(ours, low_dtype)
            checks = judge_outputs(logits, grads, ref, low, grad_names=names)
    run.sync()
    n_grads = sum(g is not None for g in ref[1])
    _record_checks(run, "correctness", f"model (attn='triton' vs eager, logits + {n_grads} gradients)",
                   f"{run.plan.preset} batch {run.plan.model_batch}", dtype, checks, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------
# 3. Per-op speed
# ------------------------------------------------------------------------------------------------
def section_ops(run: Acceptance) -> None:
    """Per op of the registry a layer runs, inference and training: every available implementation and the auto
    dispatcher, each checked against the reference (the tolerance rule) before its median time counts; TFLOP/s
    or GB/s from the entry's own FLOP and byte formulas, and the fraction of the measured peak."""
    import torch

    from ...auto.backends import auto_backend
    from ...ops import _triton
    from ...ops.registry import OPS
    from ...testing import judge_outputs, run_with_grads

    dtype_name = ops_dtype(run.device)
    dtype = torch_dtype(dtype_name)
    auto = auto_backend()
    env = run.data["environment"]
    shape = run.plan.shape(run.plan.ops_batch)
    for op in _checked_ops():
        entry = OPS[op]
        if not entry.backend:  # the extension's ops are the layers' helpers: timed inside linear's cublas+ext
            continue
        for mode in ("infer", "train"):
            training = mode == "train"

            def reference(entry=entry, training=training):
                with _strict_fp32():
                    leaves = entry.sample_inputs(shape, torch.float32, run.device, training, entry.variants[0])
                    ref32 = _outputs(entry.reference, leaves, torch.float32, training, run_with_grads)
                    low = None if dtype == torch.float32 else _outputs(entry.reference, leaves, dtype, training,
                                                                       run_with_grads)
                return leaves, ref32, low

            prepared = run.step("ops", f"{op} {mode} reference", "speed", reference)
            if prepared is None:
                continue
            leaves, ref32, low = prepared
            args = tuple(t.detach().to(dtype) if isinstance(t, torch.Tensor) else t for t in leaves)
            shape_text = _shape_text(args)
            names = [n for n, impl in entry.implementations.items() if impl.available(run.device) is None]
            for name in names + ["auto"]:
                fn = auto.fns[op] if name == "auto" else entry.implementations[name].fn

                def measure(entry=entry, op=op, name=name, fn=fn, mode=mode, training=training, leaves=leaves,
                            ref32=ref32, low=low, args=args, shape_text=shape_text):
                    before = sum(_triton.LAUNCHES.values())
                    start = time.perf_counter()
                    try:
                        got = _outputs(fn, leaves, dtype, training, run_with_grads)
                    except Exception as e:  # noqa: BLE001 - a vendor backend that refuses these inputs is no failure
                        run.data["ops"].append({"op": op, "implementation": name, "mode": mode, "dtype": dtype_name,
                                                "shape": shape_text, "ms": None, "unavailable": first_line(e)})
                        return
                    run.sync()
                    first_s = time.perf_counter() - start
                    interpreted = _triton.INTERPRET and sum(_triton.LAUNCHES.values()) > before
                    checks = judge_outputs(got[0], got[1], ref32, low, name=op)
                    ok = all(c.ok for c in checks)
                    row = {"op": op, "implementation": name, "mode": mode, "dtype": dtype_name, "shape": shape_text,
                           "runs": "attn='auto' dispatch" if name == "auto" else
                           entry.implementations[name].runs(run.device),
                           "checked": ok, "interpreted": interpreted, "ms": None}
                    if not ok:
                        for c in checks:
                            if not c.ok:
                                run.fail("ops", f"{op} {name} {mode}", c.message(), shape=shape_text, dtype=dtype_name)
                        run.data["ops"].append(row)
                        return
                    ms = median_ms(run, fn, training, args) if not interpreted else first_s * 1e3
                    run.overhead("ops", first_s - ms * 1e-3)
                    work, moved = entry.cost(args, training)
                    row.update(ms=ms)
                    if not interpreted:
                        if work:
                            row["tflops"] = work / (ms * 1e-3) / 1e12
                            if env.get("peak_matmul_tflops"):
                                row["fraction_of_peak"] = row["tflops"] / env["peak_matmul_tflops"]
                        else:
                            row["gbps"] = moved / (ms * 1e-3) / 1e9
                            if env.get("peak_copy_gbps"):
                                row["fraction_of_peak"] = row["gbps"] / env["peak_copy_gbps"]
                    run.data["ops"].append(row)

                run.step("ops", f"{op} {name} {mode}", "speed", measure, dtype=dtype_name)
            del leaves, ref32, low, prepared, args


def _outputs(fn, leaves, dtype, training, run_with_grads):
    """(output, input gradients) in ``dtype``; inference: (output, [])."""
    import torch

    if training:
        return run_with_grads(fn, leaves, dtype)
    with torch.no_grad():
        args = tuple(t.detach().to(dtype) if isinstance(t, torch.Tensor) else t for t in leaves)
        return fn(*args).detach(), []


