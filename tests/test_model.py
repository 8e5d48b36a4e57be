"""Our ViViT is transformers' ViViT: the same classes, module tree, state dict and config, with our additions
(attn backends, head_mask, (T', h, w) position interpolation, inputs that are not tubelet multiples, clear
input errors). Written by us after what transformers' ViViT model tests and its common model-test mixin check
(shapes, outputs, config round trips, hidden states and attentions, losses per problem type, save / load, tuple
vs dict outputs, batching equivalence), run for every backend on the test device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

import vivit_kernels as vk

from helpers import DEVICE, assert_close

BACKENDS = ["eager", "sdpa", pytest.param("triton", marks=pytest.mark.triton)]
ATOL = {"eager": 1e-5, "sdpa": 1e-5, "triton": 1e-4}  # fp32; the Triton kernels sum in another order


def tiny(**overrides) -> vk.VivitConfig:
    return vk.VivitConfig.from_preset("tiny", **overrides)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (the default init leaves biases, cls and position tables at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.add_((0.1 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return model


def pixels(cfg, batch: int = 2, seed: int = 1) -> torch.Tensor:
    h, w = vk.presets.image_hw(cfg)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_frames, cfg.num_channels, h, w, generator=g).to(DEVICE)


def make(cls, cfg, attn: str):
    return randomized(cls(cfg, attn=attn)).to(DEVICE).eval()


# ------------------------------------------------------------------------------------------------
# transformers' model, exactly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours, theirs", [(vk.VivitModel, transformers.VivitModel),
                                          (vk.VivitForVideoClassification, transformers.VivitForVideoClassification)])
@pytest.mark.parametrize("attn", ["eager", "sdpa", "triton"])
def test_same_classes_modules_and_state_dict_as_transformers(ours, theirs, attn):
    model = ours(tiny(), attn=attn)
    reference = theirs(transformers.VivitConfig(**tiny().to_dict()))
    assert isinstance(model, theirs) and isinstance(model, transformers.PreTrainedModel)
    assert isinstance(model.config, transformers.VivitConfig)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in reference.named_modules()]
    for (n, a), (m, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert n == m and a.shape == b.shape and a.dtype == b.dtype
    for module in model.modules():  # no state-dict hooks of ours: the state dict is transformers' exactly
        assert not module._state_dict_hooks and not module._load_state_dict_pre_hooks
    for name, module in model.named_modules():  # our kernel classes are subclasses of transformers' / torch's
        assert isinstance(module, type(dict(reference.named_modules())[name]))
    reference.load_state_dict(model.state_dict())
    model.load_state_dict(reference.state_dict())


def test_presets_and_config():
    cfg = vk.VivitConfig.from_preset("vivit-b-16x2")
    assert cfg.num_labels == 400 and cfg.hidden_size == 768 and list(cfg.tubelet_size) == [2, 16, 16]
    assert vk.presets.num_tokens(cfg) == 3137
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        vk.VivitConfig.from_preset("huge")
    for field in ("image_size", "num_frames", "hidden_size", "hidden_act", "layer_norm_eps", "qkv_bias", "pooler_act"):
        assert getattr(vk.VivitConfig(), field) == getattr(transformers.VivitConfig(), field), field
    with pytest.raises(TypeError, match="config must be a VivitConfig or a preset name"):
        vk.VivitModel(42)


def test_config_round_trips(tmp_path):
    cfg = tiny(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}, hidden_act="gelu")
    back = vk.VivitConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    cfg.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs) is transformers.VivitConfig
    assert {k: v for k, v in theirs.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in cfg.to_dict().items() if k != "_name_or_path"}
    assert theirs.num_labels == 3 and theirs.id2label[2] == "c"
    cfg.num_labels = 5  # transformers rebuilds id2label; our save then loads again (was a stale-label error)
    model = vk.VivitForVideoClassification(cfg)
    model.save_pretrained(tmp_path / "m")
    assert vk.VivitForVideoClassification.from_pretrained(tmp_path / "m").config.num_labels == 5


def test_default_attn_is_transformers_choice_and_set_attn():
    model = vk.VivitForVideoClassification("tiny")
    assert model.attn == model.config._attn_implementation == "sdpa"
    assert model.set_attn("eager") is model and model.attn == "eager" and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown attn 'flash'; expected one of eager, sdpa, triton"):
        model.set_attn("flash")


# ------------------------------------------------------------------------------------------------
# what the common model tests check, for every backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
def test_outputs_hidden_states_and_attentions(attn):
    cfg = tiny()
    model = make(vk.VivitModel, cfg, attn)
    x = pixels(cfg)
    n = vk.presets.num_tokens(cfg)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
    assert out.last_hidden_state.shape == (2, n, 64) and out.pooler_output.shape == (2, 64)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert all(h.shape == (2, n, 64) for h in out.hidden_states)
    assert len(out.attentions) == cfg.num_hidden_layers
    for a in out.attentions:
        assert a.shape == (2, cfg.num_attention_heads, n, n)
        assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), 1e-5, name="probabilities sum to 1")
    # config flags work like the arguments (compared with the same call made with the argument: the call above also
    # collects attentions, and its different allocations once put transformers' own fp32 eager path 6e-5 off)
    model.config.output_hidden_states = True
    with torch.no_grad():
        flagged = model(x)
    model.config.output_hidden_states = False
    with torch.no_grad():
        argued = model(x, output_hidden_states=True)
    assert len(flagged.hidden_states) == cfg.num_hidden_layers + 1
    for a, b in zip(flagged.hidden_states, argued.hidden_states, strict=True):
        assert_close(a, b, ATOL[attn], name="flag vs argument")
    assert_close(out.last_hidden_state, argued.last_hidden_state, max(2e-4, 10 * ATOL[attn]),
                 name="with and without attentions")


@pytest.mark.parametrize("attn", BACKENDS)
def test_tuple_outputs_equal_dict_outputs(attn):
    cfg = tiny()
    model = make(vk.VivitForVideoClassification, cfg, attn)
    x, labels = pixels(cfg), torch.tensor([1, 7], device=DEVICE)
    with torch.no_grad():
        d = model(x, labels, output_hidden_states=True)
        t = model(x, labels, output_hidden_states=True, return_dict=False)
        model.config.return_dict = False
        t2 = model(x, labels)
        model.config.return_dict = True
    assert isinstance(t, tuple) and isinstance(t2, tuple)
    assert_close(t[0], d.loss, 1e-6, name="loss")
    assert_close(t[1], d.logits, 1e-6, name="logits")
    assert len(t[2]) == len(d.hidden_states)
    assert_close(t2[1], d.logits, 1e-6, name="logits (config.return_dict=False)")


@pytest.mark.parametrize("attn", BACKENDS)
def test_batching_equivalence(attn):
    cfg = tiny()
    model = make(vk.VivitForVideoClassification, cfg, attn)
    x = pixels(cfg, batch=3)
    with torch.no_grad():
        batched = model(x).logits
        single = torch.cat([model(x[i : i + 1]).logits for i in range(3)])
    assert_close(batched, single, ATOL[attn], name="batch vs one by one")


@pytest.mark.parametrize("attn", BACKENDS)
def test_losses_per_problem_type(attn):
    x = pixels(tiny())
    reg = make(vk.VivitForVideoClassification, tiny(num_labels=1), attn)
    out = reg(x, labels=torch.tensor([0.5, -1.0], device=DEVICE))
    assert_close(out.loss, F.mse_loss(out.logits.squeeze(), torch.tensor([0.5, -1.0], device=DEVICE)), 1e-6, name="mse")
    single = make(vk.VivitForVideoClassification, tiny(num_labels=3), attn)
    target = torch.tensor([2, 0], device=DEVICE)
    out = single(x, target)  # labels positional: transformers 5's order
    assert_close(out.loss, F.cross_entropy(out.logits, target), 1e-6, name="cross-entropy")
    multi = make(vk.VivitForVideoClassification, tiny(num_labels=3, problem_type="multi_label_classification"), attn)
    soft = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], device=DEVICE)
    out = multi(x, labels=soft)
    assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, soft), 1e-6, name="bce")


def test_positional_labels_are_labels_when_batch_equals_heads():
    cfg = tiny()  # 4 heads
    model = make(vk.VivitForVideoClassification, cfg, "eager")
    x, labels = pixels(cfg, batch=4), torch.tensor([1, 2, 3, 4], device=DEVICE)
    out = model(x, labels)
    assert out.loss is not None
    assert_close(out.loss, F.cross_entropy(out.logits, labels), 1e-6, name="loss")
    with pytest.raises(TypeError):
        model(x, labels, False, torch.ones(4))  # head_mask is keyword-only


@pytest.mark.parametrize("attn", BACKENDS)
def test_save_load_round_trip(attn, tmp_path):
    cfg = tiny()
    model = make(vk.VivitForVideoClassification, cfg, attn)
    model.save_pretrained(tmp_path)
    loaded = vk.VivitForVideoClassification.from_pretrained(tmp_path, attn=attn).to(DEVICE).eval()
    assert loaded.attn == attn
    x = pixels(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    theirs = transformers.VivitForVideoClassification.from_pretrained(tmp_path).to(DEVICE).eval()
    with torch.no_grad():
        assert_close(theirs(x).logits, model(x).logits, ATOL[attn], name="transformers loads our save")


# ------------------------------------------------------------------------------------------------
# head_mask (the seed's argument; transformers 5 removed it)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("mask_shape", ["per-head", "per-layer"])
def test_head_mask_oracle(attn, mask_shape):
    """transformers 4.x's meaning (head h's attention probabilities times m) checked with an exact oracle:
    scaling head h's probabilities by m scales its context by m, which is what scaling the head's input columns of
    o_proj by m does in an unmasked model."""
    cfg = tiny()
    layers, heads, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    ours = make(vk.VivitModel, cfg, attn)
    oracle = vk.VivitModel(cfg, attn="eager").to(DEVICE).eval()
    oracle.load_state_dict(ours.state_dict())
    mask = torch.tensor([1.0, 0.0, 0.5, 2.0]) if mask_shape == "per-head" else torch.tensor([[1.0, 0.0, 1.0, 0.25],
                                                                                            [0.0, 1.0, 3.0, 1.0]])
    per_layer = mask.expand(layers, heads) if mask.dim() == 1 else mask
    with torch.no_grad():
        for i, layer in enumerate(oracle.layers):
            layer.attention.o_proj.weight.mul_(per_layer[i].repeat_interleave(d).to(DEVICE))
    x = pixels(cfg)
    with torch.no_grad():
        expected = oracle(x, output_attentions=True)
        got = ours(x, head_mask=mask.to(DEVICE), output_attentions=True)
    assert_close(got.last_hidden_state, expected.last_hidden_state, 1e-5, name="last_hidden_state")
    for i, (a, b) in enumerate(zip(got.attentions, expected.attentions, strict=True)):
        # transformers 4.x returned the probabilities after the head mask was applied
        assert_close(a, b * per_layer[i].to(DEVICE).view(1, heads, 1, 1), 1e-5, name=f"attentions[{i}]")


def test_head_mask_bad_shape():
    model = vk.VivitModel("tiny").to(DEVICE)
    with pytest.raises(ValueError, match=r"head_mask must be shaped \(num_heads,\)=\(4,\)"):
        model(pixels(tiny()), head_mask=torch.ones(3))


# ------------------------------------------------------------------------------------------------
# inputs: clear errors, dtype, position interpolation, sizes that are not tubelet multiples
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
@pytest.mark.parametrize("attn", ["eager", "triton"])
def test_bad_input_errors(attn, shape, dtype, match):
    model = vk.VivitModel("tiny", attn=attn).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape, dtype=dtype, device=DEVICE))


def test_not_a_tensor_and_wrong_device():
    model = vk.VivitModel("tiny")
    with pytest.raises(ValueError, match="must be a torch.Tensor, got list"):
        model([[1.0]])
    with pytest.raises(ValueError, match="pixel_values is on meta, the model is on cpu"):
        model(torch.zeros(1, 4, 3, 32, 32, device="meta"))


def test_pixel_values_cast_to_model_dtype():
    model = vk.VivitModel("tiny").to(DEVICE, torch.bfloat16)
    assert model(pixels(tiny(), batch=1)).last_hidden_state.dtype == torch.bfloat16


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


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("frames, height, width", [(4, 48, 64), (5, 36, 40), (3, 16, 80), (4, 34, 34)])
def test_interpolation_and_sizes_that_are_not_tubelet_multiples(attn, frames, height, width):
    """Any size of at least one tubelet; the remainder is dropped as Conv3d drops it (the same output as on the
    largest tubelet-multiple crop)."""
    model = make(vk.VivitModel, tiny(), attn)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, frames, 3, height, width, generator=g).to(DEVICE)
    cropped = x[:, : frames // 2 * 2, :, : height // 16 * 16, : width // 16 * 16]
    with torch.no_grad():
        out = model(x, interpolate_pos_encoding=True).last_hidden_state
        ref = model(cropped.contiguous(), interpolate_pos_encoding=True).last_hidden_state
    assert out.shape == (2, 1 + (frames // 2) * (height // 16) * (width // 16), 64)
    assert_close(out, ref, ATOL[attn], name="remainder dropped")


def test_232_crop_runs_like_transformers_integration_test():
    """transformers' ViViT integration test feeds 232x232 frames with interpolate_pos_encoding: the 14 x 14 grid
    is the trained one, so the table is used unchanged and the 8-pixel remainder is dropped."""
    model = make(vk.VivitModel, vk.VivitConfig(num_hidden_layers=1, hidden_size=96, num_attention_heads=2,
                                                 intermediate_size=64, num_frames=4), "eager")
    reference = transformers.VivitModel(transformers.VivitConfig(**model.config.to_dict())).to(DEVICE).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, 3, 232, 232, device=DEVICE)
    with torch.no_grad():
        ours = model(x, interpolate_pos_encoding=True).last_hidden_state
        theirs = reference(x, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == (1, 1 + 2 * 14 * 14, 96)
    assert_close(ours, theirs, 1e-5, name="232x232")


@pytest.mark.parametrize("shape", [(1, 1, 3, 32, 32), (1, 4, 3, 8, 32)])
def test_smaller_than_a_tubelet_is_an_error(shape):
    with pytest.raises(ValueError, match="smaller than one tubelet"):
        vk.VivitModel("tiny")(torch.zeros(shape), interpolate_pos_encoding=True)


# ------------------------------------------------------------------------------------------------
# training features
# ------------------------------------------------------------------------------------------------
def _grads(model, x, labels):
    model.zero_grad()
    model(x, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", BACKENDS)
def test_gradient_checkpointing_same_gradients(attn):
    model = make(vk.VivitForVideoClassification, tiny(), attn).train()
    x, labels = pixels(tiny()), torch.tensor([1, 7], device=DEVICE)
    plain = _grads(model, x, labels)
    model.activation_checkpointing_enable()  # transformers' (gradient_checkpointing_enable is its old name)
    assert all(layer.gradient_checkpointing for layer in model.vivit.layers)
    ckpt = _grads(model, x, labels)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert_close(ckpt[name], plain[name], 1e-6, name=name)


@pytest.mark.parametrize("attn", BACKENDS)
def test_dropout_active_only_in_training(attn):
    cfg = tiny(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = make(vk.VivitModel, cfg, attn)
    x = pixels(cfg, batch=1)
    model.train()
    assert not torch.allclose(model(x).last_hidden_state, model(x).last_hidden_state)
    model.eval()
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


def test_full_size_vivit_b_forward():
    """The hub architecture (ViViT-B/16x2, 3136 tubelets + CLS) builds and runs."""
    model = vk.VivitModel("vivit-b-16x2", attn="sdpa").eval()
    d, f = 768, 3072
    embeddings = d * 3 * 2 * 16 * 16 + d + d + 3137 * d
    layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
    assert model.num_parameters() == embeddings + 12 * layer + 2 * d + d * d + d
    with torch.no_grad():
        out = model(torch.randn(1, 32, 3, 224, 224))
    assert out.last_hidden_state.shape == (1, 3137, 768) and out.pooler_output.shape == (1, 768)
    assert torch.isfinite(out.last_hidden_state).all()


@pytest.mark.cpu_only
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compile_fullgraph(attn):
    """inductor on the CPU (the triton model under inductor is tests/test_cuda.py's)."""
    torch._dynamo.reset()
    model = randomized(vk.VivitForVideoClassification("tiny", attn=attn)).eval()
    x = torch.randn(2, 4, 3, 32, 32)
    expected = model(x).logits
    compiled = torch.compile(model, fullgraph=True)
    assert_close(compiled(x).logits, expected, 1e-5, name="compiled logits")
