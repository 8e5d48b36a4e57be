"""Token merging (vivit_kernels.merging) on our flash attention: schedules, the merge step (sizes, the source map,
duplicates), exactness of proportional attention at the op level (eager, sdpa, Triton) and the model level
(a static clip whose temporal copies merge), r = 0 identical to no merging, and the switch on the model."""

from __future__ import annotations

import pytest
import torch

import vivit_kernels as vk
from vivit_kernels.merging import SCHEDULES, TokenMerging, merge_schedule
from vivit_kernels.ops.attention import attention_ref, flash_attention_qkv, sdpa_attention

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


def test_sizes_sum_to_the_tokens_and_the_source_map_brings_them_back():
    torch.manual_seed(0)
    B, T, S, C = 3, 4, 6, 8
    state = TokenMerging.start(B, T, S, [5, 4, 3], DEVICE)
    x = torch.randn(B, 1 + T * S, C, device=DEVICE)
    original = x
    for r in state.schedule:
        x = state.merge(x, torch.randn(B, x.shape[1], 2, 4, device=DEVICE), r)
        assert x.shape[1] == state.size.shape[1]
        assert torch.equal(state.size.sum(1).squeeze(-1), torch.full((B,), 1.0 + T * S, device=DEVICE))
        assert int(state.size[:, 0].max()) == 1  # [CLS] never merges
    assert x.shape[1] == 1 + T * S - 12
    full = state.unmerge(x)
    assert full.shape == original.shape
    # each original token reads the token it went into: [CLS] stays, and the mean of a group is its tokens' mean
    assert torch.equal(full[:, 0], original[:, 0])


def test_exact_duplicates_merge_into_each_other_and_r_zero_changes_nothing():
    torch.manual_seed(1)
    B, T, S, C = 2, 4, 5, 6
    x = torch.randn(B, 1 + T * S, C, device=DEVICE)
    x[:, 1 + S:1 + 2 * S] = x[:, 1:1 + S]  # slice 1 repeats slice 0: odd slices meet their even copies
    state = TokenMerging.start(B, T, S, [S], DEVICE)
    merged = state.merge(x, x, S)
    assert torch.equal(state.unmerge(merged), x)  # the duplicates merged with their copies, nothing else
    idle = TokenMerging.start(B, T, S, [0], DEVICE)
    assert idle.merge(x, x, 0) is x and idle.bias() is None  # r = 0: the same tensor, no bias


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
    assert_close(out.logits, ref.logits, 1e-4, name="merged triton vs merged eager")
    out.loss.backward()
    ref.loss.backward()
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n].grad, 1e-4, rtol=1e-4, name=n)
    hidden = model.vivit(x).last_hidden_state
    assert hidden.shape == (2, 1 + 4 * 4, cfg.hidden_size)


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
    assert [h.shape[1] for h in merged.hidden_states] == [11, 7, 3]  # spatial 17 -> 11 -> 7; temporal 1 + 2
    assert_close(merged.logits, plain, 1e-5, name=f"{attn} Model 2 merged")


@pytest.mark.triton
def test_model_2_merged_on_our_kernels_matches_merged_eager():
    model, x = _model_2("triton", flat=False)
    eager, _ = _model_2("eager", flat=False)
    for m in (model, eager):
        m.set_token_merging("fraction-30")
    with torch.no_grad():
        ours, ref, plain = model(x).logits, eager(x).logits, eager.set_token_merging(None)(x).logits
    assert_close(ours, ref, 1e-4, name="merged Model 2, triton vs eager")
    assert not torch.allclose(ref, plain, atol=1e-4)  # fraction-30 merged something


def test_a_forward_that_fails_leaves_no_merging_state_behind():
    from vivit_kernels import merging

    model = vk.VivitForVideoClassification("tiny").set_token_merging(2)
    cfg = model.config
    with pytest.raises(ValueError, match="frames"):  # raised inside the forward, after the merging state started
        model(torch.randn(1, cfg.num_frames + 2, cfg.num_channels, cfg.image_size, cfg.image_size))
    assert merging.active() is None
