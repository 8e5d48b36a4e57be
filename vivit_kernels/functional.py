"""The functional API of vivit_kernels' ops, each beside its eager PyTorch reference (``*_ref``).

Triton (GPU, or the Triton interpreter on CPU under TRITON_INTERPRET=1): ``flash_attention``,
``flash_attention_qkv``, ``qkv_projection``, ``linear``, ``mlp``, ``layer_norm``, ``patch_embed``. C++/CUDA
extension (csrc/, with PyTorch fallbacks): ``preprocess_video``, ``bias_gelu_fast``.

Each op's kernels, custom ops and configs live in ``vivit_kernels.ops.<module>``; ``vivit_kernels.ops.registry``
lists per op its implementations (ours and the vendor ones ``attn="auto"`` chooses among), reference, cost,
tests and benchmark. (The functions live here, not in ``vivit_kernels.ops``, so that ``vivit_kernels.ops.linear``
is always the module.)
"""

from .ops.activations import gelu_fast, get_activation
from .ops.attention import attention_ref, flash_attention, flash_attention_qkv
from .ops.gelu import bias_gelu_fast, bias_gelu_fast_ref
from .ops.layer_norm import layer_norm, layer_norm_ref
from .ops.linear import linear, linear_ref, mlp, mlp_ref, qkv_projection, qkv_projection_ref
from .ops.patch_embed import patch_embed, patch_embed_ref
from .ops.preprocess import preprocess_video, preprocess_video_ref

__all__ = [
    "attention_ref", "bias_gelu_fast", "bias_gelu_fast_ref", "flash_attention", "flash_attention_qkv", "gelu_fast",
    "get_activation", "layer_norm", "layer_norm_ref", "linear", "linear_ref", "mlp", "mlp_ref", "patch_embed",
    "patch_embed_ref", "preprocess_video", "preprocess_video_ref", "qkv_projection", "qkv_projection_ref",
]
