"""transformers' ViViT modules with a kernel forward: subclasses with the same parameters, buffers and names,
whose ``forward`` calls the functions of a :class:`~vivit_kernels.backends.Backend` (``apply_vivit_kernels`` in
``monkey_patch.py`` swaps them in).

A layer fuses work across modules (the three projections in one GEMM, the residual into the output projection,
the MLP into two GEMMs) only where the modules are the plain ones it knows (nn.Linear, nn.LayerNorm, nn.Conv3d,
transformers' ViViT modules) without hooks; a wrapped or replaced module (a LoRA layer, a quantized linear, a
hooked module) runs its own forward, the rest stays on our kernels, and one log line says what fell back and why.
Under attn="auto", when the whole-model guard chose transformers' path for this forward (``guard.py``), every
module runs transformers' own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import FastGELUActivation
from transformers.models.vivit import modeling_vivit as hf

from ._log import log_once
from .auto.backends import Backend
from .merging import active as merging_state
from .ops.attention import attention_ref, sdpa_attention
from .peft_lora import add_lora_, dropout_active, fusable_adapters, linear_parts
from .plain_modules import (
    KERNEL_CLASSES,
    autocast_dtype,
    autocast_to,
    collecting_attentions,
    compute_weight,
    has_hooks,
    plain,
)

__all__ = ["KernelLayerNorm", "KernelVivitEmbeddings", "KernelVivitAttention", "KernelVivitLayer", "KERNEL_SUBCLASSES",
           "KernelModule", "kernel_mlp"]


def _name(module: nn.Module, child: str) -> str:
    return f"{getattr(module, '_vivit_name', type(module).__name__)}.{child}"


def _linear(backend: Backend, module: nn.Module, where: str, x: torch.Tensor, activation_fn=None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + activation_fn(module(x))`` for a linear submodule: one GEMM with the bias, gelu_fast and the
    residual in its epilogue when it is a plain nn.Linear and the linear op is on (another activation runs after it
    in torch), else the module's own forward followed by the activation and the residual."""
    fused_gelu = isinstance(activation_fn, FastGELUActivation)
    parts = linear_parts(module, x, where) if backend.linear is not None else None
    if parts is not None:
        base, adapters = parts
        w, b = compute_weight(base.weight, x), compute_weight(base.bias, x)
        if not adapters and (activation_fn is None or fused_gelu):
            return backend.linear(x, w, b, "gelu_fast" if fused_gelu else None, residual)
        one = len(adapters) == 1 and not dropout_active(adapters[0][2])
        fused = fusable_adapters(adapters, x) if one and getattr(backend.linear, "fuses_lora", False) else []
        if fused and (activation_fn is None or fused_gelu):
            # PEFT's adapter inside our GEMM (before gelu_fast and the residual, which stay fused)
            return backend.linear(x, w, b, "gelu_fast" if fused_gelu else None, residual, adapters=[fused[0][:3]])
        # LoRA: its update goes in before the activation (and the residual) the base GEMM would have fused
        y = add_lora_(backend.linear(x, w, b, None, residual if activation_fn is None else None), x, adapters)
        if activation_fn is None:
            return y
        y = activation_fn(y)
    else:
        y = module(x)
        if activation_fn is not None:
            y = activation_fn(y)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------------------------------
# Modules: transformers' ViViT modules with a kernel forward (same parameters and names)
# --------------------------------------------------------------------------------------------------
class KernelModule:
    """``_vivit_table``: the backend apply_vivit_kernels gave this module; ``_vivit_backend``: the one this
    forward uses (None: transformers' own forward, also when attn="auto" chose transformers' path)."""

    _vivit_table: Backend | None = None

    @property
    def _vivit_backend(self) -> Backend | None:
        table = self._vivit_table
        if table is not None and table.path is not None and table.path.transformers:
            return None
        return table


class KernelLayerNorm(KernelModule, nn.LayerNorm):
    """nn.LayerNorm that runs the backend's LayerNorm kernel (same parameters; eps and affine as configured)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._vivit_backend
        if backend is None or backend.layer_norm is None or self.weight is None or self.bias is None \
                or len(self.normalized_shape) != 1 \
                or (x.dtype != self.weight.dtype and not autocast_to(self.weight, x)):
            return super().forward(x)
        return backend.layer_norm(x, compute_weight(self.weight, x), compute_weight(self.bias, x), self.eps)


def check_clip_size(shape: tuple[int, ...], trained: tuple[int, int, int], tubelet: tuple[int, int, int],
                    interpolate_pos_encoding: bool) -> None:
    """A clear error where a (batch, frames, channels, height, width) clip cannot be read by a model trained on
    ``trained`` = (frames, height, width) with ``tubelet`` = (t, p, q): an empty batch; without interpolation, any
    other size (naming both); with it, a clip smaller than one tubelet. With interpolation a size that is not a
    tubelet multiple drops its remainder, as the Conv3d does (the last frames, the bottom rows, the right
    columns), and says so once."""
    batch, frames, _, height, width = shape
    (f0, h0, w0), (t, p, q) = trained, tubelet
    if batch == 0:
        raise ValueError(f"pixel_values holds no clip (an empty batch: shape {tuple(shape)})")
    if not interpolate_pos_encoding:
        if (height, width) != (h0, w0):
            raise ValueError(f"input image size ({height}*{width}) doesn't match the model ({h0}*{w0}); pass "
                             "interpolate_pos_encoding=True to run at another size")
        if frames != f0:
            raise ValueError(f"input has {frames} frames, the model expects num_frames={f0}; pass "
                             "interpolate_pos_encoding=True to run on another number of frames (a multiple of the "
                             f"tubelet's {t})")
        return
    if frames < t or height < p or width < q:
        raise ValueError(f"pixel_values of {frames} frames of {height}x{width} is smaller than one tubelet "
                         f"({t} frames of {p}x{q})")
    dropped = [f"{n % size} {what}" for n, size, what in ((frames, t, "frame(s)"), (height, p, "pixel row(s)"),
                                                         (width, q, "pixel column(s)")) if n % size]
    if dropped:
        log_once(f"remainder:{frames}x{height}x{width}",
                 f"vivit_kernels: a clip of {frames} frames of {height}x{width} is not a multiple of the tubelet "
                 f"({t} frames of {p}x{q}): its last {', '.join(dropped)} are not read")


class KernelVivitEmbeddings(KernelModule, hf.VivitEmbeddings):
    """transformers' embeddings with clear input errors, the (T', h, w) position interpolation, Conv3d's handling
    of sizes that are not tubelet multiples, and (with a kernel backend) the fused patch-embedding kernel."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        pixel_values = self._checked(pixel_values, interpolate_pos_encoding)
        batch, frames, _, height, width = pixel_values.shape
        t, p, q = self._tubelet
        pos = (
            self.position_table((frames // t, height // p, width // q))
            if interpolate_pos_encoding
            else self.position_embeddings
        )
        backend = self._vivit_backend
        tubelets, proj = self.patch_embeddings, self.patch_embeddings.projection
        if backend is not None and backend.patch_embed is not None and self._fusable(tubelets, proj, pixel_values):
            x = pixel_values
            embeddings = backend.patch_embed(
                x,
                compute_weight(proj.weight, x),
                compute_weight(proj.bias, x),
                compute_weight(self.cls_token, x),
                compute_weight(pos, x),
            )
        else:
            embeddings = torch.cat((self.cls_token.expand(batch, -1, -1), tubelets(pixel_values)), dim=1) + pos
        return self.dropout(embeddings)

    @property
    def _tubelet(self) -> tuple[int, int, int]:
        return tuple(self.patch_embeddings.projection.kernel_size)

    def _fusable(self, tubelets: nn.Module, proj: nn.Module, x: torch.Tensor) -> bool:
        if type(tubelets) is not hf.VivitTubeletEmbeddings or has_hooks(tubelets):
            log_once("patch_embeddings", "vivit_kernels: the patch embeddings module is replaced or hooked: it runs "
                                          "its own forward")
            return False
        if not plain(proj, nn.Conv3d, x, _name(self, "patch_embeddings.projection")):
            return False
        return (tuple(proj.stride) == tuple(proj.kernel_size) and proj.padding in ((0, 0, 0), "valid")
                and tuple(proj.dilation) == (1, 1, 1) and proj.groups == 1 and proj.padding_mode == "zeros")

    def _checked(self, pixel_values, interpolate_pos_encoding: bool) -> torch.Tensor:
        """Errors that say what was expected and what was given; the input cast to the model's dtype."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 5:
            raise ValueError("pixel_values must be 5-D (batch, frames, channels, height, width), "
                             f"got shape {tuple(pixel_values.shape)}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        channels = pixel_values.shape[2]
        expected_channels = self.patch_embeddings.projection.in_channels
        if channels != expected_channels:
            raise ValueError(
                f"pixel_values has {channels} channels in dim 2, expected num_channels={expected_channels} "
                f"(layout is (batch, frames, channels, height, width); got shape {tuple(pixel_values.shape)})")
        h0, w0 = self.image_size
        t, p, q = self._tubelet
        t0 = (self.position_embeddings.shape[1] - 1) // ((h0 // p) * (w0 // q))
        check_clip_size(tuple(pixel_values.shape), (t0 * t, h0, w0), (t, p, q), interpolate_pos_encoding)
        weight = self.patch_embeddings.projection.weight
        if pixel_values.device != weight.device and weight.device.type != "meta":
            raise ValueError(f"pixel_values is on {pixel_values.device}, the model is on {weight.device}")
        backend = self._vivit_backend
        if backend is not None:
            if backend.check_inputs is not None:
                backend.check_inputs(pixel_values)
            compute = autocast_dtype(pixel_values.device.type)
            if compute is not None and weight.is_floating_point():  # autocast: our kernels compute in its dtype
                return pixel_values.to(compute)
        return pixel_values.to(weight.dtype)

    def position_table(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The position table for a (T', h, w) tubelet grid, (1, 1 + T'*h*w, hidden): the [CLS] entry kept, the
        patch part resized from the grid it was trained on by :func:`resize_positions` (the same tensor for the
        configured grid)."""
        table = self.position_embeddings
        t, p, q = self._tubelet
        h0, w0 = self.image_size[0] // p, self.image_size[1] // q
        t0 = (table.shape[1] - 1) // (h0 * w0)
        if tuple(grid) == (t0, h0, w0):
            return table
        return torch.cat((table[:, :1], resize_positions(table[:, 1:], (t0, h0, w0), grid)), dim=1)


def resize_positions(table: torch.Tensor, trained: tuple[int, int, int], grid: tuple[int, int, int]) -> torch.Tensor:
    """Position embeddings (1, T0*h0*w0, hidden) of a (T0, h0, w0) tubelet grid, in (time, height, width) order,
    resized to the (T1, h1, w1) grid: bicubically in space (each temporal slice on its own, align_corners=False;
    ViT's and transformers' choice for images) and linearly in time (align_corners=False: each new temporal index
    reads the two trained ones nearest its centre; a table constant over time stays so, to rounding). Computed in
    float32, returned in the table's dtype; the table itself for the trained grid. Every ViViT model reads its
    tables through it under ``interpolate_pos_encoding=True``: Model 1's (T', h, w) table, Model 2's spatial
    (1, h, w) and temporal (T', 1, 1) ones, Models 3 and 4's (T', h, w)."""
    (t0, h0, w0), (t1, h1, w1) = tuple(trained), tuple(grid)
    if (t0, h0, w0) == (t1, h1, w1):
        return table
    if table.shape[1] != t0 * h0 * w0:
        raise ValueError(f"a position table of {table.shape[1]} entries is not a {t0}x{h0}x{w0} grid")
    dim = table.shape[-1]
    g = table.float().reshape(t0, h0, w0, dim).permute(0, 3, 1, 2)  # (t0, D, h0, w0)
    if (h1, w1) != (h0, w0):
        g = F.interpolate(g, size=(h1, w1), mode="bicubic", align_corners=False)
    if t1 != t0:
        g = g.permute(1, 2, 3, 0).reshape(1, dim * h1 * w1, t0)
        g = F.interpolate(g, size=t1, mode="linear", align_corners=False)
        g = g.reshape(dim, h1, w1, t1).permute(3, 0, 1, 2)
    return g.permute(0, 2, 3, 1).reshape(1, t1 * h1 * w1, dim).to(table.dtype)


def _transformers_attention(config, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            dropout: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' attention on (B, N, H, D) or (B1, B2, N, H, D) views when no kernel runs (the attention ops
    switched off, the factorised groups without a backend, token merging on transformers' path): SDPA where the
    model's attention implementation is "sdpa", else the eager reference; ``bias`` (B, N) per key."""
    if config._attn_implementation != "sdpa":
        return attention_ref(q, k, v, scale, bias, dropout_p=dropout)
    return sdpa_attention(q, k, v, scale, bias, dropout_p=dropout)


class KernelVivitAttention(KernelModule, hf.VivitAttention):
    """transformers' attention, plus ``head_mask`` and attention probabilities from any backend, and (with a
    kernel backend) the three projections in one GEMM that reads the three weights in place and flash attention."""

    _vivit_layer_index: int = 0
    # The factorised models (models/factorized.py) set (temporal indices, spatial heads) on their attention
    # modules: the tokens are (batch, T * S) in (time, space) order, heads [0, spatial heads) attend over the S
    # tokens of their temporal index, the others over the T tokens of their spatial position.
    _vivit_axes: tuple[int, int] | None = None
    _vivit_tokens: int | None = None  # T x S of the model's last forward (set with the axes)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, **kwargs):
        layer_mask = None if head_mask is None else head_mask[self._vivit_layer_index]
        probabilities = collecting_attentions() and self.config._attn_implementation != "eager"
        if self._vivit_backend is None and layer_mask is None and not probabilities and self._vivit_axes is None:
            return super().forward(hidden_states, attention_mask, **kwargs)  # transformers', unchanged (auto's guard)
        return self.attend(hidden_states, attention_mask, layer_mask)

    def attend(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
               head_mask: torch.Tensor | None = None, residual: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, with_keys: bool = False):
        """(o_proj(attention(h)) + residual, probabilities or None), and with ``with_keys`` the keys (B, N, H, D)
        too (a view of the projections: what token merging matches on). ``bias`` (B, N): a per-key additive bias
        (proportional attention of merged tokens)."""
        backend = self._vivit_backend
        batch, tokens, _ = h.shape
        heads, head_dim = self.num_attention_heads, self.head_dim
        shape = (batch, tokens, heads, head_dim)
        q_, k_, v_ = self.q_proj, self.k_proj, self.v_proj
        parts = [linear_parts(m, h, _name(self, n)) for m, n in ((q_, "q_proj"), (k_, "k_proj"), (v_, "v_proj"))] \
            if backend is not None and backend.qkv is not None else [None]
        fused = all(p is not None for p in parts) and len({p[0].bias is None for p in parts}) == 1
        if fused:  # one GEMM reading the three base weights in place, the LoRA adapters' updates inside it
            weights = [compute_weight(t, h) for base, _ in parts for t in (base.weight, base.bias)]
            adapters = [(i, a, b, s) + (() if own is None else (own,)) for i, (_, found) in enumerate(parts)
                        for a, b, s, own in fusable_adapters(found, h)]
            qkv = backend.qkv(h, *weights, adapters=adapters) if adapters else backend.qkv(h, *weights)
            qkv = qkv.view(batch, tokens, 3, heads, head_dim)
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = (self._project(name, h).view(shape) for name in ("q_proj", "k_proj", "v_proj"))
        dropout = self.attention_dropout if self.training else 0.0
        why = ("head_mask" if head_mask is not None else "output_attentions" if collecting_attentions()
               else "an attention mask" if attention_mask is not None else "attention dropout" if dropout > 0 else None)
        if self._vivit_axes is not None:
            if head_mask is not None or attention_mask is not None:
                raise ValueError("the factorised attention takes no head_mask or attention mask")
            context = self._factorised(backend, qkv if fused else None, q, k, v, dropout, why)
            context = context.reshape(batch, tokens, heads * head_dim)  # a view: the groups write (time, space) order
            if backend is None:
                out = self.o_proj(context)
                out = out if residual is None else out + residual
            else:
                out = _linear(backend, self.o_proj, _name(self, "o_proj"), context, residual=residual)
            return (out, None, k) if with_keys else (out, None)
        if why is not None:
            if backend is not None:
                log_once(f"eager:{why}", f"vivit_kernels: attention with {why} runs eager attention (the flash kernel "
                                          "returns no probabilities and applies no mask or dropout)")
            context, probs = attention_ref(q, k, v, self.scaling, bias, dropout_p=dropout, head_mask=head_mask,
                                           attention_mask=attention_mask, return_probs=True)
        elif backend is not None and fused and backend.attention_qkv is not None:  # on the fused projection output
            context, probs = backend.attention_qkv(qkv, self.scaling, bias), None
        elif backend is not None and not fused and backend.attention is not None:  # on separate q, k, v
            context, probs = backend.attention(q, k, v, self.scaling, bias), None
        else:  # that attention op switched off, or transformers' path with merged tokens: transformers' attention
            context, probs = _transformers_attention(self.config, q, k, v, self.scaling, dropout, bias), None
        context = context.reshape(batch, tokens, heads * head_dim)
        if backend is None:
            out = self.o_proj(context)
            out = out if residual is None else out + residual
        else:
            out = _linear(backend, self.o_proj, _name(self, "o_proj"), context, residual=residual)
        return (out, probs, k) if with_keys else (out, probs)

    def _factorised(self, backend: Backend | None, qkv: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, dropout: float, why: str | None) -> torch.Tensor:
        """The context (batch, T, S, heads, head_dim) of the factorised attention (``_vivit_axes``): each head
        group reads its (batch, T, S, ...) or (batch, S, T, ...) view of the projections in place, and the
        kernels write the temporal group's output in (time, space) token order, so no group is copied."""
        steps, spatial = self._vivit_axes
        batch, tokens, heads, head_dim = q.shape
        if tokens % steps or (self._vivit_tokens is not None and tokens != self._vivit_tokens):
            raise ValueError(f"the factorised attention got {tokens} tokens, its model's last forward was set for "
                             f"{self._vivit_tokens or 'a multiple of ' + str(steps)} ({steps} temporal indices): a "
                             "layer recomputed (gradient checkpointing) after a forward at another clip size")
        grid = (batch, steps, tokens // steps)
        kernels = backend is not None and why is None
        if backend is not None and why is not None:
            log_once(f"eager:{why}", f"vivit_kernels: factorised attention with {why} runs eager attention")

        def split(t: torch.Tensor) -> list[tuple[torch.Tensor, bool]]:  # the non-empty (view, over time) groups
            groups = ((t[..., :spatial, :], False), (t.transpose(1, 2)[..., spatial:, :], True))
            return [(g, over_time) for g, over_time in groups if g.shape[-2]]

        if kernels and qkv is not None and backend.attention_qkv is not None:
            outs = [(backend.attention_qkv(g, self.scaling), t) for g, t in split(qkv.view(*grid, 3, heads, head_dim))]
        else:
            outs = []
            groups = zip(*(split(t.view(*grid, heads, head_dim)) for t in (q, k, v)), strict=True)
            for (qg, over_time), (kg, _), (vg, _) in groups:
                o = (backend.attention(qg, kg, vg, self.scaling) if kernels and qkv is None and backend.attention
                     is not None
                     else _transformers_attention(self.config, qg, kg, vg, self.scaling, dropout))
                outs.append((o, over_time))
        outs = [o.transpose(1, 2) if over_time else o for o, over_time in outs]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # Model 4: the two head groups side by side

    def _project(self, name: str, h: torch.Tensor) -> torch.Tensor:
        backend = self._vivit_backend
        if backend is None:
            return getattr(self, name)(h)
        return _linear(backend, getattr(self, name), _name(self, name), h)


class KernelVivitLayer(KernelModule, hf.VivitLayer):
    """transformers' pre-norm block on our kernels: LayerNorm, QKV GEMM, flash attention, output projection with
    the residual in its epilogue, LayerNorm, and the MLP in two GEMMs (bias + gelu_fast, bias + residual):
    7 launches when the modules are plain."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if kwargs.pop(_UNMASKED, False):
            attention_mask = None  # the all-visible mask transformers materialises while exporting (no padding)
        backend = self._vivit_backend
        merging = merging_state()
        if merging is not None and (merging.merged or merging.schedule[self.attention._vivit_layer_index]):
            # until a layer merges, every layer is exactly the unmerged one (r = 0 changes nothing, bit for bit)
            return self._merged_forward(hidden_states, attention_mask, merging, backend)
        if backend is None:  # attn="auto" chose transformers' path for this forward (or eager / sdpa)
            return super().forward(hidden_states, attention_mask, **kwargs)
        fuse_residual = not (self.training and self.dropout.p > 0)
        h = self.layernorm_before(hidden_states)
        attention = self.attention
        if isinstance(attention, KernelVivitAttention) and not has_hooks(attention) and fuse_residual \
                and not collecting_attentions():
            head_mask = kwargs.get("head_mask")
            layer_mask = None if head_mask is None else head_mask[attention._vivit_layer_index]
            x, _ = attention.attend(h, attention_mask, layer_mask, residual=hidden_states)
        else:
            out, _ = attention(h, attention_mask, **kwargs)
            x = self.dropout(out) + hidden_states
        del h  # not kept alive through the MLP (the peak of live activations)
        return kernel_mlp(self, backend, self.layernorm_after(x), x, fuse_residual)

    def _merged_forward(self, hidden_states: torch.Tensor, attention_mask, merging, backend) -> torch.Tensor:
        """The block with token merging (``vivit_kernels.merging``): attention with proportional attention (log of
        each key's size added to its scores), then the layer's ``r`` most similar token pairs merged on the keys,
        then the MLP on the merged tokens. On our kernels, or (no backend) on transformers' modules."""
        attention = self.attention
        if not isinstance(attention, KernelVivitAttention) or has_hooks(attention) or attention_mask is not None:
            raise ValueError("token merging needs the layer's own attention module, without hooks or a mask")
        fuse_residual = backend is not None and not (self.training and self.dropout.p > 0)
        out, _, keys = attention.attend(self.layernorm_before(hidden_states), residual=hidden_states if fuse_residual
                                        else None, bias=merging.bias(), with_keys=True)
        x = out if fuse_residual else self.dropout(out) + hidden_states
        layer = attention._vivit_layer_index
        x = merging.merge(x, keys, merging.schedule[layer], layer, kernels=backend is not None)
        if backend is None:
            return self.dropout(self.mlp(self.layernorm_after(x))) + x
        return kernel_mlp(self, backend, self.layernorm_after(x), x, fuse_residual)


def kernel_mlp(layer: nn.Module, backend: Backend, h: torch.Tensor, residual: torch.Tensor,
               fuse_residual: bool) -> torch.Tensor:
    """``residual + dropout(layer.mlp(h))`` on the backend: one mlp op (two GEMMs: bias + gelu_fast, bias +
    residual) where the MLP is transformers' plain VivitMLP with gelu_fast and the op is on, else its two linears
    through ``_linear``; a replaced or hooked MLP runs its own forward. Shared by every block that has an ``mlp``
    and a ``dropout`` (Model 1's layer, Model 3's factorised block)."""
    mlp = layer.mlp
    if type(mlp) is not hf.VivitMLP or has_hooks(mlp):
        log_once("mlp", "vivit_kernels: the MLP module is replaced or hooked: it runs its own forward")
        return layer.dropout(mlp(h)) + residual
    gelu = isinstance(mlp.activation_fn, FastGELUActivation)
    res = residual if fuse_residual else None
    fc1, fc2 = _name(layer, "mlp.fc1"), _name(layer, "mlp.fc2")
    if backend.mlp is not None and gelu and plain(mlp.fc1, nn.Linear, h, fc1) and plain(mlp.fc2, nn.Linear, h, fc2):
        out = backend.mlp(h, compute_weight(mlp.fc1.weight, h), compute_weight(mlp.fc1.bias, h),
                          compute_weight(mlp.fc2.weight, h), compute_weight(mlp.fc2.bias, h), "gelu_fast", res)
    else:
        hidden = _linear(backend, mlp.fc1, fc1, h, activation_fn=mlp.activation_fn)
        out = _linear(backend, mlp.fc2, fc2, hidden, residual=res)
    return out if fuse_residual else layer.dropout(out) + residual


# Passed down by our forwards when the caller gave no attention mask: videos have no padding, so the layers may
# ignore the all-visible mask transformers builds anyway while torch.export traces (and keep flash attention).
_UNMASKED = "_vivit_unmasked"
# Our subclasses of each plain class, which count as that class when deciding what may be fused.
KERNEL_CLASSES[nn.LayerNorm] = (KernelLayerNorm,)
# transformers' class -> our subclass with the kernel forward (what apply_vivit_kernels swaps in)
KERNEL_SUBCLASSES = {hf.VivitEmbeddings: KernelVivitEmbeddings, hf.VivitAttention: KernelVivitAttention,
                     hf.VivitLayer: KernelVivitLayer, nn.LayerNorm: KernelLayerNorm}
