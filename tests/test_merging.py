"""Token merging (vivit_kernels.merging) on our flash attention: schedules, the merge step (sizes, the source map,
duplicates, the size-weighted mean of tokens that are not duplicates), exactness of proportional attention at the
op level (eager, sdpa, Triton) and the model level (a static clip whose temporal copies merge: each exactness test
also checks that tokens did merge, layer by layer), r = 0 identical to no merging, every returned token state full
length, and the switch on the model. The merge step's kernels against the eager Match: tests/test_token_merge.py."""

from __future__ import annotations

import pytest
import torch

import vivit_kernels as vk
from vivit_kernels import merging
from vivit_kernels.merging import SCHEDULES, TokenMerging, merge_schedule
from vivit_kernels.ops.attention import attention_ref, flash_attention_qkv, sdpa_attention
from vivit_kernels.ops.token_sets import Split

from helpers import DEVICE, assert_close


# ------------------------------------------------------------------------------------------------
# schedules and the merge step
# ------------------------------------------------------------------------------------------------
def test_schedules_by_number_fraction_list_and_name():
    assert merge_schedule(16, 3, 3137) == [16, 16, 16]
    assert merge_schedule([8, 0, 4], 3, 3137) == [8, 0, 4]
    frac = merge_schedule(0.25, 4, 1 + 400)
    assert frac == [100, 75, 56, 42]
    assert merge_schedule(10_000, 2, 1 + 10) == [5, 2]  # never more than half of what is left
    for name in SCHEDULES:
        assert len(merge_schedule(name, 12, 3137)) == 12
    with pytest.raises(ValueError, match="needs 12 values"):
        merge_schedule([1, 2], 12, 3137)
    with pytest.raises(ValueError, match="unknown merge schedule 'fast'"):
        merge_schedule("fast", 12, 3137)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        merge_schedule(1.5, 12, 3137)


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=pytest.mark.triton)], ids=["eager", "triton"])
def test_sizes_sum_to_the_tokens_and_each_group_is_its_members_size_weighted_mean(kernels):
    """Random tokens (no duplicates) through three merge steps: the sizes always sum to the clip's tokens, [CLS]
    never merges, and every merged token is the mean of the original tokens that went into it, computed here
    independently from the source map (the sizes weight the means of groups of groups)."""
    torch.manual_seed(0)
    B, T, S, C = 3, 4, 6, 8
    state = TokenMerging.start(T, S, [5, 4, 3])
    x = torch.randn(B, 1 + T * S, C, device=DEVICE)
    original = x
    for layer, r in enumerate(state.schedule):
        x = state.merge(x, torch.randn(B, x.shape[1], 2, 4, device=DEVICE), r, layer, kernels)
        assert x.shape[1] == state.size.shape[1] == 1 + T * S - sum(state.schedule[:layer + 1])
        assert torch.equal(state.size.sum(1), torch.full((B,), 1.0 + T * S, device=DEVICE))
        assert int(state.size[:, 0].max()) == 1  # [CLS] never merges
        assert_close(state.bias(), state.size.log(), 1e-6, name="bias = log(size)")
    full = state.unmerge(x)
    assert full.shape == original.shape
    assert torch.equal(state.source[:, 0], torch.zeros(B, dtype=torch.long, device=DEVICE))
    for b in range(B):  # each merged token: the plain mean of its original tokens
        for token in range(x.shape[1]):
            members = (state.source[b] == token).nonzero().squeeze(-1)
            assert len(members) == int(state.size[b, token])
            assert_close(x[b, token], original[b, members].mean(0), 1e-5, name=f"group {b}:{token}")
    assert state.size.max() > 1  # groups of more than one, some of them groups of groups


@pytest.mark.parametrize("kernels", [False, pytest.param(True, marks=pytest.mark.triton)], ids=["eager", "triton"])
def test_exact_duplicates_merge_into_each_other_and_r_zero_changes_nothing(kernels):
    torch.manual_seed(1)
    B, T, S, C = 2, 4, 5, 6
    x = torch.randn(B, 1 + T * S, C, device=DEVICE)
    x[:, 1 + S:1 + 2 * S] = x[:, 1:1 + S]  # slice 1 repeats slice 0: odd slices meet their even copies
    state = TokenMerging.start(T, S, [S])
    keys = x.view(B, 1 + T * S, 2, 3)
    merged = state.merge(x, keys, S, 0, kernels)
    assert merged.shape[1] == 1 + T * S - S and state.merged == S  # S tokens merged
    assert torch.equal(state.source[:, 1 + S:1 + 2 * S], state.source[:, 1:1 + S])  # each with its copy
    assert torch.equal(state.unmerge(merged), x)  # the duplicates merged with their copies, nothing else
    idle = TokenMerging.start(T, S, [0])
    assert idle.merge(x, keys, 0, 0, kernels) is x and idle.bias() is None  # r = 0: the same tensor, no bias


def test_the_split_follows_the_temporal_slices_then_toMe_alternation():
    state = TokenMerging.start(4, 6, [6, 6, 6])
    assert state.split(25, 6) == Split("temporal", per_slice=6)
    a, b = state.split(25, 6).positions(25, "cpu")
    assert a.tolist() == [*range(7, 13), *range(19, 25)] and b.tolist() == [*range(1, 7), *range(13, 19)]
    state.odd, state.grouped = 6, True  # after merging 6 of A's 12
    assert state.split(19, 6) == Split("grouped", odd=6)
    assert state.split(13, 7) == Split("alternate")  # A has fewer than r left: ToMe's alternation


# ------------------------------------------------------------------------------------------------
# proportional attention: duplicates merged give the unmerged attention
# ------------------------------------------------------------------------------------------------
def _duplicated_qkv(batch=2, tokens=19, heads=2, head_dim=16, copies=6):
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=g)
    qkv[:, tokens - copies:] = qkv[:, 1:1 + copies]  # the last `copies` tokens repeat tokens 1.. (q, k and v)
    merged = qkv[:, :tokens - copies].clone()
    sizes = torch.ones(batch, tokens - copies)
    sizes[:, 1:1 + copies] = 2
    return qkv.to(DEVICE), merged.to(DEVICE), sizes.log().to(DEVICE)


@pytest.mark.parametrize("impl", ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_merged_duplicates_with_proportional_attention_give_the_unmerged_outputs(impl):
    qkv, merged, bias = _duplicated_qkv()
    scale = 16**-0.5

    def attend(t, b):
        if impl == "triton":
            return flash_attention_qkv(t, scale, b)
        q, k, v = t.unbind(2)
        return attention_ref(q, k, v, scale, b) if impl == "eager" else sdpa_attention(q, k, v, scale, b)

    full = attend(qkv, None)
    out = attend(merged, bias)
    assert_close(out, full[:, :merged.shape[1]], 1e-5, name=f"{impl} merged")
    without = attend(merged, None)  # without the bias the merged tokens weigh one each: not the same
    assert (without - full[:, :merged.shape[1]]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def _tokens_out_of_each_layer(model, x, layers=None) -> list[int]:
    """The token count each encoder layer of ``model`` hands on in a forward of ``x`` (observed by forward hooks,
    which merging leaves alone): how many merged where."""
    counts: list[int] = []
    layers = model.vivit.layers if layers is None else layers
    handles = [layer.register_forward_hook(lambda m, args, out: counts.append(out.shape[1])) for layer in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def _static_pair(attn: str):
    """A tiny model whose temporal position embeddings are equal (every slice the same table) and a static clip:
    every temporal copy of a position enters the first layer as the same token."""
    cfg = vk.VivitConfig.from_preset("tiny", num_frames=8)  # 4 slices of 2 x 2 patches
    torch.manual_seed(0)
    model = vk.VivitForVideoClassification(cfg, attn=attn).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        table = model.vivit.embeddings.position_embeddings
        table[:, 1:] = table[:, 1:5].repeat(1, 4, 1)
    frame = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model.to(DEVICE), frame.expand(2, 8, 3, 32, 32).contiguous().to(DEVICE)


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_merging_the_temporal_copies_of_a_static_clip_changes_no_output(attn):
    model, clip = _static_pair(attn)
    with torch.no_grad():
        plain = model(clip).logits
        model.set_token_merging([4, 2])  # layer 1: the 2 odd slices' 4 tokens each... 8 copies; then 2 more
        merged = model(clip).logits
    assert model.token_merging == [4, 2] and model.config.token_merging == [4, 2]
    assert _tokens_out_of_each_layer(model, clip) == [17 - 4, 17 - 6]  # it merged
    assert_close(merged, plain, 1e-5, name=f"{attn} logits merged")


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_r_zero_is_identical_to_no_merging(attn):
    cfg = vk.VivitConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = vk.VivitForVideoClassification(cfg, attn=attn).to(DEVICE).eval()
    x = torch.randn(2, 4, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        plain = model(x).logits
        model.set_token_merging(0)
        assert model.token_merging is None
        model.set_token_merging([0, 0])  # merging on, merging nothing
        zero = model(x).logits
        model.set_token_merging(None)
        again = model(x).logits
    assert torch.equal(zero, plain) and torch.equal(again, plain)


@pytest.mark.triton
def test_merged_model_trains_and_its_last_hidden_state_is_full_length():
    cfg = vk.VivitConfig.from_preset("tiny", num_frames=8)
    torch.manual_seed(0)
    model = vk.VivitForVideoClassification(cfg, attn="triton").to(DEVICE)
    eager = vk.VivitForVideoClassification(cfg, attn="eager").to(DEVICE)
    eager.load_state_dict(model.state_dict())
    for m in (model, eager):
        m.set_token_merging(3)
    x = torch.randn(2, 8, 3, 32, 32, device=DEVICE)
    labels = torch.tensor([1, 2], device=DEVICE)
    out, ref = model(x, labels=labels), eager(x, labels=labels)
    assert _tokens_out_of_each_layer(model, x) == [17 - 3, 17 - 6]
    assert_close(out.logits, ref.logits, 1e-4, name="merged triton vs merged eager")
    out.loss.backward()
    ref.loss.backward()
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n].grad, 1e-4, rtol=1e-4, name=n)
    states = model.vivit(x, output_hidden_states=True)
    # every token state returned is full length: each original token reads the token it went into
    assert states.last_hidden_state.shape == (2, 1 + 4 * 4, cfg.hidden_size)
    assert [h.shape[1] for h in states.hidden_states] == [1 + 4 * 4] * 3


def test_the_switch_is_saved_and_read_back_and_checked(tmp_path):
    model = vk.VivitForVideoClassification("tiny").set_token_merging("fraction-20")
    model.save_pretrained(tmp_path)
    again = vk.VivitForVideoClassification.from_pretrained(tmp_path, attn="sdpa")
    assert again.token_merging == "fraction-20"
    with pytest.raises(ValueError, match="needs 2 values"):
        model.set_token_merging([1, 2, 3])
    for preset in ("tiny-fsa", "tiny-fdp"):  # Models 3 and 4: refused, and the refused call changes nothing
        grid = vk.VivitFactorizedForVideoClassification(preset)
        with pytest.raises(ValueError, match="Models 1 and 2"):
            grid.set_token_merging(2)
        assert grid.token_merging is None
    cfg = model.config
    clip = torch.randn(1, cfg.num_frames, cfg.num_channels, cfg.image_size, cfg.image_size)
    model.train().activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(clip)
    model.activation_checkpointing_disable()
    assert model(clip).logits.shape[0] == 1


# ------------------------------------------------------------------------------------------------
# Model 2: its spatial encoder merges within each temporal index's sequence
# ------------------------------------------------------------------------------------------------
def _model_2(attn: str, flat: bool):
    """A tiny Model 2 (16 patches per temporal index); ``flat``: every patch of a frame the same colour and every
    spatial position embedding equal, so the patch tokens of a temporal index enter the spatial encoder equal."""
    torch.manual_seed(0)
    cfg = vk.VivitFactorizedConfig.from_preset("tiny-fe", tubelet_size=[2, 8, 8])
    model = vk.VivitFactorizedForVideoClassification(cfg, attn=attn).eval()
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        if flat:
            table = model.vivit.embeddings.position_embeddings
            table[:, 2:] = table[:, 1:2]
            x = x.mean((-2, -1), keepdim=True).expand_as(x).contiguous()
    return model.to(DEVICE), x.to(DEVICE)


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_model_2_merges_equal_patches_exactly_and_r_zero_changes_nothing(attn):
    model, x = _model_2(attn, flat=True)
    with torch.no_grad():
        plain = model(x).logits
        model.set_token_merging([0, 0])
        zero = model(x).logits
        model.set_token_merging([6, 4])  # 16 equal patch tokens per temporal index: 6, then 4 more merge
        merged = model(x, output_hidden_states=True)
    assert torch.equal(zero, plain)
    assert _tokens_out_of_each_layer(model, x, model.vivit.spatial_layers) == [11, 7]  # spatial 17 -> 11 -> 7
    assert [h.shape[1] for h in merged.hidden_states] == [17, 17, 3]  # returned full length; temporal 1 + 2
    assert_close(merged.logits, plain, 1e-5, name=f"{attn} Model 2 merged")


@pytest.mark.triton
def test_model_2_merged_on_our_kernels_matches_merged_eager():
    model, x = _model_2("triton", flat=False)
    eager, _ = _model_2("eager", flat=False)
    for m in (model, eager):
        m.set_token_merging("fraction-30")
    with torch.no_grad():
        ours, ref = model(x).logits, eager(x).logits
        counts = _tokens_out_of_each_layer(model, x, model.vivit.spatial_layers)
        plain = eager.set_token_merging(None)(x).logits
    assert counts == [17 - 4, 17 - 7]  # fraction-30 of 16 patch tokens, then of 12
    assert_close(ours, ref, 1e-4, name="merged Model 2, triton vs eager")
    assert not torch.allclose(ref, plain, atol=1e-4)


def test_a_forward_that_fails_leaves_no_merging_state_behind():
    model = vk.VivitForVideoClassification("tiny").set_token_merging(2)
    cfg = model.config
    with pytest.raises(ValueError, match="frames"):  # raised inside the forward, after the merging state started
        model(torch.randn(1, cfg.num_frames + 2, cfg.num_channels, cfg.image_size, cfg.image_size))
    assert merging.active() is None


@pytest.mark.parametrize("attn", ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)])
def test_torch_flop_counter_observes_a_merged_model(attn):
    """FlopCounterMode's module tracker installs global forward hooks that only watch: a merged model runs under it
    (our kernels too, the merge step's among them), with the logits it gives without it and fewer FLOPs counted
    than unmerged."""
    from torch.utils.flop_counter import FlopCounterMode

    from vivit_kernels.ops import _triton

    cfg = vk.VivitConfig.from_preset("tiny", num_frames=8)
    torch.manual_seed(0)
    model = vk.VivitForVideoClassification(cfg, attn=attn).to(DEVICE).eval()
    x = torch.randn(2, 8, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x)
        plain = counter.get_total_flops()
        model.set_token_merging(4)
        expected = model(x).logits
        before = dict(_triton.LAUNCHES)
        with FlopCounterMode(display=False) as counter:
            logits = model(x).logits
    assert torch.equal(logits, expected)
    assert 0 < counter.get_total_flops() < plain
    launched = {k for k, v in _triton.LAUNCHES.items() if v > before.get(k, 0)}
    assert ("_merge_kernel" in launched) == (attn == "triton")  # the merge step on our kernels, under the counter
