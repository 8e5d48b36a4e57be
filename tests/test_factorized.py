"""ViViT Models 2, 3, 4 (factorised encoder, self-attention, dot-product): the modules against the paper's
definition written out in plain torch (``factorized_reference_forward``), our kernels (Triton; the interpreter here)
against it, forward and every gradient; saving, loading, transformers' Auto classes, LoRA, clip-size errors,
device-free costs."""

from __future__ import annotations

import pytest
import torch
import transformers

import vivit_kernels as vk
from vivit_kernels.models import VivitFactorizedConfig, factorized_reference_forward

from helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton


PRESETS = ["tiny-fe", "tiny-fsa", "tiny-fdp"]  # Models 2, 3, 4


def randomized(attn: str, seed: int = 0, preset: str = "tiny-fe", **overrides):
    torch.manual_seed(seed)
    model = vk.VivitFactorizedForVideoClassification(VivitFactorizedConfig.from_preset(preset, **overrides), attn=attn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.to(DEVICE)


def clip(config, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size, generator=g).to(DEVICE)


CASES = {"tiny-fe": {}, "fe-3-steps-2-temporal-layers": {"num_temporal_layers": 2, "num_frames": 6},
         "fe-gelu": {"hidden_act": "gelu"}, "tiny-fsa": {"preset": "tiny-fsa"},
         "fsa-3-steps": {"preset": "tiny-fsa", "num_frames": 6}, "tiny-fdp": {"preset": "tiny-fdp"},
         "fdp-3-steps-2-heads": {"preset": "tiny-fdp", "num_frames": 6, "num_attention_heads": 2}}


@pytest.mark.parametrize("case", list(CASES))
def test_modules_follow_the_paper_and_our_kernels_match_eager(case):
    eager = randomized("eager", **CASES[case])
    ours = randomized("triton", **CASES[case])
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


@pytest.mark.parametrize("preset", ["tiny-fsa", "tiny-fdp"])
def test_the_reference_tells_the_attention_axes_apart(preset):
    """The check above can fail: the same weights with every head over space (Model 3: both attentions; Model 4:
    no temporal half) give other logits than the paper's definition."""
    model = randomized("triton", preset=preset).eval()
    x = clip(model.config)
    with torch.no_grad():
        reference = factorized_reference_forward(model, x)
        for layer in model.vivit.layer:
            for m in layer.modules():
                if getattr(m, "_vivit_axes", None) is not None:
                    m._vivit_axes = (m._vivit_axes[0], model.config.num_attention_heads)
        assert (model(x).logits - reference).abs().max() > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_our_kernels_run_every_layer_and_the_patch_embedding(preset):
    from vivit_kernels.ops import _triton

    model = randomized("triton", preset=preset).eval()
    before = dict(_triton.LAUNCHES)
    with torch.no_grad():
        model(clip(model.config))
    launched = {k: v - before.get(k, 0) for k, v in _triton.LAUNCHES.items() if v - before.get(k, 0)}
    config = model.config
    # per block: Model 2's layers 7 launches; Model 3 two (LayerNorm, QKV, attention, output projection) + the MLP's
    # LayerNorm and 2 GEMMs; Model 4 one more attention launch than Model 1's 7 (the two head groups)
    per_layer = {"factorized_encoder": 7, "factorized_self_attention": 11, "factorized_dot_product": 8}[
        config.attention_type
    ]
    layers = config.num_hidden_layers + (
        config.num_temporal_layers if config.attention_type == "factorized_encoder" else 0
    )
    assert sum(launched.values()) >= per_layer * layers + 1, launched
    assert any("patch" in k for k in launched), launched


@pytest.mark.cpu_only
@pytest.mark.parametrize("preset", PRESETS)
def test_auto_and_sdpa_match_eager(preset):
    eager = randomized("eager", preset=preset).eval()
    x = clip(eager.config)
    with torch.no_grad():
        expected = eager(x).logits
        for attn in ("sdpa", "auto"):
            eager.set_attn(attn)
            assert eager.attn == attn
            assert_close(eager(x).logits, expected, 1e-5, name=attn)


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_and_transformers_auto_classes(tmp_path, preset):
    model = randomized("triton", preset=preset).eval()
    model.save_pretrained(tmp_path)
    x = clip(model.config)
    ours = vk.VivitFactorizedForVideoClassification.from_pretrained(tmp_path, attn="triton").to(DEVICE).eval()
    auto = transformers.AutoModelForVideoClassification.from_pretrained(tmp_path).to(DEVICE).eval()
    assert type(auto) is vk.VivitFactorizedForVideoClassification
    assert transformers.AutoConfig.from_pretrained(tmp_path).attention_type == model.config.attention_type
    base = transformers.AutoModel.from_pretrained(tmp_path)
    assert type(base) is vk.VivitFactorizedModel
    with torch.no_grad():
        expected = model(x).logits
        assert_close(ours(x).logits, expected, 1e-6, name="our from_pretrained")
        assert_close(auto(x).logits, expected, 1e-4, name="AutoModelForVideoClassification")


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_on_the_projections_trains_only_the_adapters(preset):
    peft = pytest.importorskip("peft")
    model = randomized("triton", preset=preset)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["classifier"]))
    vk.apply_vivit_kernels(lora, "triton")  # LoRA's wrappers run their own forward, the rest stays on our kernels
    x, y = clip(model.config), torch.tensor([0, 2], device=DEVICE)
    lora(pixel_values=x, labels=y).loss.backward()
    trained = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("preset", PRESETS)
def test_clip_size_and_attention_type_errors(preset):
    model = randomized("eager", preset=preset)
    with pytest.raises(ValueError, match="input has 6 frames, the model expects num_frames=4"):
        model(torch.randn(1, 6, 3, 32, 32, device=DEVICE))
    with pytest.raises(ValueError, match=r"input image size \(48\*32\) doesn't match the model \(32\*32\)"):
        model(torch.randn(1, 4, 3, 48, 32, device=DEVICE))
    with pytest.raises(ValueError, match="pixel_values has 1 channels in dim 2, expected num_channels=3"):
        model(torch.randn(1, 4, 1, 32, 32, device=DEVICE))
    with pytest.raises(ValueError, match="attention_type must be one of"):
        VivitFactorizedConfig(attention_type="divided")
    with pytest.raises(ValueError, match="num_attention_heads must be even, got 3"):
        VivitFactorizedConfig(attention_type="factorized_dot_product", hidden_size=48, num_attention_heads=3)


@pytest.mark.cpu_only
def test_device_free_costs_of_the_four_models_follow_the_paper_and_are_in_the_docs():
    """FakeTensorMode counts at ViViT-B/16x2, 32 frames of 224x224, batch 1: the parameter counts are the paper's
    Table 2 (the structure is the paper's), every factorised model does a fraction of Model 1's matmul FLOPs in
    the paper's ratio, none has a higher inference peak; Model 3 runs two attention blocks per layer, so it keeps
    more for backward. docs/model.md's table is this measurement (regenerated here, so it cannot go stale)."""
    from pathlib import Path

    from vivit_kernels.tools.measure import format_models_markdown, measure_models

    rows = measure_models()
    (_, paper1, _, _, m1), *factorised = rows
    for name, paper_gflops, paper_params, params, m in rows:
        assert abs(params / 1e6 - paper_params) < 0.15, (name, params)
        assert abs(m.flops / m1.flops - paper_gflops / paper1) < 0.01, (name, m.flops / 1e9)
        assert m.peak_live_bytes <= m1.peak_live_bytes, name
    m2, m3, m4 = (r[4] for r in factorised)
    assert m2.saved_bytes <= m1.saved_bytes < m4.saved_bytes < m3.saved_bytes
    docs = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    table = docs[docs.index("| model | params (M) |"):].split("\n\n")[0]
    assert table == format_models_markdown(rows).split("\n\n")[0], (
        "docs/model.md's table is stale: regenerate it with "
        "vivit_kernels.tools.measure.format_models_markdown(measure_models())"
    )


# ------------------------------------------------------------------------------------------------
# Initialisation from an image ViT (the paper's section 3.4)
# ------------------------------------------------------------------------------------------------
def small_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=16)
    vit = transformers.ViTModel(config, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return vit


def test_models_2_3_4_from_a_vit_compute_the_vit_per_frame_at_initialisation():
    """"average" inflation on a clip whose two frames per tubelet step are equal: Model 2's spatial [CLS] outputs
    are the ViT's [CLS] features of each step's frame; Model 3 (temporal attention adds nothing at initialisation)
    is the ViT's encoder over each frame's patch tokens; Model 4's blocks are the ViT's blocks."""
    from vivit_kernels.inflate import vivit_from_vit

    vit = small_vit()
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 2, 3, 32, 32, generator=g)  # (batch, steps, ...): one frame per tubelet step
    video = frames.repeat_interleave(2, dim=1)  # 4 frames, each step's two equal
    with torch.no_grad():
        per_frame = [vit(frames[:, s]).last_hidden_state for s in range(2)]  # ViT: [CLS] + 4 patches each, normed
        patches = [vit.embeddings(frames[:, s])[:, 1:] for s in range(2)]  # patch tokens + positions, no [CLS]
        for layer in vit.layers:
            patches = [layer(p) for p in patches]
        patches = torch.cat([vit.layernorm(p) for p in patches], 1)  # (batch, 2 * 4, hidden): (time, space) order

        fe = vivit_from_vit(vit, num_frames=4, inflate="average", attention_type="factorized_encoder", attn="triton")
        base = fe.vivit.to(DEVICE).eval()
        x = base.embeddings(video.to(DEVICE))
        for layer in base.spatial_layers:
            x = layer(x)
        cls = base.spatial_layernorm(x)[:, 0].view(2, 2, -1)
        for s in range(2):
            assert_close(cls[:, s], per_frame[s][:, 0].to(DEVICE), 1e-4, name=f"Model 2: step {s}'s [CLS]")

        fsa = vivit_from_vit(vit, num_frames=4, inflate="average", attention_type="factorized_self_attention",
                             attn="triton").to(DEVICE).eval()
        assert_close(fsa.vivit(video.to(DEVICE)).last_hidden_state, patches.to(DEVICE), 1e-4,
                     name="Model 3 = the ViT per frame")

        fdp = vivit_from_vit(vit, num_frames=4, inflate="average", attention_type="factorized_dot_product").eval()
        vit_state = vit.state_dict()
        for name, value in fdp.vivit.state_dict().items():
            if name.startswith("layer."):
                assert torch.equal(value, vit_state["layers." + name[len("layer."):]]), name
        assert fdp.config.attention_type == "factorized_dot_product" and fdp.config.num_labels == 2
    with pytest.raises(ValueError, match="attention_type must be None"):
        vivit_from_vit(vit, num_frames=4, attention_type="divided")
