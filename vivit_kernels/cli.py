"""The vivit-kernels command line: info, demo, classify, predict, finetune, tune, acceptance, compile-report, bench.

Thin by design: every option is declared once (``OPTIONS``: one name, one default, everywhere), each command parses,
then imports the module that does the work (``--help`` imports no torch). On a machine without CUDA, demo and
classify turn on the Triton interpreter (TRITON_INTERPRET=1) before any kernel is defined. Defaults: the GPU when
there is one, our kernels (attn="auto") in bf16 there, sdpa in float32 on the CPU; a checkpoint's own clip sampling.
Ordinary mistakes (a missing file, a bad flag value) print one line and exit with status 1; --debug shows the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from .names import ATTN, DECODERS, DTYPES


class UsageError(Exception):
    """A mistake in how a command was called: one line, exit status 1."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _merge_spec(text: str):
    """--merge: "16" (r per layer), "0.1" (a fraction per layer), "8,8,4,..." (per layer), a schedule's name, or
    "off"; the schedule itself is checked against the model (vivit_kernels.merging.merge_schedule)."""
    text = text.strip()
    try:
        if "," in text:
            return [int(part) for part in text.split(",")]
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        if "," in text or not text or text[0].isdigit() or text[0] in ".-":
            raise argparse.ArgumentTypeError(f"expected r, a fraction, r per layer (8,8,4) or a schedule's name, "
                                             f"got {text!r}") from None
        return text


# Every option of the commands, declared once: (flags, argparse keywords). A command takes the ones it needs with
# `_options(parser, name, ...)`; only a help text or a list of choices may differ between commands.
OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "model": (("--model",), dict(help="a checkpoint directory (default: a small model with random weights)")),
    "preset": (("--preset",), dict(help="a preset with random weights when no --model is given")),
    "device": (("--device",), dict(help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")),
    "dtype": (("--dtype",), dict(choices=tuple(DTYPES.values()),
                                     help="default: bfloat16 on a GPU, float32 on the CPU")),
    "attn": (("--attn",), dict(choices=ATTN, help="default: auto on a GPU (our kernels where they are faster), "
                                                  "sdpa on the CPU")),
    "frame-sample-rate": (("--frame-sample-rate",), dict(type=_positive, help="take every n-th frame (default: the "
                                                                              "checkpoint's own sampling, else 2)")),
    "clips": (("--clips",), dict(type=_positive, default=1, help="temporal clips per video (default 1: the middle)")),
    "crops": (("--crops",), dict(type=int, default=1, choices=[1, 3], help="spatial crops per clip")),
    "top-k": (("--top-k",), dict(type=_positive, default=5)),
    "batch-size": (("--batch-size",), dict(type=_positive, default=8, help="videos (predict) or clips (finetune) "
                                                                           "per step and process")),
    "batch": (("--batch",), dict(type=_positive, help="clips per batch (default: demo 1; tune 8, the batch its "
                                                      "choices are made for)")),
    "workers": (("--workers",), dict(type=int, help="decoding workers per process (default: half the cores, at "
                                                    "most 8)")),
    "seed": (("--seed",), dict(type=int, default=0, help="seeds the random weights, data order, clip sampling and "
                                                         "augmentation (default 0)")),
    "decode": (("--decode",), dict(choices=DECODERS, default="auto",
                                   help="video decoder: pyav (auto: the fastest on the CPU), torchcodec, or cuda "
                                        "(torchcodec on the GPU's hardware decoders, NVDEC; decodes in the main "
                                        "process) (docs/video.md)")),
    "no-progress": (("--no-progress",), dict(action="store_true", help="no progress bars")),
    "merge": (("--merge",), dict(type=_merge_spec, help="token merging (docs/merging.md): r tokens merged per layer "
                                                       "(16), a fraction per layer (0.1), r per layer (8,8,4,...) or "
                                                       "a schedule (fraction-10); off turns a checkpoint's own off")),
}


def _options(parser: argparse.ArgumentParser, *names: str, **overrides: dict[str, Any]) -> None:
    for name in names:
        flags, kwargs = OPTIONS[name]
        extra = overrides.get(name.replace("-", "_"), {})
        unknown = set(extra) - {"help", "choices", "required"}
        if unknown:
            raise ValueError(f"option --{name} is declared once; a command may change only its help, choices or "
                             f"required, not {sorted(unknown)}")
        parser.add_argument(*flags, **{**kwargs, **extra})


def _dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


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


# ------------------------------------------------------------------------------------------------
# Commands: parse, import what does the work, print
# ------------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    from .tools.info import print_info

    print_info()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ._devices import run_defaults
    from .tools.demo import run_demo

    device, dtype, _ = run_defaults(_device(args.device), _dtype(args.dtype))
    run_demo(args.model, args.preset or "small", device, dtype, args.batch or 1, args.repeats, args.seed, args.merge)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .predict import classify

    if not os.path.isfile(args.video):  # before building a model
        raise UsageError(f"no video file {args.video}" + (" (it is a directory)" if os.path.isdir(args.video) else ""))
    model = args.model
    if model is None:
        import torch

        from .model import VivitForVideoClassification

        torch.manual_seed(args.seed)
        model = VivitForVideoClassification(args.preset or "small")
        print(f"model: preset {args.preset or 'small'!r} with RANDOM weights: the labels below mean nothing "
              "(--model DIR)")
    row = classify(args.video, model, clips=args.clips, crops=args.crops, top_k=args.top_k,
                   frame_sample_rate=args.frame_sample_rate, device=_device(args.device), dtype=_dtype(args.dtype),
                   attn=args.attn, merge=args.merge, decode=args.decode)
    print(f"{args.video}: {row['views']} view(s) of {row['frames']} frames, {row['pixels']} pixels")
    for label, p in zip(row["labels"], row["scores"], strict=True):
        print(f"  {p:7.2%}  {label}")
    merging = f", token merging {row['merge']}" if row["merge"] else ""
    print(f"decode {row['decode_ms']:.0f} ms ({row['decode']}), preprocess {row['preprocess_ms']:.0f} ms "
          f"({row['device']}), forward {row['forward_ms']:.0f} ms (attn={row['attn']}{merging})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import FAILED_EXIT_CODE, predict_to_file

    options = dict(embeddings=args.embeddings, progress=not args.no_progress, retry_errors=args.retry_errors,
                   clips=args.clips, crops=args.crops, top_k=args.top_k, batch_size=args.batch_size,
                   frame_sample_rate=args.frame_sample_rate, device=_device(args.device), dtype=_dtype(args.dtype),
                   attn=args.attn, merge=args.merge, decode=args.decode)
    if args.ray is not None:
        from .ray_predict import predict_on_ray

        if args.workers is not None:
            raise UsageError("--workers is predict's own decoding processes; on Ray use --decode-workers")
        summary = predict_on_ray(args.inputs, args.model, args.out, address=None if args.ray == "local" else args.ray,
                                 decode_workers=args.decode_workers, model_actors=args.model_actors, **options)
    else:
        if args.decode_workers is not None or args.model_actors is not None:
            raise UsageError("--decode-workers and --model-actors are for --ray")
        summary = predict_to_file(args.inputs, args.model, args.out, workers=args.workers, **options)
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


def cmd_timeline(args: argparse.Namespace) -> int:
    import json

    from .timeline import plot_timeline, timeline

    if not os.path.isfile(args.video):  # before building a model
        raise UsageError(f"no video file {args.video}" + (" (it is a directory)" if os.path.isdir(args.video) else ""))
    result = timeline(args.video, args.model, window=args.window, stride=args.stride, top_k=args.top_k,
                      batch_size=args.batch_size, progress=not args.no_progress,
                      frame_sample_rate=args.frame_sample_rate, device=_device(args.device), dtype=_dtype(args.dtype),
                      attn=args.attn, merge=args.merge)
    out = args.out or os.path.splitext(os.path.basename(args.video))[0] + ".timeline.json"
    tmp = out + ".partial"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, out)
    if args.plot:
        plot_timeline(result, args.plot)
    fps = f" at {result['fps']:g} fps" if result["fps"] else ""
    print(f"{args.video}: {result['frames']} frames{fps}, {len(result['windows'])} windows of "
          f"{result['window_frames']} frames every {result['stride_frames']}")
    for w in result["windows"]:
        when = (f"{w['start_s']:8.2f}-{w['end_s']:.2f} s" if w["start_s"] is not None
                else f"frames {w['start_frame']}-{w['end_frame']}")
        print(f"  {when}  {w['scores'][0]:7.2%}  {w['labels'][0]}")
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    if "error" in result:
        print(f"warning: {result['error']}")
    return 0


_FINETUNE_ARGS = ("model", "preset", "from_vit", "inflate", "attention_type", "val", "val_fraction", "num_frames",
                  "tubelet_time", "frame_sample_rate", "epochs", "max_steps", "batch_size", "grad_accum", "lr",
                  "weight_decay", "warmup", "scheduler", "label_smoothing", "bf16", "gradient_checkpointing",
                  "lora_rank", "lora_alpha", "freeze_backbone", "train_last_layers", "attn", "workers", "flip",
                  "resume", "fsdp", "seed", "logging_steps", "save_steps", "device", "decode", "merge")


def cmd_finetune(args: argparse.Namespace) -> int:
    if not os.path.exists(args.data):
        raise UsageError(f"no video folder or manifest at {args.data}")
    if args.model is None and args.preset is None and args.from_vit is None:
        args.preset = "vivit-b-16x2"  # the paper's model with random weights; said below
        print("vivit-kernels finetune: no --model / --from-vit given: training preset 'vivit-b-16x2' from random "
              "weights", file=sys.stderr)
    from .finetune import finetune, parse_views

    try:
        result = finetune(args.data, args.out, eval_views=parse_views(args.eval_views), progress=not args.no_progress,
                          **{name: getattr(args, name) for name in _FINETUNE_ARGS})
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


def cmd_tune(args: argparse.Namespace) -> int:
    from ._devices import run_defaults
    from .auto import cache, tune

    device, dtype, _ = run_defaults(_device(args.device), _dtype(args.dtype))
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    if device.type == "cpu":
        print("tuning on the CPU: the candidates are torch's implementations (the Triton interpreter is no speed "
              "candidate); the choices that matter are made on a GPU", file=sys.stderr)
    rows = tune.tune_model(args.preset or "vivit-b-16x2", args.batch or 8, dtype, device, modes, progress=True)
    print(cache.format_entries(rows))
    ops = sum(1 for row in rows if row["op"] != cache.WHOLE_MODEL)
    print(f"\n{len(rows)} choices stored in {cache.cache_path()} for {cache.device_id(str(device))}: "
          f"{ops} op calls, {len(rows) - ops} whole-model (kernels or transformers' path)")
    return 0


# ------------------------------------------------------------------------------------------------
# The parser
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .presets import ATTENTION_TYPES, FACTORIZED_PRESETS, PRESETS

    parser = argparse.ArgumentParser(prog="vivit-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vivit_kernels {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    presets = sorted(PRESETS)
    all_presets = presets + sorted(FACTORIZED_PRESETS)

    p = sub.add_parser("info", help="versions, device, and which backends and kernels are available")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="run a clip through every available backend; print agreement and timing")
    _options(p, "model", "preset", "device", "dtype", "batch", "seed", "merge",
             preset=dict(choices=presets, help="model preset when no --model is given (default: small)"),
             merge=dict(help="also run every backend with token merging: r per layer (16), a fraction per layer "
                             "(0.1), r per layer (8,8,4,...) or a schedule (fraction-10)"))
    p.add_argument("--repeats", type=_positive, default=3)
    p.set_defaults(func=cmd_demo, interpreter=True)

    p = sub.add_parser("classify", help="classify a video file: decode, preprocess on the model's device, top-k")
    p.add_argument("video")
    _options(p, "model", "preset", "attn", "device", "dtype", "top-k", "clips", "crops", "frame-sample-rate", "merge",
             "seed", "decode",
             preset=dict(choices=presets, help="model preset when no --model is given (default: small)"))
    p.set_defaults(func=cmd_classify, interpreter=True)

    p = sub.add_parser("predict", help="classify a collection (files, folders, globs, manifests) into a resumable "
                                       "JSONL, with pooled embeddings; torchrun for several GPUs")
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), globs, or CSV / JSONL manifests with "
                                            "a path column")
    _options(p, "model", model=dict(required=True, help="checkpoint directory"))
    p.add_argument("--out", required=True, help="the JSONL file: one line per video; run again to resume")
    p.add_argument("--embeddings", help="also write the pooled features: FILE.safetensors or FILE.npy")
    _options(p, "clips", "crops", "top-k", "batch-size", "frame-sample-rate", "workers", "device", "dtype", "attn",
             "merge", "decode", "no-progress")
    p.add_argument("--retry-errors", action="store_true", help="try the videos whose earlier line is an error again")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray (vivit_kernels[ray]): decoding on CPU workers, the model on GPU actors; ADDRESS a "
                        "cluster's ('auto' on one of its machines), none for a local instance")
    p.add_argument("--decode-workers", type=_positive, help="--ray: decode tasks at a time (default: the CPUs)")
    p.add_argument("--model-actors", type=_positive, help="--ray: model actors (default: one per GPU, else one)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("timeline", help="what happens when along a whole video: every window scored, a JSON of "
                                        "per-window top-k labels and a plot of the top labels over time")
    p.add_argument("video")
    _options(p, "model", model=dict(required=True, help="checkpoint directory"))
    p.add_argument("--window", help="window length: frames (64) or seconds (2.5s); default: the span of the "
                                    "checkpoint's clip (num_frames x frame sample rate)")
    p.add_argument("--stride", help="distance between window starts: frames or seconds (default: one window)")
    p.add_argument("--out", help="the JSON file (default: VIDEO's name + .timeline.json, here)")
    p.add_argument("--plot", help="also draw the top labels' probabilities over time into this PNG")
    _options(p, "top-k", "batch-size", "frame-sample-rate", "device", "dtype", "attn", "merge", "no-progress",
             batch_size=dict(help="windows per forward"))
    p.set_defaults(func=cmd_timeline)

    p = sub.add_parser("finetune", help="fine-tune on your videos (class folders or a manifest) with transformers' "
                                        "Trainer on our kernels; torchrun for several GPUs")
    p.add_argument("data", help="root/<label>/<video> (optionally root/train, root/val), or a CSV / JSONL manifest "
                                "(path, label[, split])")
    p.add_argument("--out", required=True, help="output directory: checkpoints, the final model, results")
    start = p.add_mutually_exclusive_group()
    _options(start, "model", "preset", model=dict(help="a ViViT checkpoint directory to start from"),
             preset=dict(choices=all_presets, help="a preset with random weights (the -fe / -fsa / -fdp ones: the "
                                                   "paper's Models 2, 3, 4; default: vivit-b-16x2 when neither --model "
                                                   "nor --from-vit is given)"))
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
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
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
    p.add_argument("--freeze-backbone", action="store_true", help="train the classifier alone on frozen features "
                                                                   "(a linear probe); with --train-last-layers N also "
                                                                   "the last N layers")
    p.add_argument("--train-last-layers", type=int, default=0, help="with --freeze-backbone: the last N encoder "
                                                                    "layers train too")
    p.add_argument("--eval-views", default="4x3", help="final evaluation views CLIPSxCROPS (default 4x3)")
    p.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability (0 for labels that depend "
                                                           "on left and right)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    p.add_argument("--logging-steps", type=_positive, default=10)
    p.add_argument("--save-steps", type=_positive, help="save a checkpoint every n steps (default: every epoch)")
    _options(p, "frame-sample-rate", "batch-size", "attn", "workers", "seed", "device", "decode", "no-progress",
             "merge", merge=dict(help="token merging while training (docs/merging.md): r per layer (16), a fraction "
                                      "per layer (0.1), r per layer (8,8,4,...) or a schedule (fraction-10); kept in "
                                      "the checkpoint, so predict merges alike; off turns a checkpoint's own off"))
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("tune", help="measure the attn='auto' implementations of a model's ops ahead of time and "
                                    "store the choices")
    _options(p, "preset", "batch", "dtype", "device",
             preset=dict(choices=presets, help="model preset (default: vivit-b-16x2)"))
    p.add_argument("--mode", default="both", choices=["both", "infer", "train"],
                   help="inference calls, training calls (forward + backward timed), or both")
    p.set_defaults(func=cmd_tune)

    from .tools import acceptance, aot, bench_report  # light modules: they import torch only when a command runs

    p = sub.add_parser("acceptance", help="the first thing to run on a GPU: correctness at ViViT-B shapes, per-op "
                                          "speed against cuBLAS / cuDNN / SDPA, the seed's tables, in one bounded run")
    acceptance.add_arguments(p)
    p.set_defaults(func=acceptance.run_cli)

    p = sub.add_parser("bench", help="measurements, the timed benchmark suite (bench/), and the report")
    bench_report.add_arguments(p)
    p.set_defaults(func=bench_report.run_cli)

    p = sub.add_parser(
        "compile-report", help="compile every shipped Triton kernel config for sm_80/sm_90 (no GPU needed)"
    )
    aot.add_arguments(p)
    p.set_defaults(func=aot.run_cli)
    for p in sub.choices.values():  # --debug after the command too (set only when given: the global one stays)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    return parser


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
