"""Token merging for video (training-free): between a layer's attention and its MLP, merge the ``r`` most similar
pairs of tokens by bipartite soft matching on the attention keys, as ToMe does (Bolya et al., ICLR 2023), with
a split chosen for video, and proportional attention (a key that stands for ``s`` tokens weighs ``log s`` more)
so that a merged clip attends as the full one does.

- **Matching** (``vivit_kernels.ops.token_merge``, read as ToMe's ``merge.py``: ``match_tokens`` returns a
  ``Match`` that merges any tensor and tracks where tokens went): the keys, averaged over heads and normalised,
  split into two sets A and B; each token of A finds its most similar token of B (cosine); the ``r`` most similar
  pairs merge (A's token into B's), by the average of their values weighted by how many tokens each stands for.
  The [CLS] token is in neither set: it never merges. On our kernels the whole step is four Triton launches that
  never store the A x B similarities (``merge_tokens``); on transformers' path the eager ``Match`` runs.
- **The video split**: ToMe alternates token indices. With a clip's tokens in (time, height, width) order and
  h x w patches per temporal slice (196, even), that puts every temporal copy of a position in the same set,
  where it can never meet its copies: the repetition of a static background is exactly what it cannot merge. So
  A holds the tokens of odd temporal slices and B the even ones: every token can meet its own position one slice
  earlier or later (and everything else); after a merge the order is [CLS], A's kept tokens, B, so the next
  layer splits the same way. When A has fewer than ``r`` tokens left, the split falls back to ToMe's alternation
  over the current order.
- **State**: ``TokenMerging`` carries per token its size (how many tokens it stands for), proportional
  attention's bias (log of the sizes) and, per original token, the index of the token it went into (``source``,
  the inverse of ToMe's ``source`` matrix): ``unmerge`` brings a (B, N', C) tensor back to the clip's full length,
  each original token reading the token it went into. Every token state a model returns is full length:
  ``last_hidden_state`` and each of ``hidden_states`` (with the source map as it was after that layer). Where the
  two sets lie follows from counts kept in Python (``odd``: the tokens of set A while the temporal split holds),
  made into positions on the device (no host-to-device copy, so no wait for the GPU per layer), and the same
  code runs on fake tensors (the device-free FLOP counts).
- **Schedules**: ``r`` per layer as a constant (ToMe's), a fraction of the current tokens (the video papers'
  proportional reduction), or a per-layer list; every clip of a batch merges the same number of tokens.

Model 2 (the factorised encoder) merges in its spatial encoder, within each temporal index's sequence (ToMe's
split: a sequence without time), and only its [CLS] outputs go on; its temporal encoder does not merge. Models 3
and 4 keep a (time x space) grid that merging breaks (a merged token belongs to no single position or slice):
not supported.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass, field

import torch

from .ops import _triton
from .ops.token_merge import fused_why_not, merge_tokens, merge_tokens_ref
from .ops.token_sets import Split

__all__ = ["TokenMerging", "merge_schedule", "SCHEDULES", "active", "set_merging_hooks", "merging_sequences",
           "refuse_checkpointing"]

# Named schedules: (kind, value). "constant": r tokens per layer (ToMe's r); "fraction": that share of the current
# tokens per layer.
SCHEDULES: dict[str, tuple[str, float]] = {
    "tome-r16": ("constant", 16),  # ToMe's constant r, scaled to a video's tokens below by "fraction" ones
    "fraction-10": ("fraction", 0.10),
    "fraction-20": ("fraction", 0.20),
    "fraction-30": ("fraction", 0.30),  # the most aggressive documented: under half the FLOPs at ViViT-B
}


def merge_schedule(spec, layers: int, tokens: int) -> list[int]:
    """Tokens merged at each of ``layers`` layers of a clip of ``tokens`` (with [CLS]): ``spec`` is an int (r per
    layer), a float in (0, 1) (that fraction of the current mergeable tokens per layer), a list of per-layer r, or
    a name of ``SCHEDULES``. Never more than half the mergeable tokens of a layer."""
    if isinstance(spec, str):
        if spec not in SCHEDULES:
            raise ValueError(f"unknown merge schedule {spec!r}; named ones: {', '.join(SCHEDULES)}")
        kind, value = SCHEDULES[spec]
        spec = int(value) if kind == "constant" else float(value)
    if isinstance(spec, (list, tuple)):
        if len(spec) != layers:
            raise ValueError(f"a per-layer merge schedule needs {layers} values, got {len(spec)}")
        wanted = [int(r) for r in spec]
    elif isinstance(spec, float):
        if not 0.0 <= spec < 1.0:
            raise ValueError(f"a fraction of the tokens per layer must be in [0, 1), got {spec}")
        wanted, n = [], tokens - 1
        for _ in range(layers):
            r = int(n * spec)
            wanted.append(r)
            n -= min(r, n // 2)
    elif isinstance(spec, int):
        wanted = [spec] * layers
    else:
        raise TypeError(f"merge schedule: an int, a fraction, a per-layer list or a name, got {type(spec).__name__}")
    if any(r < 0 for r in wanted):
        raise ValueError(f"merge schedule: r must be >= 0, got {wanted}")
    out, n = [], tokens - 1
    for r in wanted:
        r = min(r, n // 2)
        out.append(r)
        n -= r
    return out


@dataclass
class TokenMerging:
    """The merging state of one forward: per token its size and proportional attention's bias, per original token
    the index of the token it went into, and (plain Python, so that fake-tensor counting runs it) where the two
    sets of the next split are. Made by ``start``, updated by ``merge``."""

    size: torch.Tensor | None  # (B, N) fp32: tokens each stands for ([CLS] first, 1); None: all 1 (nothing merged)
    source: torch.Tensor | None  # (B, N0) long: for each original token, its index now; None: nothing merged
    schedule: list[int] = field(default_factory=list)
    merged: int = 0  # tokens merged so far (none: no bias, every path exactly the unmerged one)
    per_slice: int = 0  # tokens per temporal slice of the clip
    odd: int | None = None  # tokens of set A (the odd slices) while the temporal split holds
    grouped: bool = False  # after a temporal merge: [CLS], A's tokens, then B's (their counts say where)
    attention_bias: torch.Tensor | None = None  # (B, N) fp32 log(size), once something merged
    sources: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, source after its merge)

    @classmethod
    def start(cls, slices: int, per_slice: int, schedule: list[int]) -> TokenMerging:
        """The state of a clip of ``slices`` x ``per_slice`` tokens after [CLS], none merged yet (no sizes and no
        source map yet: the first merge makes them, nothing is launched before)."""
        return cls(None, None, list(schedule), per_slice=per_slice, odd=(slices // 2) * per_slice)

    def bias(self) -> torch.Tensor | None:
        """Proportional attention's per-key additive bias, log(size): (B, N) fp32; None while nothing is merged
        (every size 1: the attention is then exactly the unmerged one, bit for bit)."""
        return self.attention_bias

    def split(self, n: int, r: int) -> Split:
        """This layer's sets among its ``n`` tokens: odd temporal slices in A, even in B, while A has ``r`` tokens to
        give and B one to take (grouped after a temporal merge: [CLS], A's tokens, then B's); ToMe's alternation
        over the current order after that."""
        if self.odd is not None and r <= self.odd < n - 1:
            return Split("grouped", odd=self.odd) if self.grouped else Split("temporal", per_slice=self.per_slice)
        return Split("alternate")

    def merge(self, x: torch.Tensor, keys: torch.Tensor, r: int, layer: int, kernels: bool) -> torch.Tensor:
        """``x`` (B, N, C) with ``r`` token pairs merged at ``layer`` (matched on ``keys`` (B, N, H, D) or (B, N,
        C)); updates the state. ``kernels``: the layer runs our kernels, so the merge does too (four Triton
        launches) where they take these inputs; else the eager ``Match``. r = 0 returns ``x`` itself."""
        if r <= 0:
            return x
        split = self.split(x.shape[1], r)
        fused = kernels and _triton.HAS_TRITON and fused_why_not(x, keys) is None
        step = merge_tokens if fused else merge_tokens_ref
        x, self.size, self.source, self.attention_bias = step(x, keys, self.size, self.source, r, split)
        self.merged += r
        self.sources.append((layer, self.source))
        if split.mode == "alternate":
            self.odd = None
        else:  # [CLS], A's unmerged (odd slices), then B
            self.odd, self.grouped = self.odd - r, True
        return x

    def unmerge(self, x: torch.Tensor, after_layer: int | None = None) -> torch.Tensor:
        """(B, N', C) -> (B, N0, C): each original token reads the token it went into (``x`` itself when nothing
        merged); ``after_layer``: ``x`` is that layer's output (the source map as it was then), else the last."""
        sources = [s for layer, s in self.sources if after_layer is None or layer <= after_layer]
        if not sources:
            return x
        return x.gather(1, sources[-1].unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------------------------------------
# In a model: the state of the forward under way, set up and taken down by hooks on the base model
# ------------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[TokenMerging | None] = contextvars.ContextVar("vivit_token_merging", default=None)
# How many merging states are set, in any thread (changed under _SET_LOCK: forwards may run in several threads).
# Zero (the usual case) answers `active()` from this plain module global, which torch.compile traces in every torch
# we support; Dynamo learned `ContextVar.get` only after torch 2.11, where it breaks a fullgraph compile of a model
# that merges nothing.
_SET = 0
_SET_LOCK = threading.Lock()


def _push(state: TokenMerging) -> contextvars.Token:
    global _SET
    with _SET_LOCK:
        _SET += 1
    return _ACTIVE.set(state)


def _pop(token: contextvars.Token) -> None:
    global _SET
    with _SET_LOCK:
        _SET -= 1
    _ACTIVE.reset(token)


def active() -> TokenMerging | None:
    """The merging state of the ViViT forward under way (None: no merging)."""
    if not _SET:
        return None
    return _ACTIVE.get()


def refuse_checkpointing(model: torch.nn.Module) -> None:
    """A clear error for merging under activation (gradient) checkpointing while training."""
    if model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError("token merging with gradient checkpointing is not supported: the recomputed layers would "
                         "not see the merged tokens (turn one of them off)")


@contextlib.contextmanager
def merging_sequences(spec, layers: int, tokens: int):
    """Merging inside the block over independent sequences of ``tokens`` ([CLS] first) that have no time
    axis, so ToMe's alternating split: Model 2's spatial encoder, one sequence per temporal index. ``spec`` None
    or 0: no merging. Yields the state (None without merging); nothing stays active after the block."""
    if not spec:
        yield None
        return
    state = TokenMerging.start(1, tokens - 1, merge_schedule(spec, layers, tokens))
    token = _push(state)
    try:
        yield state
    finally:
        _pop(token)


def _pre_hook(base, args, kwargs):
    spec = getattr(base.config, "token_merging", None)
    x = args[0] if args else kwargs.get("pixel_values")
    if not spec or not isinstance(x, torch.Tensor) or x.dim() != 5:
        return None
    refuse_checkpointing(base)
    t, p, q = base.config.tubelet_size
    _, frames, _, height, width = x.shape
    slices, per_slice = frames // t, (height // p) * (width // q)
    schedule = merge_schedule(spec, base.config.num_hidden_layers, 1 + slices * per_slice)
    base.__dict__.setdefault("_vivit_merge_tokens", []).append(
        _push(TokenMerging.start(slices, per_slice, schedule)))
    return None


def _post_hook(base, args, kwargs, output):
    tokens = base.__dict__.get("_vivit_merge_tokens")
    if not tokens:
        return None
    state = _ACTIVE.get()
    _pop(tokens.pop())  # also when the forward raised (always_call): no state outlives its forward
    if output is None:
        return None
    # every token state returned is full length: each original token reads the token it went into ([CLS] first);
    # a layer's hidden state with the source map as it was after that layer (hidden_states[0]: the embeddings)
    hidden = output.hidden_states if not isinstance(output, tuple) else None
    if hidden is not None:
        output.hidden_states = tuple(h if i == 0 else state.unmerge(h, after_layer=i - 1) for i, h in enumerate(hidden))
    last = output[0] if isinstance(output, tuple) else output.last_hidden_state
    full = state.unmerge(last)
    if isinstance(output, tuple):
        return (full, *output[1:])
    output.last_hidden_state = full
    return output


_HOOKS = "_vivit_merging_hooks"  # the handles of the hooks set_merging_hooks installed on a base model


def set_merging_hooks(base: torch.nn.Module) -> None:
    """Install (``base.config.token_merging`` set) or remove the hooks that run merging in ``base``'s forward; their
    handles are kept on the module, so they are removed as torch removes hooks, and only ours."""
    for handle in base.__dict__.pop(_HOOKS, ()):
        handle.remove()
    if getattr(base.config, "token_merging", None) and not getattr(type(base), "_vivit_base", False):
        # (the factorised Model 2 merges inside its own forward: ``merging_sequences``)
        base.__dict__[_HOOKS] = (base.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                                 base.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))
