"""Our eager and sdpa models against transformers' ViViT, the external oracle (fp32, max abs diff <= 1e-5)."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

import vivit_kernels as vk
from helpers import assert_close

transformers = pytest.importorskip("transformers")

ATOL = 1e-5

# Small configurations that vary every dimension the model has.
CONFIGS = {
    "square-pooler": dict(
        image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=48, hidden_act="gelu_fast",
    ),
    "nonsquare-gelu": dict(
        image_size=[32, 48], num_frames=6, tubelet_size=[3, 8, 16], hidden_size=48, num_hidden_layers=2,
        num_attention_heads=3, intermediate_size=80, hidden_act="gelu", num_labels=5,
    ),
    "tubelet1-gelu_new-nobias": dict(
        image_size=[16, 24], num_frames=2, tubelet_size=[1, 8, 8], hidden_size=40, num_hidden_layers=3,
        num_attention_heads=5, intermediate_size=56, hidden_act="gelu_new", qkv_bias=False, num_labels=1,
    ),
    "relu-4frames": dict(
        image_size=24, num_frames=8, tubelet_size=[4, 12, 12], hidden_size=24, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=30, hidden_act="relu", num_labels=3,
    ),
    "silu-2ch": dict(
        image_size=16, num_frames=4, tubelet_size=[2, 8, 8], num_channels=2, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=1, intermediate_size=20, hidden_act="silu",
    ),
}


def hf_model(cfg: dict, head: bool):
    config = transformers.VivitConfig(**cfg)
    config._attn_implementation = "eager"
    cls = transformers.VivitForVideoClassification if head else transformers.VivitModel
    model = cls(config).eval()
    randomize(model)
    return model


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial values everywhere (the default init leaves biases, cls and position tables at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))


def save_v5(model, directory) -> None:
    """A transformers 5.x-layout checkpoint (transformers itself writes the 4.x layout)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    model.config.to_json_file(str(directory / "config.json"))


def pixel_values(cfg: dict, batch: int = 2) -> torch.Tensor:
    size = cfg["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, cfg["num_frames"], cfg.get("num_channels", 3), h, w)


def compare(ours, theirs, head: bool, check_attentions: bool = True) -> None:
    if head:
        assert_close(ours.logits, theirs.logits, ATOL, name="logits")
        if theirs.loss is not None:
            assert_close(ours.loss, theirs.loss, ATOL, name="loss")
    else:
        assert_close(ours.last_hidden_state, theirs.last_hidden_state, ATOL, name="last_hidden_state")
        assert_close(ours.pooler_output, theirs.pooler_output, ATOL, name="pooler_output")
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a, b, ATOL, name=f"hidden_states[{i}]")
    if check_attentions:
        assert len(ours.attentions) == len(theirs.attentions)
        for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions)):
            assert_close(a, b, ATOL, name=f"attentions[{i}]")


def labels_for(cfg: dict, batch: int = 2) -> torch.Tensor:
    n = cfg.get("num_labels", 2)
    return torch.randn(batch) if n == 1 else torch.randint(0, n, (batch,))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("layout", ["v4", "v5"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, layout, attn, tmp_path):
    cfg = CONFIGS[name]
    head = "num_labels" in cfg
    ref = hf_model(cfg, head)
    if layout == "v4":
        ref.save_pretrained(tmp_path)
        keys = set(json.loads((tmp_path / "config.json").read_text()))
        assert "image_size" in keys
    else:
        save_v5(ref, tmp_path)
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    ours = cls.from_pretrained(tmp_path, attn=attn)
    x = pixel_values(cfg)
    kwargs = {"labels": labels_for(cfg)} if head else {}
    with torch.no_grad():
        theirs = ref(x, output_hidden_states=True, output_attentions=True, **kwargs)
        # attentions force the eager path; run once without them so the backend's own attention is compared
        plain = ours(x, output_hidden_states=True, **kwargs)
        with pytest.warns(UserWarning, match="falling back to eager") if attn != "eager" else nullcontext():
            full = ours(x, output_hidden_states=True, output_attentions=True, **kwargs)
    compare(plain, theirs, head, check_attentions=False)
    compare(full, theirs, head)


def _reset_warnings():
    from vivit_kernels import model as model_module

    model_module._warned.clear()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    _reset_warnings()
    yield


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask_shape", ["per-head", "per-layer"])
def test_head_mask_matches_transformers(attn, mask_shape, tmp_path):
    """transformers 5 dropped head_mask; its 4.x meaning (attention probabilities of head h times m) is checked
    with an exact oracle: scaling head h's probabilities by m scales its context by m, which is what scaling the
    head's input columns of o_proj by m does in an unmasked transformers model."""
    cfg = CONFIGS["square-pooler"]
    layers, heads, d = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    ref = hf_model(cfg, head=False)
    ref.save_pretrained(tmp_path)
    ours = vk.VivitModel.from_pretrained(tmp_path, attn=attn)
    if mask_shape == "per-head":
        mask = torch.tensor([1.0, 0.0, 0.5, 2.0])
        per_layer = mask.expand(layers, heads)
    else:
        mask = torch.tensor([[1.0, 0.0, 1.0, 0.25], [0.0, 1.0, 3.0, 1.0]])
        per_layer = mask
    with torch.no_grad():
        for i, layer in enumerate(ref.layers):
            scale = per_layer[i].repeat_interleave(d)
            layer.attention.o_proj.weight.mul_(scale)
    x = pixel_values(cfg)
    with torch.no_grad():
        theirs = ref(x, output_hidden_states=True, output_attentions=True)
        ours_out = ours(x, head_mask=mask, output_hidden_states=True, output_attentions=True)
    assert_close(ours_out.last_hidden_state, theirs.last_hidden_state, ATOL, name="last_hidden_state")
    assert_close(ours_out.pooler_output, theirs.pooler_output, ATOL, name="pooler_output")
    for i, (a, b) in enumerate(zip(ours_out.attentions, theirs.attentions)):
        # transformers 4.x returned the probabilities after the head mask was applied
        assert_close(a, b * per_layer[i].view(1, heads, 1, 1), ATOL, name=f"attentions[{i}]")


def test_head_mask_bad_shape():
    model = vk.VivitModel("tiny")
    x = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"head_mask must be shaped \(num_heads,\)=\(4,\)"):
        model(x, head_mask=torch.ones(3))


@pytest.mark.parametrize("head", [False, True])
def test_tuple_output_order_matches_transformers(head, tmp_path):
    cfg = dict(CONFIGS["nonsquare-gelu"])
    ref = hf_model(cfg, head)
    ref.save_pretrained(tmp_path)
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    ours = cls.from_pretrained(tmp_path)
    x = pixel_values(cfg)
    kwargs = {"labels": labels_for(cfg)} if head else {}
    with torch.no_grad():
        theirs = ref(x, output_hidden_states=True, return_dict=False, **kwargs)
        mine = ours(x, output_hidden_states=True, return_dict=False, **kwargs)
    assert isinstance(mine, tuple) and len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if isinstance(b, tuple):
            assert len(a) == len(b)
            for j, (aa, bb) in enumerate(zip(a, b)):
                assert_close(aa, bb, ATOL, name=f"out[{i}][{j}]")
        else:
            assert_close(a, b, ATOL, name=f"out[{i}]")


def test_interpolate_unchanged_grid_matches_transformers(tmp_path):
    """Where transformers' interpolation is right (square input, unchanged grid) we must equal it."""
    cfg = CONFIGS["square-pooler"]
    ref = hf_model(cfg, head=False)
    ref.save_pretrained(tmp_path)
    ours = vk.VivitModel.from_pretrained(tmp_path)
    x = pixel_values(cfg)
    with torch.no_grad():
        a = ours(x, interpolate_pos_encoding=True).last_hidden_state
        b = ref(x, interpolate_pos_encoding=True).last_hidden_state
    assert_close(a, b, ATOL, name="last_hidden_state")
