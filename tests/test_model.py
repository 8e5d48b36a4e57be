"""The reference model on its own: inputs, position interpolation, training features, dtypes, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vivit_kernels as vk
from helpers import assert_close


def tiny(**overrides) -> vk.VivitConfig:
    return vk.VivitConfig.from_preset("tiny", **overrides)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((4, 3, 32, 32), torch.float32, r"5-D \(batch, frames, channels, height, width\), got shape \(4, 3, 32, 32\)"),
        ((1, 4, 1, 32, 32), torch.float32, r"1 channels in dim 2, expected num_channels=3"),
        ((1, 4, 32, 32, 3), torch.float32, r"32 channels in dim 2"),
        ((1, 4, 3, 48, 32), torch.float32, r"input image size \(48\*32\) doesn't match the model \(32\*32\)"),
        ((1, 6, 3, 32, 32), torch.float32, r"6 frames, the model expects num_frames=4"),
        ((1, 4, 3, 32, 32), torch.uint8, r"floating-point tensor, got dtype torch.uint8"),
    ],
)
def test_bad_input_errors(shape, dtype, match):
    model = vk.VivitModel("tiny")
    x = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize("shape", [(1, 5, 3, 32, 32), (1, 4, 3, 40, 32), (1, 4, 3, 32, 8)])
def test_interpolation_needs_tubelet_multiples(shape):
    model = vk.VivitModel("tiny")
    with pytest.raises(ValueError, match=r"positive multiples of the tubelet size \[2, 16, 16\]"):
        model(torch.zeros(shape), interpolate_pos_encoding=True)


def test_not_a_tensor():
    with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
        vk.VivitModel("tiny")([[1.0]])


def test_unknown_attn_and_activation():
    with pytest.raises(ValueError, match=r"unknown attn 'flash'; expected one of eager, sdpa, triton"):
        vk.VivitModel("tiny", attn="flash")
    with pytest.raises(ValueError, match=r"unsupported activation 'gelu_bogus'"):
        vk.VivitModel(tiny(hidden_act="gelu_bogus"))


def test_config_validation():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"):
        vk.VivitConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        vk.VivitConfig.from_preset("huge")


def test_pixel_values_cast_to_model_dtype():
    model = vk.VivitModel("tiny").to(torch.bfloat16)
    out = model(torch.randn(1, 4, 3, 32, 32))
    assert out.last_hidden_state.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# position interpolation
# ------------------------------------------------------------------------------------------------
def test_position_table_interpolation_is_per_frame_bicubic():
    model = randomized(vk.VivitModel(tiny(image_size=[32, 48], num_frames=4)))  # grid (2, 2, 3)
    emb = model.embeddings
    table = emb.position_embeddings
    new = emb.position_table((2, 5, 4))
    assert new.shape == (1, 1 + 2 * 5 * 4, 64)
    assert torch.equal(new[:, 0], table[:, 0])
    old = table[0, 1:].reshape(2, 2, 3, 64)
    got = new[0, 1:].reshape(2, 5, 4, 64)
    for t in range(2):  # each frame slice is the 2-D bicubic resize of the same slice of the table
        frame = old[t].permute(2, 0, 1)[None]
        expected = F.interpolate(frame, size=(5, 4), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
        assert_close(got[t], expected, 1e-6, name=f"frame {t}")


def test_position_table_interpolation_in_time():
    model = randomized(vk.VivitModel(tiny(num_frames=8)))  # grid (4, 2, 2)
    emb = model.embeddings
    old = emb.position_embeddings[0, 1:].reshape(4, 2, 2, 64)
    new = emb.position_table((2, 2, 2))[0, 1:].reshape(2, 2, 2, 64)
    # linear, align_corners=False, 4 -> 2: each new slice is the mean of two old ones
    assert_close(new[0], (old[0] + old[1]) / 2, 1e-6, name="t=0")
    assert_close(new[1], (old[2] + old[3]) / 2, 1e-6, name="t=1")
    assert torch.equal(emb.position_table((4, 2, 2)), emb.position_embeddings)


@pytest.mark.parametrize("frames, height, width", [(4, 48, 64), (4, 16, 80), (8, 32, 32), (2, 32, 16)])
def test_interpolated_forward_runs(frames, height, width):
    model = vk.VivitModel("tiny").eval()
    out = model(torch.randn(2, frames, 3, height, width), interpolate_pos_encoding=True)
    tokens = 1 + (frames // 2) * (height // 16) * (width // 16)
    assert out.last_hidden_state.shape == (2, tokens, 64)
    assert torch.isfinite(out.last_hidden_state).all()


# ------------------------------------------------------------------------------------------------
# training features
# ------------------------------------------------------------------------------------------------
def _grads(model, x, labels):
    model.zero_grad()
    model(x, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gradient_checkpointing_same_gradients(attn):
    model = randomized(vk.VivitForVideoClassification("tiny", attn=attn)).train()
    x, labels = torch.randn(2, 4, 3, 32, 32), torch.tensor([1, 7])
    plain = _grads(model, x, labels)
    model.gradient_checkpointing_enable()
    assert model.vivit.gradient_checkpointing
    ckpt = _grads(model, x, labels)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert_close(ckpt[name], plain[name], 1e-6, name=name)


def test_dropout_active_only_in_training():
    cfg = tiny(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = randomized(vk.VivitModel(cfg))
    x = torch.randn(1, 4, 3, 32, 32)
    model.train()
    a, b = model(x).last_hidden_state, model(x).last_hidden_state
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(dtype):
    model = randomized(vk.VivitModel("tiny")).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    ref = model(x).last_hidden_state
    low = model.to(dtype)(x.to(dtype)).last_hidden_state
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.1


def test_loss_kinds():
    x = torch.randn(2, 4, 3, 32, 32)
    reg = vk.VivitForVideoClassification(tiny(num_labels=1))
    out = reg(x, labels=torch.tensor([0.5, -1.0]))
    assert_close(out.loss, F.mse_loss(out.logits.squeeze(), torch.tensor([0.5, -1.0])), 1e-7, name="mse")
    multi = vk.VivitForVideoClassification(tiny(num_labels=3))
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = multi(x, labels=target)
    assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, target), 1e-7, name="bce")


def test_set_attn_switches_backend():
    model = randomized(vk.VivitForVideoClassification("tiny")).eval()
    x = torch.randn(1, 4, 3, 32, 32)
    a = model(x).logits
    assert model.set_attn("sdpa") is model and model.attn == "sdpa"
    assert_close(model(x).logits, a, 1e-5, name="sdpa vs eager")


def test_full_size_vivit_b_forward():
    """The hub architecture (ViViT-B/16x2, 3136 tubelets + CLS) builds and runs."""
    model = vk.VivitModel("vivit-b-16x2", attn="sdpa").eval()
    d, f = 768, 3072
    embeddings = d * 3 * 2 * 16 * 16 + d + d + 3137 * d
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert sum(p.numel() for p in model.parameters()) == embeddings + 12 * layer + 2 * d + d * d + d
    with torch.no_grad():
        out = model(torch.randn(1, 32, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, 3137, 768)
    assert out.pooler_output.shape == (1, 768)
    assert torch.isfinite(out.last_hidden_state).all()


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compile_fullgraph(attn):
    torch._dynamo.reset()
    model = randomized(vk.VivitForVideoClassification("tiny", attn=attn)).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    expected = model(x).logits
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x).logits, expected, 1e-5, name="compiled logits")
