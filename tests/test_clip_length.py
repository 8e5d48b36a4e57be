"""Clips of another length than a checkpoint was trained on, for all four ViViT models: interpolate_pos_encoding
resizes every position table (checked against independent interpolations, and the identity at the trained
length); a clip whose every tubelet slice is repeated is the same clip to Models 3 and 4 (exactly, where the
positions do not vary over time); Models 1 and 2 on our kernels against eager at 2x and 4x the frames; a frame count
the model cannot read, and an empty batch, are clear errors naming what was given."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vivit_kernels as vk
from vivit_kernels.models import VivitFactorizedConfig
from vivit_kernels.modules import resize_positions

from helpers import DEVICE, assert_close

ATTNS = ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)]
ATOL = {"eager": 1e-5, "sdpa": 1e-5, "triton": 1e-4}  # fp32; the Triton kernels sum in another order
MODELS = ["model-1", "tiny-fe", "tiny-fsa", "tiny-fdp"]  # Models 1, 2, 3, 4 (4 frames of 32x32, tubelet 2x16x16)


def build(name: str, attn: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "model-1":
        config = vk.VivitConfig.from_preset("tiny", **overrides)
        model = vk.VivitForVideoClassification(config, attn=attn)
    else:
        model = vk.VivitFactorizedForVideoClassification(VivitFactorizedConfig.from_preset(name, **overrides),
                                                         attn=attn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE).eval()


def video(frames: int, batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, size, size, generator=g).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# clear errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_frames_the_model_cannot_read_name_both_numbers(name):
    """5 frames into a 4-frame model with 2-frame tubelets used to lose the fifth without a word."""
    model = build(name, "eager")
    for frames in (5, 6, 2):
        with pytest.raises(ValueError, match=rf"input has {frames} frames, the model expects num_frames=4"):
            model(video(frames))
    with pytest.raises(ValueError, match=r"smaller than one tubelet"):
        model(video(1), interpolate_pos_encoding=True)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("interpolate", [False, True])
def test_an_empty_batch_is_a_clear_error(name, interpolate):
    with pytest.raises(ValueError, match=r"no clip \(an empty batch: shape \(0, 4, 3, 32, 32\)\)"):
        build(name, "eager")(video(4, batch=0), interpolate_pos_encoding=interpolate)


# ------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------
def _linear_in_time(table: torch.Tensor, steps: int) -> torch.Tensor:
    """(T0, ...) -> (steps, ...) by the definition of linear resizing with align_corners=False: new index i reads
    source position (i + 0.5) * T0 / steps - 0.5, clamped, between its two neighbours."""
    t0 = table.shape[0]
    rows = []
    for i in range(steps):
        x = min(max((i + 0.5) * t0 / steps - 0.5, 0.0), t0 - 1)
        lo = math.floor(x)
        hi = min(lo + 1, t0 - 1)
        rows.append(table[lo] * (1 - (x - lo)) + table[hi] * (x - lo))
    return torch.stack(rows)


def test_resized_tables_against_independent_interpolations():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1, 3 * 2 * 4, 8, generator=g)  # (T0, h0, w0) = (3, 2, 4), hidden 8
    assert resize_positions(table, (3, 2, 4), (3, 2, 4)) is table
    grid = table[0].reshape(3, 2, 4, 8)
    for t1 in (3, 6, 12, 2):
        new = resize_positions(table, (3, 2, 4), (t1, 2, 4))[0].reshape(t1, 2, 4, 8)
        assert_close(new, _linear_in_time(grid, t1), 1e-6, name=f"time 3 -> {t1}")
    new = resize_positions(table, (3, 2, 4), (6, 5, 3))[0].reshape(6, 5, 3, 8)
    space = torch.stack([F.interpolate(grid[t].permute(2, 0, 1)[None], size=(5, 3), mode="bicubic",
                                       align_corners=False)[0].permute(1, 2, 0) for t in range(3)])
    assert_close(new, _linear_in_time(space, 6), 1e-5, name="space then time")
    constant = grid[:1].expand(3, -1, -1, -1).reshape(1, -1, 8)
    assert_close(resize_positions(constant, (3, 2, 4), (12, 2, 4))[0].reshape(12, 2, 4, 8),
                 grid[:1].expand(12, -1, -1, -1), 1e-6, name="constant over time stays so")


def _resized_state(model: torch.nn.Module, steps: int, side: int) -> dict:
    """``model``'s weights with its position tables resized for ``steps`` temporal indices of ``side`` x ``side``
    patches, computed independently of ``resize_positions`` (2-D bicubic per temporal slice, the linear formula)."""
    state = dict(model.state_dict())
    config = model.config
    t0 = config.num_frames // config.tubelet_size[0]

    def space(slices: torch.Tensor) -> torch.Tensor:  # (T, 2, 2, D) -> (T, side, side, D)
        return torch.stack([F.interpolate(s.permute(2, 0, 1)[None], size=(side, side), mode="bicubic",
                                          align_corners=False)[0].permute(1, 2, 0) for s in slices])

    emb = model.vivit.embeddings.position_embeddings
    if config.attention_type == "factorized_encoder":
        spatial = space(emb[0, 1:].reshape(1, 2, 2, -1)).reshape(1, side * side, -1)
        state["vivit.embeddings.position_embeddings"] = torch.cat((emb[:, :1], spatial), 1)
        temporal = model.vivit.temporal_position_embeddings  # (1, 1 + T', D)
        resized = _linear_in_time(temporal[0, 1:], steps)[None]
        state["vivit.temporal_position_embeddings"] = torch.cat((temporal[:, :1], resized), 1)
    else:
        grid = space(emb[0].reshape(t0, 2, 2, -1))
        state["vivit.embeddings.position_embeddings"] = _linear_in_time(grid, steps).reshape(1, -1, emb.shape[-1])
    return state


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ["tiny-fe", "tiny-fsa", "tiny-fdp"])
def test_factorised_models_at_another_grid_equal_a_model_built_for_it(name, attn):
    """Models 2, 3 and 4 at 8 frames of 48x48 (a 4 x 3 x 3 grid; trained 2 x 2 x 2) with interpolate_pos_encoding:
    the same as a model built for that grid whose tables are the resized ones (computed independently), on the
    same weights; at the trained size, interpolation changes nothing."""
    model = build(name, attn)
    big = build(name, attn, num_frames=8, image_size=48)
    big.load_state_dict(_resized_state(model, 4, 3))
    x = video(8, size=48)
    with torch.no_grad():
        assert_close(model(x, interpolate_pos_encoding=True).logits, big(x).logits, ATOL[attn], name="resized")
        assert torch.equal(model(video(4), interpolate_pos_encoding=True).logits, model(video(4)).logits)


# ------------------------------------------------------------------------------------------------
# longer clips
# ------------------------------------------------------------------------------------------------
def _constant_in_time(model: torch.nn.Module) -> None:
    """Models 3 and 4: one position per spatial location, the same at every temporal index."""
    table = model.vivit.embeddings.position_embeddings  # (1, T' * S, D)
    steps = model.config.num_frames // model.config.tubelet_size[0]
    with torch.no_grad():
        table.copy_(table.view(1, steps, -1, table.shape[-1])[:, :1].expand(-1, steps, -1, -1).reshape(table.shape))


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("name", ["tiny-fsa", "tiny-fdp"])
def test_a_clip_with_every_tubelet_slice_repeated_is_the_same_clip_to_models_3_and_4(name, attn):
    """Without a [CLS] and with positions constant over time, every key of a repeated clip is repeated k times
    (attention over keys all repeated equally is attention over the originals) and the mean pooling is unchanged:
    the logits at 2x and 4x the frames equal the trained-length ones."""
    model = build(name, attn)
    _constant_in_time(model)
    x = video(4)
    slices = x.view(2, 2, 2, 3, 32, 32)  # (batch, T', t, ...)
    with torch.no_grad():
        logits = model(x).logits
        for k in (2, 4):
            repeated = slices.repeat_interleave(k, dim=1).reshape(2, 4 * k, 3, 32, 32)
            long = model(repeated, interpolate_pos_encoding=True).logits
            assert_close(long, logits, ATOL[attn], name=f"{k}x the frames")
        # the property can fail: a clip that is not a repetition gives other logits
        other = torch.cat((x, video(4, seed=7)), 1)
        assert (model(other, interpolate_pos_encoding=True).logits - logits).abs().max() > 1e-2


@pytest.mark.triton
@pytest.mark.parametrize("name", ["model-1", "tiny-fe"])
@pytest.mark.parametrize("frames", [8, 16])
def test_models_1_and_2_on_our_kernels_match_eager_at_longer_clips(name, frames):
    """2x and 4x the trained frames (Model 1: 1 + 16 and 1 + 32 tokens; Model 2: 8 and 16 temporal indices),
    forward and every gradient."""
    eager, ours = build(name, "eager"), build(name, "triton")
    x, y = video(frames), torch.tensor([1, 2], device=DEVICE)
    with torch.no_grad():
        assert_close(ours(x, interpolate_pos_encoding=True).logits, eager(x, interpolate_pos_encoding=True).logits,
                     1e-4, name=f"{frames} frames")
    eager.train()(x, labels=y, interpolate_pos_encoding=True).loss.backward()
    ours.train()(x, labels=y, interpolate_pos_encoding=True).loss.backward()
    grads = dict(eager.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p.grad, grads[n].grad, 1e-4, rtol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("name", ["tiny-fe", "tiny-fsa", "tiny-fdp"])
def test_interpolation_drops_a_remainder_as_model_1_does(name):
    """7 frames of 40x36 with interpolate_pos_encoding: the 6 frames of 32x32 the tubelets read, as for Model 1."""
    model = build(name, "eager")
    x = video(7, size=40)[..., :36]
    with torch.no_grad():
        out = model(x, interpolate_pos_encoding=True).logits
        ref = model(x[:, :6, :, :32, :32].contiguous(), interpolate_pos_encoding=True).logits
    assert_close(out, ref, 1e-6, name="remainder dropped")


def test_factorised_training_and_another_clip_length_in_one_model():
    """Model 3 trained one step at 8 frames, then run at the trained 4: each forward reads its own grid."""
    model = build("tiny-fsa", "eager").train()
    model(video(8), labels=torch.tensor([0, 1], device=DEVICE), interpolate_pos_encoding=True).loss.backward()
    fresh = build("tiny-fsa", "eager").eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(video(4)).logits, fresh(video(4)).logits)


@pytest.mark.triton
def test_flash_attention_at_model_1s_long_sequences():
    """Model 1's sequence at 64 frames of 224x224 (1 + 32 x 196 = 6,273 tokens; on CUDA 12,545, its 128 frames):
    our flash attention forward and every input gradient against the reference, one head of 16 (in the
    interpreter that is what a test under a minute allows; 12,545 tokens passed the same check there in 108 s)."""
    from vivit_kernels.ops.attention import attention_ref, flash_attention

    tokens = 12545 if DEVICE.type == "cuda" else 6273
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, tokens, 3, 1, 16, generator=g)
    grad = torch.randn(1, tokens, 1, 16, generator=g).to(DEVICE)
    results = []
    for fn in (flash_attention, attention_ref):
        leaf = qkv.to(DEVICE).requires_grad_()
        out = fn(*leaf.unbind(2))
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    (out, dqkv), (ref, dref) = results
    assert_close(out, ref, 1e-4, name="out")
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(dqkv[:, :, i], dref[:, :, i], 1e-4, name=name)
