"""Our model against transformers' own ViViT, the external oracle: random-initialised transformers models of
several configurations, saved by transformers (the hub's 4.x key names) and in the 5.x layout, loaded into ours
for every backend and compared in fp32 (every hidden state and attention map, logits and loss)."""

from __future__ import annotations

import pytest
import torch
import transformers

import vivit_kernels as vk

from helpers import DEVICE, assert_close

ATOL = {"eager": 1e-5, "sdpa": 1e-5, "triton": 1e-4}

# Small configurations that vary every dimension the model has.
CONFIGS = {
    "square-pooler": dict(image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48, hidden_act="gelu_fast"),
    "nonsquare-gelu": dict(image_size=[32, 48], num_frames=6, tubelet_size=[3, 8, 16], hidden_size=48,
                           num_hidden_layers=2, num_attention_heads=3, intermediate_size=80, hidden_act="gelu",
                           num_labels=5),
    "tubelet1-gelu_new-nobias": dict(image_size=[16, 24], num_frames=2, tubelet_size=[1, 8, 8], hidden_size=40,
                                     num_hidden_layers=3, num_attention_heads=5, intermediate_size=56,
                                     hidden_act="gelu_new", qkv_bias=False, num_labels=1),
    "relu-4frames": dict(image_size=24, num_frames=8, tubelet_size=[4, 12, 12], hidden_size=24, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=30, hidden_act="relu", num_labels=3),
    "silu-2ch": dict(image_size=16, num_frames=4, tubelet_size=[2, 8, 8], num_channels=2, hidden_size=16,
                     num_hidden_layers=2, num_attention_heads=1, intermediate_size=20, hidden_act="silu"),
}
BACKENDS = ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)]


def hf_model(cfg: dict, head: bool):
    config = transformers.VivitConfig(**cfg)
    config._attn_implementation = "eager"
    cls = transformers.VivitForVideoClassification if head else transformers.VivitModel
    model = cls(config).eval()
    with torch.no_grad():  # non-trivial values everywhere (the default init leaves biases and tables at zero)
        for name, p in model.named_parameters():
            base = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    return model


def save_v5(model, directory) -> None:
    """A checkpoint in transformers 5.x's own key names (transformers itself writes the hub's 4.x names)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.to_json_file(str(directory / "config.json"))


def pixel_values(cfg: dict, batch: int = 2) -> torch.Tensor:
    size = cfg["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, cfg["num_frames"], cfg.get("num_channels", 3), h, w)


def labels_for(cfg: dict, batch: int = 2) -> torch.Tensor:
    n = cfg.get("num_labels", 2)
    return torch.randn(batch) if n == 1 else torch.randint(0, n, (batch,))


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("layout", ["transformers-save", "v5-names"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(name, layout, attn, tmp_path):
    cfg = CONFIGS[name]
    head = "num_labels" in cfg
    ref = hf_model(cfg, head)
    if layout == "transformers-save":
        ref.save_pretrained(tmp_path)
        from safetensors import safe_open

        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:  # the hub's names: what we must read
            assert any("encoder.layer.0.attention.attention.query." in k for k in f.keys())
    else:
        save_v5(ref, tmp_path)
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    ours = cls.from_pretrained(tmp_path, attn=attn).to(DEVICE)
    x = pixel_values(cfg)
    kwargs = {"labels": labels_for(cfg)} if head else {}
    with torch.no_grad():
        theirs = ref(x, output_hidden_states=True, output_attentions=True, **kwargs)
        # attentions make every backend use eager attention: once without them, so the backend's own is compared
        plain = ours(x.to(DEVICE), output_hidden_states=True, **{k: v.to(DEVICE) for k, v in kwargs.items()})
        full = ours(x.to(DEVICE), output_hidden_states=True, output_attentions=True,
                    **{k: v.to(DEVICE) for k, v in kwargs.items()})
    atol = ATOL[attn]
    for out in (plain, full):
        if head:
            assert_close(out.logits, theirs.logits, atol, name="logits")
            if theirs.loss is not None:
                assert_close(out.loss, theirs.loss, atol, name="loss")
        else:
            assert_close(out.last_hidden_state, theirs.last_hidden_state, atol, name="last_hidden_state")
            assert_close(out.pooler_output, theirs.pooler_output, atol, name="pooler_output")
        assert len(out.hidden_states) == len(theirs.hidden_states)
        for i, (a, b) in enumerate(zip(out.hidden_states, theirs.hidden_states, strict=True)):
            assert_close(a, b, atol, name=f"hidden_states[{i}]")
    assert len(full.attentions) == len(theirs.attentions)
    for i, (a, b) in enumerate(zip(full.attentions, theirs.attentions, strict=True)):
        assert_close(a, b, atol, name=f"attentions[{i}]")


@pytest.mark.parametrize("head", [False, True])
def test_tuple_output_order_matches_transformers(head, tmp_path):
    cfg = dict(CONFIGS["nonsquare-gelu"])
    ref = hf_model(cfg, head)
    ref.save_pretrained(tmp_path)
    ours = (vk.VivitForVideoClassification if head else vk.VivitModel).from_pretrained(tmp_path, attn="eager")
    x = pixel_values(cfg)
    kwargs = {"labels": labels_for(cfg)} if head else {}
    with torch.no_grad():
        theirs = ref(x, output_hidden_states=True, return_dict=False, **kwargs)
        mine = ours(x, output_hidden_states=True, return_dict=False, **kwargs)
    assert isinstance(mine, tuple) and len(mine) == len(theirs)
    for i, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if isinstance(b, tuple):
            assert len(a) == len(b)
            for j, (aa, bb) in enumerate(zip(a, b, strict=True)):
                assert_close(aa, bb, 1e-5, name=f"out[{i}][{j}]")
        else:
            assert_close(a, b, 1e-5, name=f"out[{i}]")
