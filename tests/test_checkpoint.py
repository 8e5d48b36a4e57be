"""from_pretrained / save_pretrained: both key layouts, file kinds, prefix rules, named errors, safety."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import vivit_kernels as vk
from helpers import assert_close
from vivit_kernels.checkpoint import CheckpointError, to_v4_keys

transformers = pytest.importorskip("transformers")

CFG = dict(
    image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=32, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=48, num_labels=3,
)


def x_input() -> torch.Tensor:
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def hf(head: bool):
    config = transformers.VivitConfig(**CFG)
    model = (transformers.VivitForVideoClassification if head else transformers.VivitModel)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_random(head: bool):
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    model = cls(vk.VivitConfig(**CFG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layout", ["v4", "v5"])
@pytest.mark.parametrize("head", [False, True])
def test_save_pretrained_loads_in_transformers(head, layout, tmp_path):
    ours = ours_random(head)
    ours.save_pretrained(tmp_path, layout=layout)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    marker = "encoder.layer.0.attention.attention.query.weight" if layout == "v4" else "layers.0.attention.q_proj.weight"
    assert any(n.endswith(marker) for n in names)
    cls = transformers.VivitForVideoClassification if head else transformers.VivitModel
    theirs = cls.from_pretrained(tmp_path).eval()
    x = x_input()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    key = "logits" if head else "last_hidden_state"
    assert_close(a[key], b[key], 1e-5, name=key)
    if not head:
        assert_close(a.pooler_output, b.pooler_output, 1e-5, name="pooler_output")


def test_round_trip_both_layouts(tmp_path):
    ours = ours_random(True)
    for layout in ("v4", "v5"):
        ours.save_pretrained(tmp_path / layout, layout=layout)
        again = vk.VivitForVideoClassification.from_pretrained(tmp_path / layout)
        for (n, p), (m, q) in zip(ours.state_dict().items(), again.state_dict().items()):
            assert n == m and torch.equal(p, q), n
        assert again.config.to_dict() == ours.config.to_dict()


def test_state_dict_keys_are_transformers_keys():
    ours = vk.VivitForVideoClassification(vk.VivitConfig(**CFG))
    theirs = transformers.VivitForVideoClassification(transformers.VivitConfig(**CFG))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    # and transformers' own load_state_dict accepts ours (strict)
    theirs.load_state_dict(ours.state_dict())


def test_pytorch_model_bin_and_single_file(tmp_path):
    ref = hf(head=True)
    ref.save_pretrained(tmp_path / "st")
    torch.save(to_v4_keys(ref.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    from_bin = vk.VivitForVideoClassification.from_pretrained(tmp_path)  # directory with pytorch_model.bin
    from_file = vk.VivitForVideoClassification.from_pretrained(tmp_path / "st" / "model.safetensors")
    x = x_input()
    with torch.no_grad():
        expected = ref(x).logits
        assert_close(from_bin(x).logits, expected, 1e-5, name="bin")
        assert_close(from_file(x).logits, expected, 1e-5, name="single file")


def test_sharded_checkpoint(tmp_path):
    ref = hf(head=True)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = vk.VivitForVideoClassification.from_pretrained(tmp_path)
    x = x_input()
    with torch.no_grad():
        assert_close(ours(x).logits, ref(x).logits, 1e-5, name="sharded")


def test_base_model_from_classification_checkpoint(tmp_path):
    ref = hf(head=True)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised .*pooler\.dense\.weight"):
        base = vk.VivitModel.from_pretrained(tmp_path)
    x = x_input()
    with torch.no_grad():
        assert_close(base(x).last_hidden_state, ref.vivit(x).last_hidden_state, 1e-5, name="encoder")


def test_classification_from_base_checkpoint(tmp_path):
    ref = hf(head=False)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"newly initialised .*classifier\.weight"):
        model = vk.VivitForVideoClassification.from_pretrained(tmp_path)
    x = x_input()
    with torch.no_grad():
        assert_close(model.vivit(x).last_hidden_state, ref(x).last_hidden_state, 1e-5, name="encoder")


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    ref = hf(head=True)
    ref.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("vivit.encoder.layer.1.output.dense.bias")
    sd["vivit.encoder.layer.0.extra.weight"] = torch.zeros(2)
    sd["vivit.layernorm.weight"] = torch.zeros(7)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        vk.VivitForVideoClassification.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "missing keys: vivit.layers.1.mlp.fc2.bias" in msg
    assert "unexpected keys: vivit.layers.0.extra.weight" in msg
    assert "vivit.layernorm.weight: checkpoint (7,), model (32,)" in msg


def test_new_num_labels_needs_ignore_mismatched_sizes(tmp_path):
    hf(head=True).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(3, 32\), model \(10, 32\)"):
        vk.VivitForVideoClassification.from_pretrained(tmp_path, num_labels=10)
    with pytest.warns(UserWarning, match="classifier.weight"):
        model = vk.VivitForVideoClassification.from_pretrained(tmp_path, num_labels=10, ignore_mismatched_sizes=True)
    assert model.classifier.weight.shape == (10, 32)


@pytest.mark.parametrize("dtype, expected", [(torch.float16, torch.float16), ("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_dtype(dtype, expected, tmp_path):
    hf(head=True).save_pretrained(tmp_path)
    model = vk.VivitForVideoClassification.from_pretrained(tmp_path, dtype=dtype)
    assert all(p.dtype == expected for p in model.parameters())


def test_dtype_auto_reads_config(tmp_path):
    hf(head=True).to(torch.bfloat16).save_pretrained(tmp_path)
    model = vk.VivitForVideoClassification.from_pretrained(tmp_path, dtype="auto")
    assert model.dtype == torch.bfloat16


class Payload:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_payload_is_refused(tmp_path):
    hf(head=True).save_pretrained(tmp_path / "src")
    (tmp_path / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="could not be read as a weights-only checkpoint"):
        vk.VivitForVideoClassification.from_pretrained(tmp_path)


def test_interrupted_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    model = ours_random(True)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import safetensors.torch

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_missing_paths_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a weights file"):
        vk.VivitModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        vk.VivitModel.from_pretrained(tmp_path)
    ours_random(False).save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json beside"):
        vk.VivitModel.from_pretrained(tmp_path)


def test_config_json_round_trip_with_transformers(tmp_path):
    cfg = vk.VivitConfig(**CFG)
    cfg.to_json_file(tmp_path / "config.json")
    theirs = transformers.VivitConfig.from_json_file(str(tmp_path / "config.json"))
    assert theirs.tubelet_size == [2, 16, 16] and theirs.num_labels == 3 and theirs.hidden_act == "gelu_fast"
    transformers.VivitConfig(**CFG).to_json_file(str(tmp_path / "hf.json"))
    back = vk.VivitConfig.from_json_file(tmp_path / "hf.json")
    for field in ("image_size", "num_frames", "tubelet_size", "hidden_size", "layer_norm_eps", "num_labels", "id2label"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vivit"


def test_config_defaults_match_transformers():
    ours, theirs = vk.VivitConfig(), transformers.VivitConfig()
    for field in (
        "image_size", "num_frames", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
        "initializer_range", "layer_norm_eps", "qkv_bias", "pooler_output_size", "pooler_act", "num_labels",
    ):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert list(ours.tubelet_size) == list(theirs.tubelet_size)
