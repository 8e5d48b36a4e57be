"""Token merging's step as one op: match each token of set A to its most similar token of set B, merge the ``r``
best pairs (size-weighted), and keep the bookkeeping (sizes, proportional attention's bias, where every original
token went), in four Triton launches that never store the similarity matrix.

The sets (``Split``): after [CLS], A holds the odd temporal slices and B the even ones (``temporal``: each token
meets its own position a slice away), or, after a temporal merge, A is the first ``odd`` tokens and B the rest
(``grouped``), or ToMe's alternation (``alternate``). Similarity is the cosine of the keys averaged over heads.

- ``_match_kernel``: per block of A's tokens, their head-averaged, normalised keys against every tile of B's (each
  recomputed from the keys where the QKV projection wrote them: strided, no copy), a running max and argmax (the
  lowest index on ties, as ``torch.max`` gives): each A token's best score and B token. Never the A x B matrix.
- ``_rank_kernel``: each A token's rank by score (descending; ties: lower index first, a stable sort's order),
  so no sort and no host sync; the ``r`` first merge. Writes where every current token goes.
- ``_order_kernel``: the merged tokens ordered by (destination, index), so each B token's merged tokens are one
  contiguous run: sums in a fixed order, no float atomics (deterministic).
- ``_merge_kernel``: per output row, [CLS], A's kept tokens (by rank) or a B token with its run, size-weighted
  (sum(size x) / sum(size), in fp32); the new sizes and log(size) (the next layer's per-key attention bias); and
  the source map (each original token's index now).

Backward (training merged): each input token reads the output row it went into, times its share of that row's
size (``_merge_bwd_kernel``, one launch). The matching is an index choice: no gradient flows to the keys.

``match_tokens`` / ``Match`` are the eager reference, written as ToMe's ``bipartite_soft_matching``: matching
returns a match that merges any tensor and tracks where tokens went.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, KernelConfig, check_launchable, emulate_bf16, launch, next_pow2, tl, triton
from .formulas import register_flop_formulas
from .token_sets import MODES, Split

__all__ = ["Match", "match_tokens", "merge_tokens", "merge_tokens_ref", "merged_tokens", "merged_tokens_ref",
           "fused_why_not", "MATCH_CONFIGS", "RANK_CONFIG", "ORDER_CONFIG", "MERGE_CONFIG"]

# The matching's (BLOCK_A, BLOCK_B) and warps by padded head dim (its products in IEEE fp32, on FMA units: the
# similarities the reference computes); the ranking's and ordering's (BLOCK, BLOCK_J); the merge's and its backward's.
# Each compiles for sm_80 / sm_90 without spills (tests/test_aot.py).
MATCH_CONFIGS = {32: KernelConfig.make(8, 1, BLOCK_A=64, BLOCK_B=64),
                 64: KernelConfig.make(8, 1, BLOCK_A=64, BLOCK_B=64),
                 128: KernelConfig.make(8, 1, BLOCK_A=32, BLOCK_B=32)}
# The ranking's tile: 64 x 64 comparisons (~120 registers on sm_80 / sm_90); 128 x 128 spilled 304 bytes under
# Triton 3.9 (255 registers) though not under 3.6 / 3.8.
RANK_CONFIG = KernelConfig.make(4, 1, BLOCK=64, BLOCK_J=64)
ORDER_CONFIG = KernelConfig.make(4, 1, BLOCK=64, BLOCK_J=64)
MERGE_CONFIG = KernelConfig.make(4, 1, BLOCK_C=1024, BLOCK_T=256)  # a row per program, 1024 channels at a time
MAX_HEAD_DIM = 128


# ------------------------------------------------------------------------------------------------
# The eager reference: ToMe's bipartite soft matching, for a split
# ------------------------------------------------------------------------------------------------
@dataclass
class Match:
    """What one merge step chose (ToMe's bipartite soft matching): set A's tokens at ``a``, B's at ``b`` (positions
    among the current tokens); ``dst`` (batch, |A|): each A token's most similar B token (its index in B);
    ``order`` (batch, |A|): A's tokens by that similarity, most similar first (ties: the lower index first); the
    first ``r`` merge into their ``dst``. A match merges any (batch, n, ...) tensor (``merge``) and says where each
    token went (``where``, ``track``)."""

    a: torch.Tensor
    b: torch.Tensor
    dst: torch.Tensor
    order: torch.Tensor
    r: int

    @property
    def src(self) -> torch.Tensor:
        """(batch, r): the merged A tokens (indices in A), most similar first."""
        return self.order[:, :self.r]

    @property
    def kept(self) -> torch.Tensor:
        """(batch, |A| - r): the A tokens that stay (indices in A), in ``order``'s order."""
        return self.order[:, self.r:]

    def merge(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x merged, its sizes): [CLS], A's kept tokens, then B, each B token the size-weighted mean of itself
        and the A tokens merged into it. ``x`` (batch, n, C); ``size`` (batch, n): tokens each stands for."""
        batch, _, channels = x.shape
        size = size.float()
        weighted = x.float() * size[..., None]  # a merged token is the mean of the tokens it stands for
        xa, xb = weighted[:, self.a], weighted[:, self.b]
        sa, sb = size[:, self.a], size[:, self.b]
        src, kept = self.src, self.kept
        dst = self.dst.gather(1, src)
        xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, channels), xa.gather(1, src[..., None].expand(
            -1, -1, channels)))
        sb = sb.scatter_add(1, dst, sa.gather(1, src))
        sk = sa.gather(1, kept)
        xk = xa.gather(1, kept[..., None].expand(-1, -1, channels))
        new_size = torch.cat((size[:, :1], sk, sb), 1)
        merged = torch.cat((weighted[:, :1], xk, xb), 1) / new_size[..., None]
        return merged.to(x.dtype), new_size

    def where(self, n: int) -> torch.Tensor:
        """(batch, n): the index each of the current ``n`` tokens has after the merge ([CLS] 0, A's kept tokens
        from 1 in ``order``'s order, then B; a merged A token: its B token's)."""
        batch = self.order.shape[0]
        device = self.order.device
        kept = self.kept.shape[1]
        new = torch.zeros(batch, n, dtype=torch.long, device=device)
        b_new = torch.arange(1 + kept, 1 + kept + self.b.numel(), device=device).expand(batch, -1)
        new[:, self.b] = b_new
        a_new = torch.empty(batch, self.a.numel(), dtype=torch.long, device=device)
        a_new.scatter_(1, self.kept, torch.arange(1, 1 + kept, device=device).expand(batch, -1))
        a_new.scatter_(1, self.src, b_new.gather(1, self.dst.gather(1, self.src)))
        new[:, self.a] = a_new
        return new

    def track(self, source: torch.Tensor, n: int) -> torch.Tensor:
        """``source`` (batch, N0): each original token's current index -> its index after the merge."""
        return self.where(n).gather(1, source)


def match_tokens(keys: torch.Tensor, r: int, split: Split) -> Match:
    """ToMe's bipartite soft matching on ``keys`` (batch, n, heads, head_dim) or (batch, n, C): the keys averaged
    over heads and normalised, each A token's most similar B token (cosine; ties: the lower index), A's tokens
    ordered by that similarity (a stable sort: ties keep the lower index first). No gradient: an index choice."""
    with torch.no_grad():
        metric = keys.float().mean(2) if keys.dim() == 4 else keys.float()
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = split.positions(keys.shape[1], keys.device)
        scores = metric[:, a] @ metric[:, b].transpose(1, 2)  # (batch, |A|, |B|) cosine similarities
        best, dst = scores.max(-1)  # the first maximum: the lower index on ties
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    return Match(a, b, dst, order, r)


def merge_tokens_ref(x, keys, size, source, r: int, split: Split):
    """The definition: (x merged, sizes, source map, log(sizes)) of one merge step (``Match``); ``size`` None: one
    each, ``source`` None: the identity."""
    batch, n = x.shape[:2]
    size = torch.ones(batch, n, device=x.device) if size is None else size
    source = torch.arange(n, device=x.device).expand(batch, n) if source is None else source
    match = match_tokens(keys, r, split)
    merged, new_size = match.merge(x, size)
    return merged, new_size, match.track(source, x.shape[1]), new_size.log()


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import to_output

    @triton.jit
    def _a_position(i, MODE, P, ODD):
        """Position among the current tokens of A's ``i``-th token ([CLS] at 0), for split ``MODE`` (an index of
        ``MODES``: a runtime value, so one compiled kernel serves every split)."""
        temporal = 1 + (2 * (i // P) + 1) * P + i % P
        return tl.where(MODE == 0, temporal, tl.where(MODE == 1, 1 + i, 1 + 2 * i))

    @triton.jit
    def _b_position(j, MODE, P, ODD):
        """Position among the current tokens of B's ``j``-th token."""
        temporal = 1 + 2 * (j // P) * P + j % P
        return tl.where(MODE == 0, temporal, tl.where(MODE == 1, 1 + ODD + j, 2 + 2 * j))

    @triton.jit
    def _metric(KB, positions, mask, H, stride_kn, stride_kh, inv_h, d, mask_d):
        """The keys of the tokens at ``positions``, averaged over heads and normalised (cosine): (rows, BLOCK_D)."""
        offsets = positions.to(tl.int64)[:, None] * stride_kn + d[None, :]
        m2 = mask[:, None] & mask_d[None, :]
        acc = tl.load(KB + offsets, mask=m2, other=0.0).to(tl.float32)
        for h in range(1, H):
            acc += tl.load(KB + offsets + h * stride_kh, mask=m2, other=0.0).to(tl.float32)
        acc = acc * inv_h
        norm = tl.sqrt(tl.sum(acc * acc, 1))
        return acc / tl.maximum(norm, 1e-6)[:, None]

    @triton.jit
    def _match_kernel(
        K,  # keys (batch, n, heads, head_dim), unit stride along head_dim (a view of the QKV projection's output)
        BEST, DST,  # (batch, |A|) fp32: each A token's best score; int32: its B token
        stride_kb, stride_kn, stride_kh,
        NA, NB, H, D, inv_h, MODE, P, ODD,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """For a block of A's tokens, the most similar B token (cosine of head-averaged keys), tile by tile over
        B with a running max and argmax; ties go to the lower index (a strict comparison across tiles, the first
        maximum within one)."""
        batch = tl.program_id(1).to(tl.int64)  # the work along axis 0 (up to 2^31 programs), the batch along axis 1
        ia = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        mask_a = ia < NA
        d = tl.arange(0, BLOCK_D)
        mask_d = d < D
        KB = K + batch * stride_kb
        ma = _metric(KB, _a_position(ia, MODE, P, ODD), mask_a, H, stride_kn, stride_kh, inv_h, d, mask_d)
        best = tl.full([BLOCK_A], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_A], tl.int32)
        for j0 in range(0, NB, BLOCK_B):
            jb = j0 + tl.arange(0, BLOCK_B)
            mask_b = jb < NB
            mb = _metric(KB, _b_position(jb, MODE, P, ODD), mask_b, H, stride_kn, stride_kh, inv_h, d, mask_d)
            scores = tl.dot(ma, tl.trans(mb), input_precision="ieee")
            scores = tl.where(mask_b[None, :], scores, float("-inf"))
            tile_best = tl.max(scores, 1)
            tile_arg = tl.argmax(scores, 1).to(tl.int32)
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            arg = tl.where(better, j0 + tile_arg, arg)
        tl.store(BEST + batch * NA + ia, best, mask=mask_a)
        tl.store(DST + batch * NA + ia, arg, mask=mask_a)

    @triton.jit
    def _rank_kernel(
        BEST, DST,  # (batch, |A|) from the matching
        BY_RANK,  # (batch, |A|) int32: the A token of each rank
        WHERE,  # (batch, n) int32: each current token's index after the merge
        NA, NB, N, r, MODE, P, ODD,
        BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """Each A token's rank (how many A tokens score higher, or as high at a lower index: a stable descending
        sort's position); where each current token goes. Programs after A's blocks place B's tokens and [CLS]."""
        batch = tl.program_id(1).to(tl.int64)
        pid = tl.program_id(0)
        a_blocks = tl.cdiv(NA, BLOCK)
        kept = NA - r
        if pid < a_blocks:
            ia = pid * BLOCK + tl.arange(0, BLOCK)
            mask = ia < NA
            mine = tl.load(BEST + batch * NA + ia, mask=mask, other=float("-inf"))
            rank = tl.zeros([BLOCK], tl.int32)
            for j0 in range(0, NA, BLOCK_J):
                j = j0 + tl.arange(0, BLOCK_J)
                theirs = tl.load(BEST + batch * NA + j, mask=j < NA, other=float("-inf"))
                ahead = (theirs[None, :] > mine[:, None]) | ((theirs[None, :] == mine[:, None]) & (j[None, :] <
                                                                                                  ia[:, None]))
                rank += tl.sum((ahead & (j < NA)[None, :]).to(tl.int32), 1)
            tl.store(BY_RANK + batch * NA + rank, ia, mask=mask)
            dst = tl.load(DST + batch * NA + ia, mask=mask, other=0)
            where = tl.where(rank < r, 1 + kept + dst, 1 + rank - r)
            tl.store(WHERE + batch * N + _a_position(ia, MODE, P, ODD), where, mask=mask)
        else:
            jb = (pid - a_blocks) * BLOCK + tl.arange(0, BLOCK)
            mask = jb < NB
            tl.store(WHERE + batch * N + _b_position(jb, MODE, P, ODD), 1 + kept + jb, mask=mask)
            # [CLS] stays first (jb == 0 only in the first of these programs; a tensor mask alone: Triton 3.9's
            # interpreter refuses a tensor mask and-ed with a scalar condition)
            tl.store(WHERE + batch * N + jb * 0, jb * 0, mask=jb == 0)

    @triton.jit
    def _order_kernel(
        BY_RANK, DST,  # (batch, |A|) int32
        SORTED_A, SORTED_DST,  # (batch, r) int32: the merged A tokens ordered by (B token, index)
        NA, r,
        BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
    ):
        """The r merged tokens (ranks 0..r-1) by (destination, index): each one's position is how many come
        before it, so each B token's merged tokens are one run, summed in this fixed order."""
        batch = tl.program_id(1).to(tl.int64)
        s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = s < r
        ia = tl.load(BY_RANK + batch * NA + s, mask=mask, other=0)
        dst = tl.load(DST + batch * NA + ia, mask=mask, other=0)
        key = dst.to(tl.int64) * NA + ia
        pos = tl.zeros([BLOCK], tl.int32)
        for t0 in range(0, r, BLOCK_J):
            t = t0 + tl.arange(0, BLOCK_J)
            mt = t < r
            it = tl.load(BY_RANK + batch * NA + t, mask=mt, other=0)
            dt = tl.load(DST + batch * NA + it, mask=mt, other=0)
            before = (dt.to(tl.int64) * NA + it)[None, :] < key[:, None]
            pos += tl.sum((before & mt[None, :]).to(tl.int32), 1)
        tl.store(SORTED_A + batch * r + pos, ia, mask=mask)
        tl.store(SORTED_DST + batch * r + pos, dst, mask=mask)

    @triton.jit
    def _merge_kernel(
        X, SIZE,  # x (batch, n, C) rows with unit column stride; size (batch, n) fp32
        BY_RANK, SORTED_A, SORTED_DST, WHERE, SOURCE,  # int32 (int64 SOURCE (batch, N0))
        OUT, NEW_SIZE, BIAS, NEW_SOURCE,  # (batch, n - r, C); (batch, n - r) fp32 twice; (batch, N0) int64
        stride_xb, stride_xn, stride_ob, stride_on,
        N, N0, NA, C, r, MODE, P, ODD,
        BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, EMULATE_BF16: tl.constexpr,
        HAS_SIZE: tl.constexpr = True, HAS_SOURCE: tl.constexpr = True,
    ):
        """Output row o: [CLS] (o = 0), A's kept token of rank o - 1 + r, or B's token o - 1 - kept with its run
        of merged tokens; sum(size x) / sum(size) in fp32, BLOCK_C channels at a time, the new size and its log.
        Programs after the rows update the source map: each original token's new index is where its current one
        goes. Before the first merge there are no sizes (every token 1: HAS_SIZE False) and no source map (the
        identity: HAS_SOURCE False)."""
        batch = tl.program_id(1).to(tl.int64)
        o = tl.program_id(0)
        n_out = N - r
        kept = NA - r
        if o < n_out:
            XB = X + batch * stride_xb
            is_b = o >= 1 + kept
            j = o - 1 - kept
            i = tl.load(BY_RANK + batch * NA + (o - 1 + r), mask=(o >= 1) & (o < 1 + kept), other=0)
            pos = tl.where(o == 0, 0, tl.where(is_b, _b_position(j, MODE, P, ODD), _a_position(i, MODE, P, ODD)))
            size = tl.load(SIZE + batch * N + pos) if HAS_SIZE else 1.0
            total = size
            # B's token j: its run [lo, hi) in the merged tokens sorted by destination (two binary searches)
            lo = r * 0
            hi = tl.where(is_b, r, 0)
            while lo < hi:
                mid = (lo + hi) // 2
                if tl.load(SORTED_DST + batch * r + mid) < j:
                    lo = mid + 1
                else:
                    hi = mid
            end = lo
            hi = tl.where(is_b, r, 0)
            while end < hi:
                mid = (end + hi) // 2
                if tl.load(SORTED_DST + batch * r + mid) <= j:
                    end = mid + 1
                else:
                    hi = mid
            for k in range(lo, end):
                pa = _a_position(tl.load(SORTED_A + batch * r + k), MODE, P, ODD)
                total += tl.load(SIZE + batch * N + pa) if HAS_SIZE else 1.0
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                cmask = cols < C
                acc = tl.load(XB + pos.to(tl.int64) * stride_xn + cols, mask=cmask, other=0.0).to(tl.float32) * size
                for k in range(lo, end):
                    pa = _a_position(tl.load(SORTED_A + batch * r + k), MODE, P, ODD)
                    sa = tl.load(SIZE + batch * N + pa) if HAS_SIZE else 1.0
                    acc += tl.load(XB + pa.to(tl.int64) * stride_xn + cols, mask=cmask, other=0.0).to(tl.float32) * sa
                tl.store(OUT + batch * stride_ob + o.to(tl.int64) * stride_on + cols,
                         to_output(acc / total, OUT.dtype.element_ty, EMULATE_BF16), mask=cmask)
            tl.store(NEW_SIZE + batch * n_out + o, total)
            tl.store(BIAS + batch * n_out + o, tl.log(total))
        else:
            t = (o - n_out) * BLOCK_T + tl.arange(0, BLOCK_T)
            mask = t < N0
            current = tl.load(SOURCE + batch * N0 + t, mask=mask, other=0) if HAS_SOURCE else t
            tl.store(NEW_SOURCE + batch * N0 + t, tl.load(WHERE + batch * N + current, mask=mask, other=0).to(tl.int64),
                     mask=mask)

    @triton.jit
    def _merge_bwd_kernel(
        GRAD, SIZE, NEW_SIZE, WHERE, DX,  # grad (batch, n - r, C); sizes (batch, n), (batch, n - r); dx (batch, n, C)
        stride_gb, stride_gn, stride_db, stride_dn,
        N, C, n_out,
        BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_SIZE: tl.constexpr = True,
    ):
        """d x_t = d out_w * size_t / size_w, w the row token t went into: every input row reads one output row
        (size_t = 1 before the first merge: HAS_SIZE False)."""
        batch = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0)
        w = tl.load(WHERE + batch * N + t)
        size = tl.load(SIZE + batch * N + t) if HAS_SIZE else 1.0
        share = size / tl.load(NEW_SIZE + batch * n_out + w)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            g = tl.load(GRAD + batch * stride_gb + w.to(tl.int64) * stride_gn + cols, mask=cmask, other=0.0)
            tl.store(DX + batch * stride_db + t.to(tl.int64) * stride_dn + cols,
                     to_output(g.to(tl.float32) * share, DX.dtype.element_ty, EMULATE_BF16), mask=cmask)


# ------------------------------------------------------------------------------------------------
# Launchers, the custom ops and the functional API
# ------------------------------------------------------------------------------------------------
def _match_config(head_dim: int) -> KernelConfig:
    return MATCH_CONFIGS[max(32, next_pow2(head_dim))]


@torch.library.custom_op("vivit_kernels::token_merge_fwd", mutates_args=())
def token_merge_fwd(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None,
                    r: int, mode: int, per_slice: int, odd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """(x merged (batch, n - r, C), sizes (batch, n - r) fp32, source map (batch, N0) int64, log(sizes), where each
    current token went (batch, n) int32): four launches (match, rank, order, merge). ``mode`` (an index of
    ``MODES``), ``per_slice``, ``odd``: the ``Split``. ``size`` None: every token stands for one; ``source`` None:
    the identity (no merge yet: nothing is allocated or launched to make them)."""
    batch, n, channels = x.shape
    na, nb = Split(MODES[mode], per_slice, odd).sizes(n)
    heads, head_dim = keys.shape[2], keys.shape[3]
    dev = x.device
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    has_size, has_source = size is not None, source is not None
    size = size.float().contiguous() if has_size else x.new_empty(0, dtype=torch.float32)
    source = source.contiguous() if has_source else None
    best = torch.empty(batch, na, dtype=torch.float32, device=dev)
    dst = torch.empty(batch, na, dtype=torch.int32, device=dev)
    by_rank = torch.empty(batch, na, dtype=torch.int32, device=dev)
    where = torch.empty(batch, n, dtype=torch.int32, device=dev)
    sorted_a = torch.empty(batch, r, dtype=torch.int32, device=dev)
    sorted_dst = torch.empty(batch, r, dtype=torch.int32, device=dev)
    out = torch.empty(batch, n - r, channels, dtype=x.dtype, device=dev)
    new_size = torch.empty(batch, n - r, dtype=torch.float32, device=dev)
    bias = torch.empty(batch, n - r, dtype=torch.float32, device=dev)
    n0 = source.shape[1] if has_source else n
    new_source = torch.empty(batch, n0, dtype=torch.long, device=dev)
    if batch == 0:
        return out, new_size, new_source, bias, where
    cfg = _match_config(head_dim)
    launch(None, _match_kernel, lambda m: (triton.cdiv(na, m["BLOCK_A"]), batch),
           (keys, best, dst, keys.stride(0), keys.stride(1), keys.stride(2), na, nb, heads, head_dim, 1.0 / heads,
            mode, per_slice, odd),
           dict(BLOCK_D=max(16, next_pow2(head_dim))), cfg)
    rank = RANK_CONFIG
    launch(None, _rank_kernel, lambda m: (triton.cdiv(na, m["BLOCK"]) + triton.cdiv(nb, m["BLOCK"]), batch),
           (best, dst, by_rank, where, na, nb, n, r, mode, per_slice, odd), {}, rank)
    if r:
        launch(None, _order_kernel, lambda m: (triton.cdiv(r, m["BLOCK"]), batch),
               (by_rank, dst, sorted_a, sorted_dst, na, r), {}, ORDER_CONFIG)
    merge = MERGE_CONFIG
    launch(None, _merge_kernel, lambda m: (n - r + triton.cdiv(n0, m["BLOCK_T"]), batch),
           (x2, size, by_rank, sorted_a, sorted_dst, where, source if has_source else new_source, out, new_size, bias,
            new_source, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1), n, n0, na, channels, r, mode,
            per_slice, odd),
           dict(EMULATE_BF16=emulate_bf16(x.dtype), HAS_SIZE=has_size, HAS_SOURCE=has_source), merge)
    return out, new_size, new_source, bias, where


@token_merge_fwd.register_fake
def _(x, keys, size, source, r, mode, per_slice, odd):
    batch, n, channels = x.shape
    merged = x.new_empty(batch, n - r, channels)
    n0 = n if source is None else source.shape[1]
    return (merged, x.new_empty(batch, n - r, dtype=torch.float32), x.new_empty(batch, n0, dtype=torch.long),
            x.new_empty(batch, n - r, dtype=torch.float32), x.new_empty(batch, n, dtype=torch.int32))


@torch.library.custom_op("vivit_kernels::token_merge_bwd", mutates_args=())
def token_merge_bwd(grad: torch.Tensor, size: torch.Tensor | None, new_size: torch.Tensor,
                    where: torch.Tensor) -> torch.Tensor:
    """dx (batch, n, C): each token's share (its size over its output row's) of that row's gradient; one launch."""
    batch, n_out, channels = grad.shape
    n = where.shape[1]
    dx = torch.empty(batch, n, channels, dtype=grad.dtype, device=grad.device)
    if batch and n:
        g2 = grad if grad.stride(-1) == 1 else grad.contiguous()
        launch(None, _merge_bwd_kernel, lambda m: (n, batch),
               (g2, new_size if size is None else size.float().contiguous(), new_size, where, dx, g2.stride(0),
                g2.stride(1), dx.stride(0), dx.stride(1), n, channels, n_out),
               dict(EMULATE_BF16=emulate_bf16(grad.dtype), HAS_SIZE=size is not None), MERGE_CONFIG)
    return dx


@token_merge_bwd.register_fake
def _(grad, size, new_size, where):
    return grad.new_empty(grad.shape[0], where.shape[1], grad.shape[2])


def _setup_context(ctx, inputs, output):
    size = inputs[2]
    merged, new_size, new_source, bias, where = output
    ctx.save_for_backward(size, new_size, where)
    ctx.mark_non_differentiable(new_size, new_source, bias, where)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *unused):
    if grad is None:
        return (None,) * 8
    size, new_size, where = ctx.saved_tensors
    return token_merge_bwd(grad, size, new_size, where), *(None,) * 7


token_merge_fwd.register_autograd(_backward, setup_context=_setup_context)
register_flop_formulas(token_merge_fwd, token_merge_bwd)


def fused_why_not(x: torch.Tensor, keys: torch.Tensor) -> str | None:
    """None when the kernels take these inputs (keys with a heads axis, head_dim within the limit), else
    why not."""
    if keys.dim() != 4:
        return "keys without a heads axis"
    if keys.shape[3] > MAX_HEAD_DIM:
        return f"head_dim {keys.shape[3]} > {MAX_HEAD_DIM}"
    return None


def merge_tokens(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor | None, source: torch.Tensor | None, r: int,
                 split: Split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One merge step in Triton: (x merged, sizes, source map, log(sizes)). ``x`` (batch, n, C); ``keys`` (batch,
    n, heads, head_dim), strided; ``size`` (batch, n) fp32: tokens each stands for (None: one each); ``source``
    (batch, N0) int64: each original token's current index (None: the identity, nothing merged yet); ``r`` pairs
    merged between ``split``'s sets. Gradients reach ``x`` (the size-weighted average), not the keys (matching is an
    index choice)."""
    batch, n, _ = x.shape
    na, nb = split.sizes(n)
    if not 0 <= r <= min(na, nb):
        raise ValueError(f"merge_tokens: r must be in [0, {min(na, nb)}] for sets of {na} and {nb} tokens, got {r}")
    if keys.shape[:2] != x.shape[:2] or (size is not None and tuple(size.shape) != (batch, n)) or \
            (source is not None and source.shape[0] != batch):
        raise ValueError(f"merge_tokens: x {tuple(x.shape)}, keys {tuple(keys.shape)}, size "
                         f"{None if size is None else tuple(size.shape)} and source "
                         f"{None if source is None else tuple(source.shape)} must agree on (batch, tokens)")
    why = fused_why_not(x, keys)
    if why is not None:
        raise ValueError(f"merge_tokens: the kernels take {why}; use merge_tokens_ref")
    check_launchable(x, keys, *(t for t in (size, source) if t is not None), what="merge_tokens")
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    merged, new_size, new_source, bias, _ = token_merge_fwd(x, keys, size, source, int(r), split.code,
                                                            split.per_slice, split.odd)
    return merged, new_size, new_source, bias


def merged_tokens(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, source: torch.Tensor, r: int,
                  mode: str, per_slice: int = 1, odd: int = 0) -> torch.Tensor:
    """The op's registry call: ``merge_tokens``'s merged tokens alone (the split as its fields)."""
    return merge_tokens(x, keys, size, source, r, Split(mode, per_slice, odd))[0]


def merged_tokens_ref(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, source: torch.Tensor, r: int,
                      mode: str, per_slice: int = 1, odd: int = 0) -> torch.Tensor:
    return merge_tokens_ref(x, keys, size, source, r, Split(mode, per_slice, odd))[0]


def aot_cases():
    """Every shipped config in each dtype; the merge with and without earlier sizes and source map (the first merge
    has neither), its backward likewise. The split is a runtime value: one kernel serves every split."""
    from ._aot_cases import make_case

    cases = []
    for ty in ("fp16", "bf16", "fp32"):
        for block_d, cfg in MATCH_CONFIGS.items():
            sig = dict(K=f"*{ty}", BEST="*fp32", DST="*i32", stride_kb="i32", stride_kn="i32", stride_kh="i32",
                       NA="i32", NB="i32", H="i32", D="i32", inv_h="fp32", MODE="i32", P="i32", ODD="i32")
            cases.append(make_case(__name__, _match_kernel, "_match_kernel", sig, dict(cfg.kwargs, BLOCK_D=block_d),
                                   cfg.num_warps, 1, f"{ty} d={block_d} {cfg.label()}"))
        cfg = MERGE_CONFIG
        sig = dict(X=f"*{ty}", SIZE="*fp32", BY_RANK="*i32", SORTED_A="*i32", SORTED_DST="*i32", WHERE="*i32",
                   SOURCE="*i64", OUT=f"*{ty}", NEW_SIZE="*fp32", BIAS="*fp32", NEW_SOURCE="*i64", stride_xb="i32",
                   stride_xn="i32", stride_ob="i32", stride_on="i32", N="i32", N0="i32", NA="i32", C="i32", r="i32",
                   MODE="i32", P="i32", ODD="i32")
        bwd = dict(GRAD=f"*{ty}", SIZE="*fp32", NEW_SIZE="*fp32", WHERE="*i32", DX=f"*{ty}", stride_gb="i32",
                   stride_gn="i32", stride_db="i32", stride_dn="i32", N="i32", C="i32", n_out="i32")
        for later in (True, False):
            tag = "" if later else " first-merge"
            cases.append(make_case(__name__, _merge_kernel, "_merge_kernel", sig,
                                   dict(cfg.kwargs, EMULATE_BF16=False, HAS_SIZE=later, HAS_SOURCE=later),
                                   cfg.num_warps, 1, f"{ty} {cfg.label()}{tag}"))
            cases.append(make_case(__name__, _merge_bwd_kernel, "_merge_bwd_kernel", bwd,
                                   dict(BLOCK_C=cfg.kwargs["BLOCK_C"], EMULATE_BF16=False, HAS_SIZE=later),
                                   cfg.num_warps, 1, f"{ty} BLOCK_C={cfg.kwargs['BLOCK_C']}{tag}"))
    sig = dict(BEST="*fp32", DST="*i32", BY_RANK="*i32", WHERE="*i32", NA="i32", NB="i32", N="i32", r="i32",
               MODE="i32", P="i32", ODD="i32")
    cases.append(make_case(__name__, _rank_kernel, "_rank_kernel", sig, dict(RANK_CONFIG.kwargs), RANK_CONFIG.num_warps,
                           1, RANK_CONFIG.label()))
    sig = dict(BY_RANK="*i32", DST="*i32", SORTED_A="*i32", SORTED_DST="*i32", NA="i32", r="i32")
    cases.append(make_case(__name__, _order_kernel, "_order_kernel", sig, dict(ORDER_CONFIG.kwargs),
                           ORDER_CONFIG.num_warps, 1, ORDER_CONFIG.label()))
    return cases
