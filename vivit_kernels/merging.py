"""Token merging for video (training-free): between a layer's attention and its MLP, merge the ``r`` most similar
pairs of tokens by bipartite soft matching on the attention keys, as ToMe does (Bolya et al., ICLR 2023), with
a split chosen for video, and proportional attention (a key that stands for ``s`` tokens weighs ``log s`` more)
so that a merged clip attends as the full one does.

- **Matching**: the keys, averaged over heads and normalised, split into two sets A and B; each token of A
  finds its most similar token of B (cosine); the ``r`` most similar pairs merge (A's token into B's), by the
  average of their values weighted by how many tokens each stands for. The [CLS] token is in neither set: it
  never merges.
- **The video split**: ToMe alternates token indices. With a clip's tokens in (time, height, width) order and
  h x w patches per temporal slice (196, even), that puts every temporal copy of a position in the same set,
  where it can never meet its copies: the repetition of a static background is exactly what it cannot merge. So
  A holds the tokens of odd temporal slices and B the even ones: every token can meet its own position one slice
  earlier or later (and everything else); after a merge the order is [CLS], A's kept tokens, B, so the next
  layer splits the same way. When A has fewer than ``r`` tokens left, the split falls back to ToMe's alternation
  over the current order.
- **State**: ``TokenMerging`` carries per token its size (how many tokens it stands for) and, per original token,
  the index of the token it went into (``source``): ``unmerge`` brings a (B, N', C) tensor back to the clip's
  full length, each original token reading the token it went into. Where the two sets lie follows from counts
  kept in Python, made into positions on the device (no host-to-device copy, so no wait for the GPU per layer),
  and the same code runs on fake tensors (the device-free FLOP counts).
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
from dataclasses import dataclass, field

import torch

__all__ = ["TokenMerging", "merge_schedule", "bipartite_merge", "SCHEDULES", "active", "set_merging_hooks",
           "merging_sequences", "refuse_checkpointing"]

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
    """The merging state of one forward: per token its size, per original token the index of the token it went
    into, and (plain Python, so that fake-tensor counting runs it) where the two sets of the next split are. Made
    by ``start``, updated by ``merge``."""

    size: torch.Tensor  # (B, N, 1), float: tokens each stands for ([CLS] first, 1)
    source: torch.Tensor  # (B, N0), long: for each original token, its index now
    schedule: list[int] = field(default_factory=list)
    merged: int = 0  # tokens merged so far (none: no bias, every path exactly the unmerged one)
    slices: int = 1  # temporal slices and tokens per slice of the clip
    per_slice: int = 0
    odd: int | None = None  # tokens of set A (the odd slices) while the temporal split holds
    grouped: bool = False  # after a temporal merge: [CLS], A's tokens, then B's (their counts say where)

    @classmethod
    def start(cls, batch: int, slices: int, per_slice: int, schedule: list[int], device) -> TokenMerging:
        """The state of a clip of ``slices`` x ``per_slice`` tokens after [CLS], none merged yet."""
        n = 1 + slices * per_slice
        source = torch.arange(n, device=device).expand(batch, n)
        return cls(torch.ones(batch, n, 1, device=device), source, list(schedule), slices=slices,
                   per_slice=per_slice, odd=(slices // 2) * per_slice)

    def bias(self) -> torch.Tensor | None:
        """Proportional attention's per-key additive bias, log(size): (B, N) fp32; None while nothing is merged
        (every size 1: the attention is then exactly the unmerged one, bit for bit)."""
        return self.size.squeeze(-1).float().log() if self.merged else None

    def _split(self, n: int, r: int, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(A positions, B positions, temporal?) of the non-[CLS] tokens of this layer's n tokens: odd temporal
        slices in A, even in B, while A has r tokens to give and B one to take; ToMe's alternation over the
        current order after that. Made on the device from counts (no copy from the host, no wait for the GPU)."""
        position = torch.arange(n, device=device)
        if self.odd is not None and r <= self.odd < n - 1:
            if self.grouped:
                return position[1:1 + self.odd], position[1 + self.odd:], True
            grid = position[1:].view(self.slices, self.per_slice)
            return grid[1::2].reshape(-1), grid[0::2].reshape(-1), True
        return position[1::2], position[2::2], False

    def merge(self, x: torch.Tensor, keys: torch.Tensor, r: int) -> torch.Tensor:
        """``x`` (B, N, C) with ``r`` token pairs merged (matched on ``keys`` (B, N, H, D) or (B, N, C)); updates
        the state. r = 0 returns ``x`` itself."""
        if r <= 0:
            return x
        a, b, temporal = self._split(x.shape[1], r, x.device)
        x, self.size, self.source = bipartite_merge(x, keys, r, self.size, self.source, a, b)
        self.merged += r
        if temporal:  # [CLS], A's unmerged (odd slices), then B
            self.odd, self.grouped = self.odd - r, True
        else:
            self.odd = None
        return x

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N', C) -> (B, N0, C): each original token reads the token it went into (``x`` itself when nothing
        merged)."""
        if not self.merged:
            return x
        return x.gather(1, self.source.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def bipartite_merge(x: torch.Tensor, keys: torch.Tensor, r: int, size: torch.Tensor, source: torch.Tensor,
                    a_idx: torch.Tensor, b_idx: torch.Tensor):
    """One merge step: (x, size, source) with the ``r`` most similar pairs of (set A at ``a_idx``, set B at
    ``b_idx``) merged, A's token into B's, tokens ordered [CLS], A's unmerged, B. The matching runs without
    gradients (an index choice); the size-weighted average is differentiable."""
    batch, _, channels = x.shape
    with torch.no_grad():
        metric = keys.float().mean(2) if keys.dim() == 4 else keys.float()  # the heads' keys averaged
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, a_idx] @ metric[:, b_idx].transpose(1, 2)  # (B, Na, Nb) cosine similarities
        best, dst = scores.max(-1)  # each A token's most similar B token
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
        src, unm = order[:, :r], order[:, r:]  # positions within A: merged, kept
        dst = dst.gather(1, src)  # positions within B
    b_a, b_b = a_idx.expand(batch, -1), b_idx.expand(batch, -1)

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

    weighted = x * size.to(x.dtype)  # size-weighted: a merged token is the mean of the tokens it stands for
    xa, xb = take(weighted, b_a), take(weighted, b_b)
    sa, sb = take(size, b_a), take(size, b_b)
    xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, channels), take(xa, src))
    sb = sb.scatter_add(1, dst[..., None], take(sa, src))
    su = take(sa, unm)
    merged = torch.cat((take(xa, unm), xb), 1) / torch.cat((su, sb), 1).to(x.dtype)
    new_x = torch.cat((x[:, :1], merged), 1)
    new_size = torch.cat((size[:, :1], su, sb), 1)
    # where each current token goes: [CLS] -> 0, A's unmerged -> 1.., B -> after them, A's merged -> its B
    n_unm = unm.shape[1]
    where = torch.zeros(batch, x.shape[1], dtype=torch.long, device=x.device)
    where.scatter_(1, take(b_a, unm), torch.arange(1, 1 + n_unm, device=x.device).expand(batch, -1))
    b_new = torch.arange(1 + n_unm, 1 + n_unm + b_idx.numel(), device=x.device).expand(batch, -1)
    where.scatter_(1, b_b, b_new)
    where.scatter_(1, take(b_a, src), b_new.gather(1, dst))
    return new_x, new_size, where.gather(1, source)


# ------------------------------------------------------------------------------------------------
# In a model: the state of the forward under way, set up and taken down by hooks on the base model
# ------------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar[TokenMerging | None] = contextvars.ContextVar("vivit_token_merging", default=None)
# How many merging states are set, in any thread. Zero (the usual case) answers `active()` from this plain module
# global, which torch.compile traces in every torch we support; Dynamo learned `ContextVar.get` only after torch
# 2.11, where it breaks a fullgraph compile of a model that merges nothing.
_SET = 0


def _push(state: TokenMerging) -> contextvars.Token:
    global _SET
    _SET += 1
    return _ACTIVE.set(state)


def _pop(token: contextvars.Token) -> None:
    global _SET
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
def merging_sequences(spec, layers: int, batch: int, tokens: int, device):
    """Merging inside the block over ``batch`` independent sequences of ``tokens`` ([CLS] first) that have no time
    axis, so ToMe's alternating split: Model 2's spatial encoder, one sequence per temporal index. ``spec`` None
    or 0: no merging. Yields the state (None without merging); nothing stays active after the block."""
    if not spec:
        yield None
        return
    state = TokenMerging.start(batch, 1, tokens - 1, merge_schedule(spec, layers, tokens), device)
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
    batch, frames, _, height, width = x.shape
    slices, per_slice = frames // t, (height // p) * (width // q)
    schedule = merge_schedule(spec, base.config.num_hidden_layers, 1 + slices * per_slice)
    base.__dict__.setdefault("_vivit_merge_tokens", []).append(
        _push(TokenMerging.start(batch, slices, per_slice, schedule, x.device)))
    return None


def _post_hook(base, args, kwargs, output):
    tokens = base.__dict__.get("_vivit_merge_tokens")
    if not tokens:
        return None
    state = _ACTIVE.get()
    _pop(tokens.pop())  # also when the forward raised (always_call): no state outlives its forward
    if output is None:
        return None
    last = output[0] if isinstance(output, tuple) else output.last_hidden_state
    full = state.unmerge(last)  # every original token reads the token it went into: [CLS] first, full length
    if isinstance(output, tuple):
        return (full, *output[1:])
    output.last_hidden_state = full
    return output


def set_merging_hooks(base: torch.nn.Module) -> None:
    """Install (``base.config.token_merging`` set) or remove the hooks that run merging in ``base``'s forward."""
    for hooks in (base._forward_pre_hooks, base._forward_hooks):
        for key, hook in list(hooks.items()):
            if hook in (_pre_hook, _post_hook):
                del hooks[key]
                base._forward_pre_hooks_with_kwargs.pop(key, None)
                base._forward_hooks_with_kwargs.pop(key, None)
                base._forward_hooks_always_called.pop(key, None)
    if getattr(base.config, "token_merging", None) and not getattr(type(base), "_vivit_base", False):
        # (the factorised Model 2 merges inside its own forward: ``merging_sequences``)
        base.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        base.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
