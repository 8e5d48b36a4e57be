"""Every public import path of vivit_kernels 0.2.0 before the package was reorganised (auto/, tools/, video.py)
still works: each module imports, and each name it exported is there. Modules that moved are aliases of their new
home (the same module object); names that moved are importable from their old module too. (The acceptance run's
own op-case helpers, never exported, are gone: the op registry is the only list of ops.)"""

from __future__ import annotations

import importlib

import pytest

# module -> the names it exported (its __all__; for a module without one, its entry points), space-separated
PUBLIC_API: dict[str, str] = {
    'vivit_kernels': (
        'CheckpointError PRESETS VideoProcessor VivitConfig VivitFactorizedConfig '
        'VivitFactorizedForVideoClassification VivitFactorizedModel VivitForVideoClassification VivitModel '
        'apply_vivit_kernels functional ops read_video'
    ),
    'vivit_kernels.acceptance': (
        'Acceptance COMPILED DEFAULT_BUDGET_S DRY_PLAN DTYPE_NAMES FORMAT GPU_PLAN Plan README_BEGIN '
        'README_END RESULTS_DIR SECTIONS SECTION_ENDS SEED_PROVIDERS add_arguments build_seed_model '
        'default_out_dir execute gpu_slug newest_results ops_dtype peak_memory_mb readme_section '
        'render_report run_cli section_auto section_correctness section_environment section_ops section_seed '
        'seed_step update_readme versions'
    ),
    'vivit_kernels.aot': (
        'AotResult REFERENCE_MODULES add_arguments analyse_sass collect_cases compile_case disassemble '
        'format_table hot_loop main occupancy problems run run_cli'
    ),
    'vivit_kernels.aot_reference': 'aot_cases',
    'vivit_kernels.backends': 'ATTN_CHOICES Backend backend_status get_backend',
    'vivit_kernels.bench_report': 'inference_table load_benchmarks main ops_table training_table write_report',
    'vivit_kernels.checkpoint': 'CheckpointError atomic_save check_local',
    'vivit_kernels.cli': (
        'UsageError build_parser cmd_classify cmd_demo cmd_finetune cmd_info cmd_predict cmd_tune main'
    ),
    'vivit_kernels.data': (
        'Augment VIDEO_EXTENSIONS VideoBatchPreparer VideoClipDataset VideoItem VideoSplits collate_clips '
        'default_workers find_videos folder_items label_maps load_video_splits manifest_items'
    ),
    'vivit_kernels.finetune': 'VideoTrainer build_model evaluate_clips finetune parse_views processor_for_vit',
    'vivit_kernels.functional': (
        'attention_ref bias_gelu_fast bias_gelu_fast_ref flash_attention flash_attention_qkv gelu_fast '
        'get_activation layer_norm layer_norm_ref linear linear_ref mlp mlp_ref patch_embed patch_embed_ref '
        'preprocess_video preprocess_video_ref qkv_projection qkv_projection_ref'
    ),
    'vivit_kernels.guard': 'ModelPath decide guard_pre_hook key_of',
    'vivit_kernels.inflate': 'INFLATE_CHOICES inflate_patch_filter repeat_position_table vivit_from_vit',
    'vivit_kernels.integrations': 'register_transformers_attention transformers_attention_forward',
    'vivit_kernels.measure': (
        'GPUS MODEL_VARIANTS Measurement NO_LAUNCH_ATEN PROVIDERS format_markdown format_models_markdown '
        'measure measure_all measure_models'
    ),
    'vivit_kernels.model': (
        'CheckpointError PRESETS VivitConfig VivitForVideoClassification VivitModel apply_vivit_kernels '
        'image_hw num_tokens'
    ),
    'vivit_kernels.models': (
        'ATTENTION_TYPES FACTORIZED_PRESETS VivitFactorizedConfig VivitFactorizedForVideoClassification '
        'VivitFactorizedModel factorized_reference_forward pool_tokens'
    ),
    'vivit_kernels.models.factorized': (
        'ATTENTION_TYPES FACTORIZED_PRESETS VivitFactorizedConfig VivitFactorizedForVideoClassification '
        'VivitFactorizedModel factorized_reference_forward pool_tokens'
    ),
    'vivit_kernels.modules': (
        'KERNEL_SUBCLASSES KernelLayerNorm KernelVivitAttention KernelVivitEmbeddings KernelVivitLayer'
    ),
    'vivit_kernels.ops': '',
    'vivit_kernels.ops.activations': 'ACTIVATIONS gelu_fast get_activation',
    'vivit_kernels.ops.attention': (
        'DKDV_CONFIGS DQ_CONFIGS FWD_CONFIGS MAX_HEAD_DIM SHORT_N attention_ref flash_attention '
        'flash_attention_qkv'
    ),
    'vivit_kernels.ops.gelu': 'bias_gelu_fast bias_gelu_fast_ref',
    'vivit_kernels.ops.layer_norm': 'LN_CONFIGS MAX_FEATURES layer_norm layer_norm_ref',
    'vivit_kernels.ops.linear': (
        'gelu_fast_backward_ref linear linear_ref mlp mlp_ref qkv_projection qkv_projection_ref'
    ),
    'vivit_kernels.ops.patch_embed': 'PATCH_CONFIGS patch_embed patch_embed_ref',
    'vivit_kernels.ops.preprocess': 'PRECISION_BITS bilinear_weights preprocess_video preprocess_video_ref',
    'vivit_kernels.ops.registry': 'Implementation OPS Op aot_modules ours',
    'vivit_kernels.patch': 'AttnMixin apply_vivit_kernels attn_of',
    'vivit_kernels.predict': 'FAILED_EXIT_CODE Predictor Timings collect_inputs predict predict_to_file',
    'vivit_kernels.presets': 'ATTENTION_TYPES FACTORIZED_PRESETS PRESETS',
    'vivit_kernels.processing': 'Clips PROCESSOR_PRESETS VideoProcessor read_clips read_video sample_frame_indices',
    'vivit_kernels.providers': (
        'Timing WHOLE_MODEL available cache_path choose entry_rows forget format_entries load_cache measure '
        'parse_pins pins_from_env recording remember timer verify'
    ),
    'vivit_kernels.testing': (
        'Comparison assert_close assert_within_rule check_against_reference compare_to_reference judge '
        'max_abs_diff run_with_grads'
    ),
    'vivit_kernels.tune': 'model_calls tune_model',
}


@pytest.mark.parametrize("module", sorted(PUBLIC_API))
def test_every_public_import_path_still_works(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC_API[module].split() if not hasattr(mod, name)]
    assert missing == [], f"{module} lost {missing}"


def test_moved_modules_are_aliases_of_their_new_home():
    import vivit_kernels.acceptance as acceptance
    import vivit_kernels.backends as backends
    import vivit_kernels.providers as providers
    import vivit_kernels.tools.acceptance as new_acceptance
    from vivit_kernels.auto import backends as new_backends
    from vivit_kernels.auto import choose

    assert providers is choose and backends is new_backends and acceptance is new_acceptance

