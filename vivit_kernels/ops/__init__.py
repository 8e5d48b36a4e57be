"""Functional API of vivit_kernels' ops; each has its eager PyTorch reference (``*_ref``) beside it.

Triton (GPU, or the Triton interpreter on CPU under TRITON_INTERPRET=1): ``flash_attention``, ``linear``,
``mlp``, ``layer_norm``, ``patch_embed``. C++/CUDA extension (csrc/, with PyTorch fallbacks):
``preprocess_video``, ``bias_gelu_fast``.

The functions ``linear``, ``layer_norm`` and ``patch_embed`` share their names with the modules that define
them; import from the modules (``from vivit_kernels.ops.linear import GEMM_CONFIGS``) for the rest.
"""

from .activations import gelu_fast, get_activation
from .attention import attention_ref, flash_attention, flash_attention_qkv
from .gelu import bias_gelu_fast, bias_gelu_fast_ref
from .layer_norm import layer_norm, layer_norm_ref
from .linear import linear, linear_ref, mlp, mlp_ref, qkv_projection, qkv_projection_ref
from .patch_embed import patch_embed, patch_embed_ref
from .preprocess import preprocess_video, preprocess_video_ref

__all__ = [
    "attention_ref",
    "bias_gelu_fast",
    "bias_gelu_fast_ref",
    "flash_attention",
    "flash_attention_qkv",
    "gelu_fast",
    "get_activation",
    "layer_norm",
    "layer_norm_ref",
    "linear",
    "linear_ref",
    "mlp",
    "mlp_ref",
    "patch_embed",
    "patch_embed_ref",
    "preprocess_video",
    "preprocess_video_ref",
    "qkv_projection",
    "qkv_projection_ref",
]
