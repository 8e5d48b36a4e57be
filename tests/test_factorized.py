"""ViViT Model 2 (factorised encoder): the modules against the paper's definition written out in plain torch
(``factorized_reference_forward``), our kernels (Triton; the interpreter here) against eager, forward and every
gradient; saving, loading, transformers' Auto classes, LoRA, clip-size errors, device-free costs."""

from __future__ import annotations

import pytest
import torch
import transformers

import vivit_kernels as vk
from helpers import DEVICE, assert_close
from vivit_kernels.models import VivitFactorizedConfig, factorized_reference_forward

pytestmark = pytest.mark.triton


def randomized(attn: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = vk.VivitFactorizedForVideoClassification(VivitFactorizedConfig.from_preset("tiny-fe", **overrides), attn=attn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE)


def clip(config, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size, generator=g).to(DEVICE)


@pytest.mark.parametrize("overrides", [{}, {"num_temporal_layers": 2, "num_frames": 6}, {"hidden_act": "gelu"}],
                         ids=["tiny-fe", "3-steps-2-temporal-layers", "gelu"])
def test_modules_follow_the_paper_and_our_kernels_match_eager(overrides):
    eager = randomized("eager", **overrides)
    ours = randomized("triton", **overrides)
    ours.load_state_dict(eager.state_dict())
    x = clip(eager.config)
    y = torch.tensor([1, 3], device=DEVICE)
    with torch.no_grad():
        reference = factorized_reference_forward(eager.eval(), x)
        assert_close(eager(x).logits, reference, 1e-5, name="eager modules vs the paper's definition")
        assert_close(ours.eval()(x).logits, reference, 1e-4, name="our kernels vs the paper's definition")
    eager.train()(x, labels=y).loss.backward()
    ours.train()(x, labels=y).loss.backward()
    grads = dict(eager.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, grads[name].grad, 1e-4, rtol=1e-4, name=f"grad {name}")


def test_our_kernels_run_every_layer_and_the_patch_embedding():
    from vivit_kernels.ops import _triton

    model = randomized("triton").eval()
    before = dict(_triton.LAUNCHES)
    with torch.no_grad():
        model(clip(model.config))
    launched = {k: v - before.get(k, 0) for k, v in _triton.LAUNCHES.items() if v - before.get(k, 0)}
    layers = model.config.num_hidden_layers + model.config.num_temporal_layers
    assert sum(launched.values()) >= 7 * layers + 1, launched
    assert any("patch" in k for k in launched), launched


@pytest.mark.cpu_only
def test_auto_and_sdpa_match_eager():
    eager = randomized("eager").eval()
    x = clip(eager.config)
    with torch.no_grad():
        expected = eager(x).logits
        for attn in ("sdpa", "auto"):
            eager.set_attn(attn)
            assert eager.attn == attn
            assert_close(eager(x).logits, expected, 1e-5, name=attn)


def test_save_load_and_transformers_auto_classes(tmp_path):
    model = randomized("triton").eval()
    model.save_pretrained(tmp_path)
    x = clip(model.config)
    ours = vk.VivitFactorizedForVideoClassification.from_pretrained(tmp_path, attn="triton").to(DEVICE).eval()
    auto = transformers.AutoModelForVideoClassification.from_pretrained(tmp_path).to(DEVICE).eval()
    assert type(auto) is vk.VivitFactorizedForVideoClassification
    assert transformers.AutoConfig.from_pretrained(tmp_path).num_temporal_layers == 1
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(base) is vk.VivitFactorizedModel
    with torch.no_grad():
        expected = model(x).logits
        assert_close(ours(x).logits, expected, 1e-6, name="our from_pretrained")
        assert_close(auto(x).logits, expected, 1e-4, name="AutoModelForVideoClassification")


def test_lora_on_the_projections_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    model = randomized("triton")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["classifier"]))
    vk.apply_vivit_kernels(lora, "triton")  # LoRA's wrappers run their own forward, the rest stays on our kernels
    x, y = clip(model.config), torch.tensor([0, 2], device=DEVICE)
    lora(pixel_values=x, labels=y).loss.backward()
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)


def test_clip_size_and_attention_type_errors():
    model = randomized("eager")
    with pytest.raises(ValueError, match="built for 4 frames of 3x32x32"):
        model(torch.randn(1, 6, 3, 32, 32, device=DEVICE))
    with pytest.raises(ValueError, match="interpolate_pos_encoding is not supported"):
        model(clip(model.config), interpolate_pos_encoding=True)
    with pytest.raises(NotImplementedError, match="Model 3"):
        vk.VivitFactorizedModel(VivitFactorizedConfig(attention_type="factorized_self_attention"))
    with pytest.raises(NotImplementedError, match="Model 4"):
        vk.VivitFactorizedModel(VivitFactorizedConfig(attention_type="factorized_dot_product"))
    with pytest.raises(ValueError, match="attention_type must be one of"):
        VivitFactorizedConfig(attention_type="divided")


@pytest.mark.cpu_only
def test_device_free_costs_at_vivit_b_against_model_1():
    """FakeTensorMode counts at ViViT-B/16x2, 32 frames of 224x224, batch 1: Model 2 does a fraction of Model 1's
    matmul FLOPs (its attention runs over 197 and 17 tokens, not 3,137) and keeps less for backward."""
    from vivit_kernels.measure import measure

    m1 = measure("triton", "vivit-b-16x2", 1)
    m2 = measure("triton", VivitFactorizedConfig.from_preset("vivit-b-16x2-fe"), 1)
    assert m2.flops < 0.75 * m1.flops, (m2.flops / 1e9, m1.flops / 1e9)
    assert m2.saved_bytes < m1.saved_bytes and m2.peak_live_bytes <= m1.peak_live_bytes
