"""The public API of vivit_kernels 0.3.0, pinned: ``vivit_kernels.__all__``, the functional API, the ops package and
the op registry's names (``attn="auto"``'s pins and cache keys use them), and the command line (each command, its
arguments and its options). A change to any of them is a change users see: it goes into CHANGELOG.md and this file
together. (The paths that moved in 0.3.0 are listed in CHANGELOG.md; none of them is importable any more.)"""

from __future__ import annotations

import argparse
import importlib

import pytest

import vivit_kernels
from vivit_kernels import functional
from vivit_kernels.cli import build_parser

PACKAGE = (
    "CheckpointError PRESETS VideoProcessor VivitConfig VivitFactorizedConfig VivitFactorizedForVideoClassification "
    "VivitFactorizedModel VivitForVideoClassification VivitModel apply_vivit_kernels functional ops read_video"
)
FUNCTIONAL = (
    "attention_ref bias_gelu_fast bias_gelu_fast_ref flash_attention flash_attention_qkv gelu_fast get_activation "
    "layer_norm layer_norm_ref linear linear_ref mlp mlp_ref patch_embed patch_embed_ref preprocess_video "
    "preprocess_video_ref qkv_projection qkv_projection_ref"
)
# the ops package's public modules (one per op, and the registry, its formulas and sample inputs)
OPS_MODULES = ("activations attention formulas gelu layer_norm linear patch_embed preprocess registry sample_inputs "
               "token_merge token_sets")
# op -> its implementations, as the registry names them (what VIVIT_KERNELS_IMPLEMENTATIONS and pins= take)
IMPLEMENTATIONS = {
    "layer_norm": "triton torch",
    "qkv": "triton cublas",
    "linear": "triton cublas cublas+ext",
    "mlp": "triton cublas cublas+ext",
    "attention_qkv": "triton sdpa-flash sdpa-cudnn sdpa-efficient",
    "attention": "triton sdpa-flash sdpa-cudnn sdpa-efficient",
    "patch_embed": "triton torch",
    "bias_gelu_fast": "extension torch",
    "preprocess_video": "extension",
    "token_merge": "triton",
}
# command -> (positional arguments, options)
CLI = {
    "info": ("", ""),
    "demo": ("", "--batch --device --dtype --merge --model --preset --repeats --seed"),
    "classify": ("video", "--attn --clips --crops --decode --device --dtype --frame-sample-rate --merge --model "
                          "--preset --seed --top-k"),
    "predict": ("inputs", "--attn --batch-size --clips --crops --decode --decode-workers --device --dtype "
                          "--embeddings --frame-sample-rate --merge --model --model-actors --no-progress --out --ray "
                          "--retry-errors --top-k --workers"),
    "timeline": ("video", "--attn --batch-size --device --dtype --frame-sample-rate --merge --model --no-progress "
                          "--out --plot --stride --top-k --window"),
    "finetune": ("data", "--attention-type --attn --batch-size --bf16 --decode --device --epochs --eval-views --flip "
                         "--frame-sample-rate --freeze-backbone --from-vit --fsdp --grad-accum "
                         "--gradient-checkpointing --inflate --label-smoothing --logging-steps --lora-alpha "
                         "--lora-rank --lr --max-steps --merge --model --no-bf16 --no-progress --num-frames --out "
                         "--preset "
                         "--resume --save-steps --scheduler --seed --train-last-layers --tubelet-time --val "
                         "--val-fraction --warmup --weight-decay --workers"),
    "tune": ("", "--batch --device --dtype --mode --preset"),
    "acceptance": ("", "--autotune --budget-s --dry-run --out --sections"),
    "bench": ("", "--dtype --measure-batches --measure-config --out --skip-measure --skip-timing -k"),
    "compile-report": ("", "--arch --jobs --json --kernel --no-reference --quiet -j"),
}


def test_the_package_exports_exactly_its_public_names():
    assert vivit_kernels.__all__ == PACKAGE.split()
    missing = [name for name in vivit_kernels.__all__ if getattr(vivit_kernels, name, None) is None]
    assert missing == []
    assert vivit_kernels.__version__ == "0.3.0"


def test_the_functional_api():
    assert sorted(functional.__all__) == FUNCTIONAL.split()
    assert all(callable(getattr(functional, name)) for name in functional.__all__)


@pytest.mark.parametrize("module", OPS_MODULES.split())
def test_the_ops_modules_import(module):
    importlib.import_module(f"vivit_kernels.ops.{module}")


def test_the_registry_names_ops_and_implementations_as_pinned():
    from vivit_kernels.ops.registry import OPS

    assert {op: " ".join(entry.implementations) for op, entry in OPS.items()} == IMPLEMENTATIONS


def _commands() -> dict[str, tuple[str, str]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, parser in sub.choices.items():
        positional = " ".join(a.dest for a in parser._actions if not a.option_strings)
        options = sorted(o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help", "--debug"))
        out[name] = (positional, " ".join(options))
    return out


def test_the_command_line():
    assert _commands() == CLI


@pytest.mark.parametrize("old", ["acceptance", "aot", "aot_reference", "backends", "bench_report", "guard", "measure",
                                 "providers", "tune", "patch", "fusion"])
def test_the_moved_paths_are_gone(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"vivit_kernels.{old}")
