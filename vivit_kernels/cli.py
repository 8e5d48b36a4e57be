"""The vivit-kernels command line: info | demo | classify | predict | finetune | tune | acceptance | compile-report | bench.

The heavy imports happen inside each command, after the command has configured the environment: on a
machine without CUDA, demo and classify turn on the Triton interpreter (TRITON_INTERPRET=1) before any kernel is
defined, so the Triton backend can be checked there too. Ordinary mistakes (a missing file, a bad flag value)
print one line and exit with status 1; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings


def _versions() -> list[tuple[str, str]]:
    from ._compat import installed_versions

    names = ("torch", "triton", "numpy", "safetensors", "transformers", "av")
    return [("python", platform.python_version()), *installed_versions(names).items()]


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    print("vivit_kernels", _package_version())
    for name, version in _versions():
        print(f"  {name:<13} {version}")
    print(f"  {'torch CUDA':<13} {torch.version.cuda or 'none (CPU build)'}")
    print("device")
    gpu = torch.cuda.is_available()
    if gpu:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"  cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("  no CUDA device: the Triton kernels run only in the Triton interpreter (slow; a correctness check)")
    from .backends import backend_status

    print("backends (attn=...)")
    for name, (ok, why) in backend_status().items():
        print(f"  {name:<8} {'available' if ok else 'unavailable'}: {why}")
    if not gpu:
        interp = os.environ.get("TRITON_INTERPRET", "unset")
        print("what the commands do here")
        print("  demo, classify  switch the Triton interpreter on themselves: attn='triton' runs, slowly, as a "
              "correctness run")
        print(f"  your own code   attn='triton' needs TRITON_INTERPRET=1 set before importing vivit_kernels (now: {interp})")
        print("  tune, auto      time torch's implementations only (the interpreter is no speed candidate)")
        print("  acceptance      --dry-run only: the GPU run's plumbing at tiny shapes in the interpreter")
    else:
        print("first on this GPU: `vivit-kernels acceptance` (correctness at ViViT-B shapes, per-op speed against "
              "cuBLAS / cuDNN / SDPA, the seed's tables; budgeted to 8 minutes)")
    from .ops import _extension

    print("C++/CUDA extension (video preprocessing, bias + gelu_fast)")
    for _, line in _extension.status().items():
        print(f"  {line}")
    _print_provider_cache()
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import torch

    from . import providers, tune

    device = _device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    if device.type == "cpu":
        print("tuning on the CPU: the candidates are torch's implementations (the Triton interpreter is no speed "
              "candidate); the choices that matter are made on a GPU", file=sys.stderr)
    rows = tune.tune_model(args.config, args.batch, dtype, device, modes, progress=True)
    print(providers.format_entries(rows))
    ops = sum(1 for row in rows if row["op"] != providers.WHOLE_MODEL)
    print(f"\n{len(rows)} choices stored in {providers.cache_path()} for {providers._device_id(str(device))}: "
          f"{ops} op calls, {len(rows) - ops} whole-model (kernels or transformers' path)")
    return 0


def _print_provider_cache() -> None:
    from . import providers

    path = providers.cache_path()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = providers.load_cache()
    state = "missing" if not path.exists() else ("unreadable: " + str(caught[0].message) if caught else f"{len(entries)} entries")
    print(f"attn='auto' choices: {path} ({state})")
    for entry in sorted(entries.values(), key=lambda e: (e["device"], e["op"], e["mode"], e["shapes"])):
        first = entry["shapes"].split(" ")[0] or "-"
        print(f"  {entry['op']:<14} {entry['mode']:<6} {first:<20} -> {entry['choice']:<14} ({entry['device']})")


def _package_version() -> str:
    from . import __version__

    return __version__


def _synthetic_clip(frames: int, height: int, width: int, seed: int = 0):
    """A deterministic uint8 clip (T, H, W, 3): a bright square moving over a colour gradient, plus noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    clip = torch.empty(frames, height, width, 3)
    side = max(2, min(height, width) // 4)
    for t in range(frames):
        frame = torch.stack([ys, xs, (ys + xs) / 2], dim=-1).clone()
        y0 = (t * height // max(frames, 1)) % max(height - side, 1)
        x0 = (t * width // max(frames, 1)) % max(width - side, 1)
        frame[y0 : y0 + side, x0 : x0 + side] = 255.0
        clip[t] = frame + 8 * torch.randn(height, width, 3, generator=g)
    return clip.clamp(0, 255).to(torch.uint8)


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .backends import ATTN_CHOICES, backend_status
    from .model import VivitForVideoClassification, image_hw, num_tokens

    device = _device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model:
        model = VivitForVideoClassification.from_pretrained(args.model, dtype=dtype).to(device).eval()
        print(f"model: {args.model} ({type(model).__name__})")
    else:
        torch.manual_seed(args.seed)
        model = VivitForVideoClassification(args.preset).to(device=device, dtype=dtype).eval()
        print(
            f"model: preset {args.preset!r} with RANDOM weights (seed {args.seed}); its labels mean nothing. "
            "Pass --model DIR for a real checkpoint."
        )
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    height, width = image_hw(cfg)
    print(
        f"  {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"{num_tokens(cfg)} tokens, {n_params / 1e6:.2f} M parameters, {dtype}, {device}"
    )
    processor = _processor_for(model, args.model)
    clip = _synthetic_clip(cfg.num_frames, height * 3 // 2, width * 2, seed=args.seed)  # resized and cropped
    pixel_values = processor(clip[None].repeat(args.batch, 1, 1, 1, 1), device=device, dtype=dtype)["pixel_values"]
    print(f"input: synthetic {tuple(clip.shape[1:3])} clip -> VideoProcessor -> pixel_values "
          f"{tuple(pixel_values.shape)} (batch, frames, channels, H, W)")

    status = backend_status()
    results, ran = {}, {}
    for name in ATTN_CHOICES:
        ok, why = status[name]
        if not ok:
            print(f"  {name:<7} skipped: {why}")
            continue
        model.set_attn(name)
        repeats = 1 if _interpreted(name, device) else args.repeats  # the interpreter is slow and not timed
        ran[name] = repeats
        with torch.no_grad():
            logits = model(pixel_values).logits  # warm-up (compiles kernels on first use)
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                logits = model(pixel_values).logits
            _sync(device)
        ms = (time.perf_counter() - start) * 1e3 / repeats
        results[name] = (logits.float(), ms)

    reference = results.get("eager", next(iter(results.values())))[0]
    print(f"\n{'backend':<8} {'ms/batch':>10} {'max |logits - eager|':>22}  top-1 label")
    for name, (logits, ms) in results.items():
        top = logits[0].argmax().item()
        diff = (logits - reference).abs().max().item()
        note = " (Triton interpreter on CPU: a correctness run, not a speed figure)" if _interpreted(name, device) else ""
        print(f"{name:<8} {ms:>10.2f} {diff:>22.3g}  {cfg.id2label.get(top, top)}{note}")
    timed = sorted({n for n in results if not _interpreted(n, device)})
    print(f"\ntimings are wall-clock on {_device_name(device)}, after one warm-up: the mean of {args.repeats} "
          f"{'run' if args.repeats == 1 else 'runs'} for {', '.join(timed)}"
          + ("; the interpreted Triton run once, as a correctness check" if "triton" in results and "triton" not in timed else ""))
    return 0


def _processor_for(model, model_dir):
    """The checkpoint's preprocessor_config.json, else transformers' defaults scaled to the model's size."""
    from .processing import VideoProcessor

    return VideoProcessor.for_model(model.config, model_dir)


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from .model import VivitForVideoClassification
    from .processing import read_clips

    if not os.path.isfile(args.video):  # before building a model
        raise UsageError(f"no video file {args.video}" + (" (it is a directory)" if os.path.isdir(args.video) else ""))
    device = _device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model:
        model = VivitForVideoClassification.from_pretrained(args.model, attn=args.attn, dtype=dtype).to(device).eval()
    else:
        torch.manual_seed(args.seed)
        model = VivitForVideoClassification(args.preset, attn=args.attn).to(device=device, dtype=dtype).eval()
        print(f"model: preset {args.preset!r} with RANDOM weights: the labels below mean nothing (--model DIR)")
    cfg = model.config
    processor = _processor_for(model, args.model)
    if args.crops == 3:
        processor.spatial_crops = 3
    start = time.perf_counter()
    # the evaluation views, as `predict` and finetune's evaluation take them: 1 clip is the middle window
    frames = read_clips(args.video, cfg.num_frames, args.frame_sample_rate, args.clips).frames
    decoded = time.perf_counter()
    pixel_values = processor(torch.from_numpy(frames), device=device, dtype=dtype)["pixel_values"]
    _sync(device)
    processed = time.perf_counter()
    with torch.no_grad():
        logits = model(pixel_values).logits.float()
    _sync(device)
    done = time.perf_counter()
    probs = logits.softmax(-1).mean(0)  # average over clips x crops
    top = probs.topk(min(args.top_k, probs.numel()))
    views = pixel_values.shape[0]
    print(f"{args.video}: {views} view(s) of {cfg.num_frames} frames, {tuple(pixel_values.shape[-2:])} pixels")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"  {p:7.2%}  {cfg.id2label.get(i, str(i))}")
    print(f"decode {1e3 * (decoded - start):.0f} ms, preprocess {1e3 * (processed - decoded):.0f} ms "
          f"({device.type}), forward {1e3 * (done - processed):.0f} ms (attn={model.attn})")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    if not os.path.exists(args.data):
        raise UsageError(f"no video folder or manifest at {args.data}")
    if sum(x is not None for x in (args.model, args.preset, args.from_vit)) == 0:
        args.preset = "vivit-b-16x2"  # the paper's model with random weights; said below
        print("vivit-kernels finetune: no --model / --from-vit given: training preset 'vivit-b-16x2' from random "
              "weights", file=sys.stderr)
    try:
        result = _finetune_from_args(args)
    finally:  # torchrun: Trainer's process group goes before the interpreter does (a live gloo group can abort exit)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        m = result["metrics"]
        print(f"trained {m['steps']} steps on {result['train_videos']} videos ({len(result['labels'])} labels), "
              f"{m['train_clips_per_s']} clips/s, peak memory {m['peak_memory_gib']} GiB, {result['world_size']} "
              f"process(es)")
        if "multiview_top1" in m:
            print(f"held-out ({m['multiview_videos']} videos, {m['multiview_views']} views): top-1 "
                  f"{m['multiview_top1']:.2%}, top-5 {m['multiview_top5']:.2%}")
        print(f"model: {result['out']} (VivitForVideoClassification.from_pretrained or transformers' "
              f"AutoModelForVideoClassification; classify with --model {result['out']})")
        if result["skipped"]:
            print(f"{len(result['skipped'])} video(s) could not be read and were skipped: listed in "
                  f"{os.path.join(result['out'], 'finetune_results.json')}")
    return 0


def _finetune_from_args(args: argparse.Namespace) -> dict:
    from .finetune import finetune, parse_views

    return finetune(
        args.data, args.out, model=args.model, preset=args.preset, from_vit=args.from_vit, inflate=args.inflate,
        val=args.val, val_fraction=args.val_fraction, num_frames=args.num_frames, tubelet_time=args.tubelet_time,
        frame_sample_rate=args.frame_sample_rate, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        warmup=args.warmup, scheduler=args.scheduler, label_smoothing=args.label_smoothing, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        attention_type=args.attention_type, attn=args.attn, workers=args.workers,
        eval_views=parse_views(args.eval_views), flip=args.flip,
        resume=args.resume, fsdp=args.fsdp, seed=args.seed, logging_steps=args.logging_steps,
        save_steps=args.save_steps, device=args.device, progress=not args.no_progress)


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from .predict import FAILED_EXIT_CODE, predict_to_file

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    device = _device(args.device)
    summary = predict_to_file(
        args.inputs, args.model, args.out, embeddings=args.embeddings, progress=not args.no_progress,
        retry_errors=args.retry_errors, clips=args.clips, crops=args.crops, top_k=args.top_k,
        batch_size=args.batch_size, frame_sample_rate=args.frame_sample_rate, workers=args.workers, device=device,
        dtype=dtype, attn=args.attn)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"this run: {summary['this_run'].summary()}")
    if summary["skipped_already_done"]:
        print(f"{summary['skipped_already_done']} video(s) already had a line in {args.out}: skipped")
    if "embeddings" in summary:
        print(f"embeddings: {summary['embeddings']['rows']} rows in {summary['embeddings']['file']}")
    print(f"{summary['out']}: {summary['rows']} lines for {summary['inputs']} inputs, {summary['failed']} failed"
          + (" (their lines have 'error'; --retry-errors tries them again)" if summary["failed"] else ""))
    return FAILED_EXIT_CODE if summary["failed"] else 0


class UsageError(Exception):
    """A mistake in how a command was called: one line, exit status 1."""


def _device(requested):
    """The --device to use: cuda when available by default; a clear error for cuda without a GPU."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: there is no CUDA device here (torch.cuda.is_available() is False); "
                         "use --device cpu")
    return device


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _interpreted(backend: str, device) -> bool:
    return backend == "triton" and device.type == "cpu"


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _use_interpreter_without_gpu() -> None:
    """Run Triton kernels in the interpreter when there is no GPU (must precede any kernel definition)."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


def _one_line_warnings(command: str) -> None:
    """Warnings as the user reads them: "vivit-kernels CMD: warning: ...", one line, no source path of ours
    (--debug keeps Python's own format)."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"vivit-kernels {command}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .presets import ATTENTION_TYPES, FACTORIZED_PRESETS, PRESETS

    parser = argparse.ArgumentParser(prog="vivit-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vivit_kernels {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sorted(PRESETS)

    p = sub.add_parser("info", help="versions, device, and which backends and kernels are available")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run a clip through every available backend; print agreement and timing")
    p.add_argument("--model", help="checkpoint directory (default: a small random-weight model)")
    p.add_argument("--preset", default="small", choices=presets, help="model preset when no --model is given (default: small)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--repeats", type=_positive, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo, interpreter=True)

    p = sub.add_parser("classify", help="classify a video file: decode, preprocess on the model's device, top-k")
    p.add_argument("video")
    p.add_argument("--model", help="checkpoint directory (default: a small random-weight model)")
    p.add_argument("--preset", default="small", choices=presets, help="model preset when no --model is given")
    p.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "triton", "auto"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--top-k", type=_positive, default=5)
    p.add_argument("--clips", type=_positive, default=1, help="temporal clips (e.g. 4 for multi-view evaluation)")
    p.add_argument("--crops", type=int, default=1, choices=[1, 3], help="spatial crops per clip")
    p.add_argument("--frame-sample-rate", type=_positive, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_classify, interpreter=True)

    p = sub.add_parser("predict", help="classify a collection (files, folders, globs, manifests) into a resumable "
                                       "JSONL, with pooled embeddings; torchrun for several GPUs")
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), globs, or CSV / JSONL manifests with "
                                            "a path column")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--out", required=True, help="the JSONL file: one line per video; run again to resume")
    p.add_argument("--embeddings", help="also write the pooled features: FILE.safetensors or FILE.npy")
    p.add_argument("--clips", type=_positive, default=1, help="temporal clips per video (default 1: the middle)")
    p.add_argument("--crops", type=int, default=1, choices=[1, 3], help="spatial crops per clip")
    p.add_argument("--top-k", type=_positive, default=5)
    p.add_argument("--batch-size", type=_positive, default=8, help="videos per batch (their views in one forward)")
    p.add_argument("--frame-sample-rate", type=_positive, default=1)
    p.add_argument("--workers", type=int, help="decoding workers (default: half the cores, at most 8)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: bfloat16 on a GPU, "
                                                                              "float32 on the CPU")
    p.add_argument("--attn", choices=["eager", "sdpa", "triton", "auto"], help="default: auto on a GPU, sdpa on "
                                                                              "the CPU")
    p.add_argument("--retry-errors", action="store_true", help="try the videos whose earlier line is an error again")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="fine-tune on your videos (class folders or a manifest) with transformers' "
                                        "Trainer on our kernels; torchrun for several GPUs")
    p.add_argument("data", help="root/<label>/<video> (optionally root/train, root/val), or a CSV / JSONL manifest "
                                "(path, label[, split])")
    p.add_argument("--out", required=True, help="output directory: checkpoints, the final model, results")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--model", help="a ViViT checkpoint directory to start from")
    start.add_argument("--preset", choices=presets + sorted(FACTORIZED_PRESETS),
                       help="a preset with random weights (the -fe / -fsa / -fdp ones: the paper's Models 2, 3, 4; "
                            "default: vivit-b-16x2 when neither --model nor --from-vit is given)")
    start.add_argument("--from-vit", help="an image ViT checkpoint (transformers ViTModel / "
                                          "ViTForImageClassification) to inflate, the paper's section 3.4")
    p.add_argument("--inflate", default="central", choices=["central", "average"],
                   help="how --from-vit's patch filter becomes a tubelet filter (default: central)")
    p.add_argument("--attention-type", choices=list(ATTENTION_TYPES),
                   help="--from-vit: build the paper's Model 2, 3 or 4 (default: Model 1, transformers' ViViT)")
    p.add_argument("--val", help="held-out videos (a folder or manifest); default: DATA's val/ or a split of it")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held out per label when DATA has no val split")
    p.add_argument("--num-frames", type=_positive, help="frames per clip (presets and --from-vit; default 32)")
    p.add_argument("--tubelet-time", type=_positive, default=2, help="--from-vit: time steps per tubelet")
    p.add_argument("--frame-sample-rate", type=_positive, default=2, help="take every n-th frame (default 2)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=_positive, default=8, help="clips per GPU (process) and step")
    p.add_argument("--grad-accum", type=_positive, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up: a fraction of the steps (< 1) or steps")
    p.add_argument("--scheduler", default="cosine", help="transformers' lr_scheduler_type (default: cosine)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on where the GPU supports it)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on q and v (PEFT) and "
                                                            "the classifier; 0: train everything")
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--attn", default="auto", choices=["eager", "sdpa", "triton", "auto"])
    p.add_argument("--workers", type=int, help="decoding workers per process (default: half the cores, at most 8)")
    p.add_argument("--eval-views", default="4x3", help="final evaluation views CLIPSxCROPS (default 4x3)")
    p.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability (0 for labels that depend "
                                                           "on left and right)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=_positive, default=10)
    p.add_argument("--save-steps", type=_positive, help="save a checkpoint every n steps (default: every epoch)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("tune", help="measure the attn='auto' providers of a model ahead of time and store the choices")
    p.add_argument("--config", default="vivit-b-16x2", choices=presets, help="model preset (default: vivit-b-16x2)")
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--mode", default="both", choices=["both", "infer", "train"],
                   help="inference calls, training calls (forward + backward timed), or both")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.set_defaults(func=cmd_tune)

    from . import acceptance, aot, bench_report  # light modules: they import torch only when a command runs

    p = sub.add_parser("acceptance", help="the first thing to run on a GPU: correctness at ViViT-B shapes, per-op "
                                          "speed against cuBLAS / cuDNN / SDPA, the seed's tables, in one bounded run")
    acceptance.add_arguments(p)
    p.set_defaults(func=acceptance.run_cli)

    p = sub.add_parser("bench", help="measurements, the timed benchmark suite (bench/), and the report")
    bench_report.add_arguments(p)
    p.set_defaults(func=bench_report.run_cli)

    p = sub.add_parser("compile-report", help="compile every shipped Triton kernel config for sm_80/sm_90 (no GPU needed)")
    aot.add_arguments(p)
    p.set_defaults(func=aot.run_cli)
    for p in sub.choices.values():  # --debug after the command too (set only when given: the global one stays)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:] if args.command in argv else []
    if getattr(args, "interpreter", False):
        _use_interpreter_without_gpu()
    if not args.debug:
        _one_line_warnings(args.command)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vivit-kernels: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; --debug re-raises
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, (UsageError, ValueError, FileNotFoundError, PermissionError)):
            message = f"{type(e).__name__}: {message}"
        print(f"vivit-kernels {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
