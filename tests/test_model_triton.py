"""The model with attn="triton" (Triton kernels on the test device) against attn="eager"."""

from __future__ import annotations

import pytest
import torch

import vivit_kernels as vk
from helpers import DEVICE, assert_close, run_without_interpreter

pytestmark = pytest.mark.triton

TINY_CONFIGS = {
    "tiny": dict(),
    "tubelet1-odd-heads": dict(image_size=[16, 32], num_frames=3, tubelet_size=[1, 8, 8], hidden_size=48,
                               num_attention_heads=3, intermediate_size=72, num_hidden_layers=2),
    "head-dim-80": dict(hidden_size=160, num_attention_heads=2, intermediate_size=96, num_hidden_layers=1),
}


def make_pair(name: str, head: bool = True):
    cfg = vk.VivitConfig.from_preset("tiny", **TINY_CONFIGS[name])
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    torch.manual_seed(0)
    eager = cls(cfg, attn="eager")
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.2 * torch.randn_like(p))
    triton_model = cls(cfg, attn="triton")
    triton_model.load_state_dict(eager.state_dict())
    return cfg, eager.to(DEVICE), triton_model.to(DEVICE)


def inputs(cfg, batch=2):
    h, w = cfg.image_hw
    x = torch.randn(batch, cfg.num_frames, cfg.num_channels, h, w)
    return x.to(DEVICE), torch.randint(0, cfg.num_labels, (batch,)).to(DEVICE)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_outputs_and_every_gradient_match_eager(name):
    cfg, eager, tri = make_pair(name)
    x, labels = inputs(cfg)
    out_e = eager(x, labels=labels, output_hidden_states=True)
    out_t = tri(x, labels=labels, output_hidden_states=True)
    assert_close(out_t.logits, out_e.logits, 1e-4, name="logits")
    for i, (a, b) in enumerate(zip(out_t.hidden_states, out_e.hidden_states)):
        assert_close(a, b, 1e-4, name=f"hidden_states[{i}]")
    out_e.loss.backward()
    out_t.loss.backward()
    grads_t = dict(tri.named_parameters())
    for n, p in eager.named_parameters():
        assert_close(grads_t[n].grad, p.grad, 1e-4, rtol=1e-4, name=f"grad {n}")


def test_attentions_and_head_mask_fall_back_to_eager_with_one_warning():
    cfg, eager, tri = make_pair("tiny", head=False)
    x, _ = inputs(cfg)
    from vivit_kernels import model as model_module

    model_module._warned.clear()
    with pytest.warns(UserWarning, match="falling back to eager"):
        out_t = tri(x, output_attentions=True, head_mask=torch.tensor([1.0, 0.0, 1.0, 0.5], device=DEVICE))
    out_e = eager(x, output_attentions=True, head_mask=torch.tensor([1.0, 0.0, 1.0, 0.5], device=DEVICE))
    assert_close(out_t.last_hidden_state, out_e.last_hidden_state, 1e-5, name="last_hidden_state")
    for a, b in zip(out_t.attentions, out_e.attentions):
        assert_close(a, b, 1e-5, name="attentions")


def test_attention_dropout_uses_eager_path_in_training():
    cfg = vk.VivitConfig.from_preset("tiny", attention_probs_dropout_prob=0.5)
    model = vk.VivitModel(cfg, attn="triton").to(DEVICE).train()
    from vivit_kernels import model as model_module

    model_module._warned.clear()
    x, _ = inputs(cfg)
    with pytest.warns(UserWarning, match="attention dropout"):
        a = model(x).last_hidden_state
    b = model(x).last_hidden_state
    assert not torch.allclose(a, b)  # dropout really applied
    model.eval()
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model(dtype):
    cfg, eager, tri = make_pair("tiny")
    x, _ = inputs(cfg)
    ref = eager(x).logits
    low_eager = eager.to(dtype)(x).logits.float()
    low_triton = tri.to(dtype)(x).logits.float()
    err_ours = (low_triton - ref).abs().max().item()
    err_torch = (low_eager - ref).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)


def test_compile_fullgraph_triton_model():
    torch._dynamo.reset()
    cfg, eager, tri = make_pair("tiny")
    x, labels = inputs(cfg)
    compiled = torch.compile(tri, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels=labels)
    out.loss.backward()
    ref = eager(x, labels=labels)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, 1e-4, name="logits")
    grads = dict(tri.named_parameters())
    for n, p in eager.named_parameters():
        assert_close(grads[n].grad, p.grad, 1e-4, rtol=1e-4, name=n)


def test_transformers_attention_interface():
    transformers = pytest.importorskip("transformers")
    from vivit_kernels.integrations import register_transformers_attention

    config = transformers.VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
    torch.manual_seed(0)
    model = transformers.VivitModel(config).to(DEVICE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 4, 3, 32, 32, device=DEVICE)
    model.set_attn_implementation("eager")
    ref = model(x).last_hidden_state
    name = register_transformers_attention()
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == "vivit_kernels"
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vivit_kernels.integrations import transformers_attention_forward

    assert ALL_ATTENTION_FUNCTIONS["vivit_kernels"] is transformers_attention_forward
    x2 = x.clone().requires_grad_()
    out = model(x2).last_hidden_state
    assert_close(out, ref, 1e-4, name="last_hidden_state")
    out.sum().backward()
    model.set_attn_implementation("eager")
    x3 = x.clone().requires_grad_()
    model(x3).last_hidden_state.sum().backward()
    assert_close(x2.grad, x3.grad, 1e-4, name="input grad")


def test_training_steps_match_eager():
    """A few AdamW steps on a synthetic batch: the losses of the two backends stay together."""
    cfg, eager, tri = make_pair("tiny")
    x, labels = inputs(cfg, batch=3)
    losses = {}
    for name, model in (("eager", eager), ("triton", tri)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(4):
            opt.zero_grad()
            loss = model(x, labels=labels).loss
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]  # it trains
    for a, b in zip(losses["triton"], losses["eager"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), losses


def test_interpolated_positions_match_eager():
    cfg, eager, tri = make_pair("tiny")
    x = torch.randn(2, 6, 3, 48, 64, device=DEVICE)
    a = tri(x, interpolate_pos_encoding=True).logits
    b = eager(x, interpolate_pos_encoding=True).logits
    assert_close(a, b, 1e-4, name="logits")


@pytest.mark.parametrize("overrides", [dict(qkv_bias=False), dict(hidden_act="gelu"), dict(hidden_act="quick_gelu")],
                         ids=str)
def test_variants_match_eager(overrides):
    cfg = vk.VivitConfig.from_preset("tiny", **overrides)
    torch.manual_seed(1)
    eager = vk.VivitForVideoClassification(cfg)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tri = vk.VivitForVideoClassification(cfg, attn="triton")
    tri.load_state_dict(eager.state_dict())
    eager, tri = eager.to(DEVICE), tri.to(DEVICE)
    x, labels = inputs(cfg)
    out_e, out_t = eager(x, labels=labels), tri(x, labels=labels)
    assert_close(out_t.logits, out_e.logits, 1e-4, name="logits")
    out_e.loss.backward()
    out_t.loss.backward()
    grads = dict(tri.named_parameters())
    for n, p in eager.named_parameters():
        assert_close(grads[n].grad, p.grad, 1e-4, rtol=1e-4, name=n)


# ATen ops that only create views or allocate: no kernel launch.
_NO_LAUNCH = {
    "view", "_unsafe_view", "unbind", "select", "slice", "t", "transpose", "permute", "expand", "as_strided",
    "detach", "alias", "squeeze", "unsqueeze", "split", "split_with_sizes", "empty", "empty_like",
    "empty_strided", "new_empty", "reshape", "_reshape_alias", "lift_fresh",
}


def count_launches(fn):
    """(Triton kernel launches, other ATen ops that launch a kernel, their names) while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vivit_kernels.ops._triton import LAUNCHES

    aten = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ns = func.namespace
            name = func.__name__.split(".")[0]
            if ns == "aten" and name not in _NO_LAUNCH:
                aten.append(name)
            return func(*args, **(kwargs or {}))

    before = sum(LAUNCHES.values())
    with Recorder():
        fn()
    return sum(LAUNCHES.values()) - before, len(aten), aten


def test_at_most_seven_launches_per_layer():
    """LayerNorm, QKV GEMM, attention, out-proj GEMM + residual, LayerNorm, FC1 + gelu, FC2 + residual."""
    cfg, _, tri = make_pair("tiny", head=False)
    tri.eval()
    layer = tri.layers[0]
    x = torch.randn(2, 9, cfg.hidden_size, device=DEVICE)
    with torch.no_grad():
        triton_launches, aten_launches, names = count_launches(lambda: layer(x, tri.backend))
    assert triton_launches + aten_launches <= 7, (triton_launches, names)
    assert aten_launches == 0, names
    # the eager layer, for comparison, runs a long chain of separate ops
    from vivit_kernels.backends import get_backend

    with torch.no_grad():
        _, eager_ops, _ = count_launches(lambda: layer(x, get_backend("eager")))
    assert eager_ops > 7


def test_whole_forward_launches():
    """Embedding (1) + 7 per layer + final LayerNorm (1) + pooler (dense, tanh, and the [CLS] slice)."""
    cfg, _, tri = make_pair("tiny", head=False)
    x, _ = inputs(cfg)
    with torch.no_grad():
        triton_launches, aten_launches, names = count_launches(lambda: tri.eval()(x))
    assert triton_launches == 1 + 7 * cfg.num_hidden_layers + 1
    assert aten_launches <= 3, names  # the pooler: addmm + tanh (+ nothing else)


def test_gradient_checkpointing_same_gradients():
    cfg, _, tri = make_pair("tiny")
    x, labels = inputs(cfg)
    tri.train()
    tri(x, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in tri.named_parameters()}
    tri.zero_grad()
    tri.gradient_checkpointing_enable()
    tri(x, labels=labels).loss.backward()
    for n, p in tri.named_parameters():
        assert_close(p.grad, plain[n], 1e-6, name=n)


@pytest.mark.cpu_only
def test_cpu_without_interpreter_is_a_clear_model_error():
    code = (
        "import torch, vivit_kernels as vk\n"
        "m = vk.VivitModel('tiny', attn='triton')\n"
        "try:\n"
        "    m(torch.randn(1, 4, 3, 32, 32))\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    out = run_without_interpreter(code)
    if torch.cuda.is_available():
        pytest.skip("targets GPU-less machines")
    assert "ERR attn='triton' runs Triton kernels, which need a CUDA device" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "attn='sdpa'" in out.stdout
