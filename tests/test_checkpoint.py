"""Checkpoints: transformers loads and saves them (both key layouts in the wild, sharding, .bin, dtype, hub
arguments, labels); what we add on top is checked here: errors that name the file, refusal of pickled code,
and a save that an interruption cannot leave half-written. Loading and saving are CPU work on purpose; the
loaded models then run on the test device."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

import vivit_kernels as vk

from helpers import DEVICE, assert_close

CFG = dict(image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=48, num_labels=3)


def randomized(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours(head: bool = True, **overrides):
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    return randomized(cls(vk.VivitConfig(**{**CFG, **overrides}), attn="eager")).eval()


def theirs(head: bool = True):
    cls = transformers.VivitForVideoClassification if head else transformers.VivitModel
    return randomized(cls(transformers.VivitConfig(**CFG))).eval()


def same_outputs(a, b) -> None:
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        ya, yb = a.to(DEVICE)(x.to(DEVICE)), b.to(DEVICE)(x.to(DEVICE))
    key = "logits" if hasattr(ya, "logits") else "last_hidden_state"
    assert_close(ya[key], yb[key], 1e-5, name=key)


@pytest.mark.parametrize("head", [False, True])
def test_round_trips_with_transformers(head, tmp_path):
    """Our save loads in transformers, transformers' save (the hub's 4.x names) loads in ours, outputs equal."""
    model = ours(head)
    model.save_pretrained(tmp_path / "ours")
    same_outputs(
        model,
        (transformers.VivitForVideoClassification if head else transformers.VivitModel).from_pretrained(
            tmp_path / "ours"
        ),
    )
    ref = theirs(head)
    ref.save_pretrained(tmp_path / "theirs")
    same_outputs(ref, (vk.VivitForVideoClassification if head else vk.VivitModel).from_pretrained(tmp_path / "theirs"))


def test_saved_names_are_the_models_own_unless_asked_for_the_hubs(tmp_path):
    from safetensors import safe_open

    model = ours()
    model.save_pretrained(tmp_path / "own")
    with safe_open(str(tmp_path / "own" / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())  # what Trainer's resume reloads with load_state_dict
    model.save_pretrained(tmp_path / "hub", save_original_format=True)
    with safe_open(str(tmp_path / "hub" / "model.safetensors"), "pt") as f:
        assert any(".encoder.layer.0.attention.attention.query." in k for k in f.keys())
    same_outputs(model, transformers.VivitForVideoClassification.from_pretrained(tmp_path / "hub"))


def test_sharded_and_bin_checkpoints(tmp_path):
    model = ours()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    same_outputs(model, vk.VivitForVideoClassification.from_pretrained(tmp_path / "sharded"))
    torch.save(model.state_dict(), (tmp_path / "model.bin"))
    (tmp_path / "bin").mkdir()
    os.replace(tmp_path / "model.bin", tmp_path / "bin" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "bin")
    same_outputs(model, vk.VivitForVideoClassification.from_pretrained(tmp_path / "bin"))


def test_resaving_fewer_shards_removes_the_old_ones(tmp_path):
    model = ours()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    same_outputs(model, vk.VivitForVideoClassification.from_pretrained(tmp_path))


@pytest.mark.parametrize("kwarg", ["dtype", "torch_dtype"])
def test_dtype_is_honoured(kwarg, tmp_path):
    ours().save_pretrained(tmp_path)
    model = vk.VivitForVideoClassification.from_pretrained(tmp_path, **{kwarg: torch.bfloat16})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_hub_style_arguments_and_loading_info(tmp_path):
    ours().save_pretrained(tmp_path)
    model, info = vk.VivitForVideoClassification.from_pretrained(tmp_path, local_files_only=True, revision="main",
                                                                 output_loading_info=True, attn="eager")
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert model.attn == "eager"
    assert not hasattr(model.config, "local_files_only") and not hasattr(model.config, "revision")


def test_fine_tuning_tutorial_labels(tmp_path):
    """transformers' fine-tuning recipe: new id2label / label2id and ignore_mismatched_sizes re-initialise the head."""
    ours().save_pretrained(tmp_path)
    id2label = {0: "walk", 1: "run", 2: "jump", 3: "swim", 4: "sit"}
    model = vk.VivitForVideoClassification.from_pretrained(
        tmp_path, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 5 and model.classifier.out_features == 5
    assert model.config.id2label[4] == "sit"
    with pytest.raises(RuntimeError, match="size mismatch|mismatch"):
        vk.VivitForVideoClassification.from_pretrained(tmp_path, num_labels=5)


def test_base_model_from_classification_checkpoint_and_back(tmp_path):
    head = ours(True)
    head.save_pretrained(tmp_path / "head")
    base = vk.VivitModel.from_pretrained(tmp_path / "head")
    for name, p in base.named_parameters():
        if not name.startswith("pooler."):
            assert torch.equal(p, head.vivit.get_parameter(name)), name
    base.save_pretrained(tmp_path / "base")
    again = vk.VivitForVideoClassification.from_pretrained(tmp_path / "base")
    assert torch.equal(again.vivit.layers[0].attention.q_proj.weight, head.vivit.layers[0].attention.q_proj.weight)


# ------------------------------------------------------------------------------------------------
# what we add: named errors, no pickled code, atomic saves
# ------------------------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def _config_only(tmp_path):
    ours().config.save_pretrained(tmp_path)


def test_pickle_payload_is_refused_without_offering_weights_only_false(tmp_path, capsys):
    _config_only(tmp_path)
    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(vk.CheckpointError) as e:
        vk.VivitForVideoClassification.from_pretrained(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "pytorch_model.bin") in message and "refused" in message and "print" in message
    assert "weights_only=False" not in message and "weights_only` set to `False`" not in message
    assert "arbitrary code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"\xff" * 100, b"", b'{"not": "safetensors"}'])
def test_corrupt_safetensors_names_the_file(content, tmp_path):
    _config_only(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(vk.CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        vk.VivitForVideoClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config, match",
    [
        ("[1, 2]", r"config\.json must hold a JSON object of config fields, got a list"),
        ("{not json", r"config\.json is not valid JSON"),
        (
            json.dumps({**CFG, "model_type": "vivit", "hidden_size": "sixty-four"}),
            r"config\.json: .*hidden_size.*sixty-four",
        ),
    ],
)
def test_bad_config_json_names_the_file(config, match, tmp_path):
    ours().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(vk.CheckpointError, match=match):
        vk.VivitForVideoClassification.from_pretrained(tmp_path)


def test_missing_local_paths_do_not_ask_the_hub(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory .*nope"):
        vk.VivitModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory ./not-here"):
        vk.VivitModel.from_pretrained("./not-here")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(vk.CheckpointError, match="is a file; from_pretrained takes a checkpoint directory"):
        vk.VivitModel.from_pretrained(tmp_path / "weights.safetensors")


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = ours()
    model.save_pretrained(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    import transformers.modeling_utils

    def broken_save(tensors, filename, metadata=None):  # killed half-way through writing the weights
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken_save)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before
    assert not [f for f in os.listdir(tmp_path.parent) if f.startswith(f".{tmp_path.name}.")]  # no temp dir left


@pytest.mark.parametrize("given", [None, "someone/their-repo"])
def test_push_to_hub_names_the_repo_after_the_save_directory(given, tmp_path, monkeypatch):
    """save_pretrained(path, push_to_hub=True) asks the hub for the repo transformers would (the directory's name,
    or the repo_id given), not for the temporary directory the files are written into first. The hub cannot be
    reached here: the repo creation is where the call stops."""
    import transformers.modeling_utils

    asked = []

    class NoHub:
        def create_repo(self, repo_id, **kwargs):
            asked.append(repo_id)
            raise ConnectionError("no hub here")

    monkeypatch.setattr(transformers.modeling_utils, "hf_api", lambda: NoHub())
    extra = {} if given is None else {"repo_id": given}
    with pytest.raises(ConnectionError):
        ours().save_pretrained(tmp_path / "myrepo", push_to_hub=True, **extra)
    assert asked == [given or "myrepo"]
