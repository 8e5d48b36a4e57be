"""Token merging's step in Triton (vivit_kernels.ops.token_merge) against the eager reference (ToMe's bipartite soft
matching, ``Match``): the same pairs on random keys and on keys with ties (the source map equal, bit for bit), the
merged tokens, sizes and bias, the gradient, every split, r = 0 and the largest r, the first merge (no sizes, no
source map yet), four launches forward and one backward, opcheck, and clear errors. (Every variant of the op
against its reference in fp32 and bf16: tests/test_choose.py; at ViViT-B shapes: tests/test_cuda.py.)"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.ops import _triton
from vivit_kernels.ops.token_merge import Match, match_tokens, merge_tokens, merge_tokens_ref, token_merge_fwd
from vivit_kernels.ops.token_sets import MODES, Split

from helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton

B, SLICES, P, H, D, C = 2, 6, 5, 2, 16, 24
N = 1 + SLICES * P


def _split(mode: str) -> Split:
    return Split(mode, per_slice=P, odd=(SLICES // 2) * P - 4 if mode == "grouped" else 0)


def _inputs(seed: int, sized: bool = True, keys=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g)
    if keys is not None:
        qkv[:, :, 1] = keys
    x = torch.randn(B, N, C, generator=g)
    size = torch.randint(1, 4, (B, N), generator=g).float() if sized else None
    source = torch.randint(0, N, (B, 3 * N), generator=g) if sized else None
    t = lambda v: None if v is None else v.to(DEVICE)  # noqa: E731
    return t(x), t(qkv)[:, :, 1], t(size), t(source)  # the keys: a strided view of the projection's output


def _same(got, ref, name: str, atol: float = 1e-6):
    merged, size, source, bias = got
    assert torch.equal(source, ref[2]), f"{name}: another set of pairs (the source maps differ)"
    assert_close(size, ref[1], 0.0, name=f"{name} sizes")
    assert_close(bias, ref[3], 1e-6, name=f"{name} bias")
    assert_close(merged, ref[0], atol, name=f"{name} tokens")


@pytest.mark.parametrize("sized", [True, False], ids=["later-merge", "first-merge"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kernels_choose_the_references_pairs_on_random_keys(seed, mode, sized):
    x, keys, size, source = _inputs(seed, sized)
    split = _split(mode)
    for r in (1, 7, min(split.sizes(N))):
        _same(merge_tokens(x, keys, size, source, r, split), merge_tokens_ref(x, keys, size, source, r, split),
              f"{mode} r={r} seed={seed}")


def _one_hot_keys(directions: torch.Tensor) -> torch.Tensor:
    """Keys whose head average is the one-hot vector ``directions[t]`` for token t (every head the same): cosines of
    exactly 0 or 1 in any arithmetic, so scores tie exactly wherever two directions agree."""
    keys = torch.zeros(B, N, H, D)
    keys[torch.arange(B)[:, None], torch.arange(N)[None, :], :, directions] = 1.0
    return keys


@pytest.mark.parametrize("mode", MODES)
def test_ties_go_to_the_lower_index_as_in_the_reference(mode):
    """Exact ties (each A token's scores tie across B, and their best scores tie across A), in every token the same
    direction and in a few directions repeating along the clip: the pairs torch.max (the first maximum) and a
    stable sort (the lower index first) choose."""
    split = _split(mode)
    position = torch.arange(N).expand(B, N)
    shifted = (position * 7 + torch.arange(B)[:, None]) % 5
    for directions in (torch.zeros(B, N, dtype=torch.long), position % 3, shifted):
        x, keys, size, source = _inputs(3, keys=_one_hot_keys(directions))
        for r in (1, 9):
            got, ref = merge_tokens(x, keys, size, source, r, split), merge_tokens_ref(x, keys, size, source, r, split)
            _same(got, ref, f"{mode} ties r={r}")
    match = match_tokens(_one_hot_keys(torch.zeros(B, N, dtype=torch.long)).to(DEVICE), 4, split)
    assert torch.equal(match.dst, torch.zeros_like(match.dst))  # every A token: B's first token
    assert torch.equal(match.order, torch.arange(match.order.shape[1], device=DEVICE).expand_as(match.order))


def test_duplicated_slices_merge_copies_as_the_reference_does():
    """A static clip: each temporal slice a copy of the first, keys and tokens. Every A token then has several B
    copies within rounding of the same score (which one is the maximum is rounding, differently in any two
    arithmetics; exact ties are the test above), so the check is what matters: each merge joins a token with a copy
    of itself, in the kernels as in the reference, and the merged clip brought back to full length is the clip."""
    g = torch.Generator().manual_seed(10)
    slice_k, slice_x = torch.randn(B, 1, P, H, D, generator=g), torch.randn(B, 1, P, C, generator=g)
    keys = torch.cat((torch.randn(B, 1, H, D, generator=g), slice_k.expand(B, SLICES, P, H, D).reshape(B, -1, H, D)), 1)
    x = torch.cat((torch.randn(B, 1, C, generator=g), slice_x.expand(B, SLICES, P, C).reshape(B, -1, C)), 1).to(DEVICE)
    keys = keys.to(DEVICE)
    split = _split("temporal")
    for r in (6, 15):
        got, ref = merge_tokens(x, keys, None, None, r, split), merge_tokens_ref(x, keys, None, None, r, split)
        for merged, size, source, _ in (got, ref):
            assert merged.shape[1] == N - r and int(size.sum(1).min()) == N
            full = merged.gather(1, source[..., None].expand(-1, -1, C))
            assert_close(full, x, 1e-6, name=f"r={r}: only copies merged")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_the_gradient_is_each_tokens_share_of_its_row(mode, dtype):
    x, keys, size, source = _inputs(4)
    split = _split(mode)
    grad = torch.randn(B, N - 6, C, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    leaf = x.detach().to(dtype).requires_grad_()
    merge_tokens(leaf, keys.to(dtype), size, source, 6, split)[0].backward(grad.to(dtype))
    ref = x.detach().clone().requires_grad_()
    merge_tokens_ref(ref, keys, size, source, 6, split)[0].backward(grad)
    assert_close(leaf.grad.float(), ref.grad, 1e-6 if dtype == torch.float32 else 2e-2, name=f"{mode} dx")


def test_four_launches_forward_and_one_backward():
    x, keys, size, source = _inputs(6)
    leaf = x.clone().requires_grad_()
    before = sum(_triton.LAUNCHES.values())
    merged = merge_tokens(leaf, keys, size, source, 5, _split("temporal"))[0]
    assert sum(_triton.LAUNCHES.values()) - before == 4  # match, rank, order, merge
    merged.sum().backward()
    assert sum(_triton.LAUNCHES.values()) - before == 5  # the gather backward
    before = sum(_triton.LAUNCHES.values())
    out = merge_tokens(x, keys, None, None, 0, _split("temporal"))
    assert sum(_triton.LAUNCHES.values()) - before == 3  # r = 0: nothing to order
    assert torch.equal(out[0].gather(1, out[2][..., None].expand(-1, -1, C)), x)  # reordered (by rank), none merged


def test_opcheck():
    x, keys, size, source = _inputs(7)
    torch.library.opcheck(token_merge_fwd, (x.requires_grad_(), keys, size, source, 5, 0, P, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_a_match_merges_any_tensor_and_tracks_sources():
    """ToMe's shape: one match, applied to the tokens and to another tensor of the same tokens alike."""
    x, keys, size, _ = _inputs(8)
    match = match_tokens(keys, 5, _split("temporal"))
    assert isinstance(match, Match) and match.src.shape == (B, 5)
    merged, _ = match.merge(x, size)
    doubled, _ = match.merge(2 * x, size)
    assert_close(doubled, 2 * merged, 1e-5, name="the same match on another tensor")
    where = match.where(N)
    assert where.shape == (B, N) and int(where.max()) == N - 5 - 1
    assert torch.equal(match.track(torch.arange(N, device=DEVICE).expand(B, N), N), where)


def test_bad_inputs_say_what_is_wrong():
    x, keys, size, source = _inputs(9)
    split = _split("temporal")
    na, nb = split.sizes(N)
    with pytest.raises(ValueError, match=rf"r must be in \[0, {min(na, nb)}\]"):
        merge_tokens(x, keys, size, source, min(na, nb) + 1, split)
    with pytest.raises(ValueError, match="must agree on"):
        merge_tokens(x, keys[:, 1:], size, source, 2, split)
    with pytest.raises(ValueError, match="keys without a heads axis"):
        merge_tokens(x, x, size, source, 2, split)
    with pytest.raises(ValueError, match="split mode must be one of"):
        Split("diagonal")


def test_rows_wider_than_a_block_are_merged_a_block_at_a_time():
    """Tokens of 1,100 channels (the merge reads and writes rows 1,024 channels at a time), forward and gradient."""
    x, keys, size, source = _inputs(11)
    wide = torch.randn(B, N, 1100, generator=torch.Generator().manual_seed(12)).to(DEVICE).requires_grad_()
    split = _split("temporal")
    got = merge_tokens(wide, keys, size, source, 7, split)
    ref = merge_tokens_ref(wide, keys, size, source, 7, split)
    _same(got, ref, "1100 channels")
    grad = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    dx, = torch.autograd.grad(got[0], wide, grad)
    dx_ref, = torch.autograd.grad(ref[0], wide, grad)
    assert_close(dx, dx_ref, 1e-6, name="1100 channels dx")
