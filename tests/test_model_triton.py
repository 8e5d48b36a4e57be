"""The model with attn="triton" (our kernels behind transformers' modules, on the test device) against
attn="eager"; what is fused and what falls back to a module's own forward."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import vivit_kernels as vk
from vivit_kernels._log import forget_said

from helpers import DEVICE, assert_close, run_without_interpreter

pytestmark = pytest.mark.triton

TINY_CONFIGS = {
    "tiny": dict(),
    "tubelet1-odd-heads": dict(image_size=[16, 32], num_frames=3, tubelet_size=[1, 8, 8], hidden_size=48,
                               num_attention_heads=3, intermediate_size=72, num_hidden_layers=2),
    "head-dim-80": dict(hidden_size=160, num_attention_heads=2, intermediate_size=96, num_hidden_layers=1),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.2 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))
    return model


def make_pair(name: str = "tiny", head: bool = True, **overrides):
    cfg = vk.VivitConfig.from_preset("tiny", **{**TINY_CONFIGS[name], **overrides})
    cls = vk.VivitForVideoClassification if head else vk.VivitModel
    eager = randomize(cls(cfg, attn="eager"))
    triton_model = cls(cfg, attn="triton")
    triton_model.load_state_dict(eager.state_dict())
    return cfg, eager.to(DEVICE), triton_model.to(DEVICE)


def inputs(cfg, batch=2):
    h, w = vk.presets.image_hw(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.num_frames, cfg.num_channels, h, w, generator=g)
    return x.to(DEVICE), torch.randint(0, cfg.num_labels, (batch,), generator=g).to(DEVICE)


def assert_same_grads(a: nn.Module, b: nn.Module, atol: float = 1e-4) -> None:
    grads = dict(a.named_parameters())
    for n, p in b.named_parameters():
        assert (grads[n].grad is None) == (p.grad is None), n
        if p.grad is not None:
            assert_close(grads[n].grad, p.grad, atol, rtol=1e-4, name=f"grad {n}")


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_outputs_and_every_gradient_match_eager(name):
    cfg, eager, tri = make_pair(name)
    x, labels = inputs(cfg)
    out_e = eager(x, labels=labels, output_hidden_states=True)
    out_t = tri(x, labels=labels, output_hidden_states=True)
    assert_close(out_t.logits, out_e.logits, 1e-4, name="logits")
    for i, (a, b) in enumerate(zip(out_t.hidden_states, out_e.hidden_states, strict=True)):
        assert_close(a, b, 1e-4, name=f"hidden_states[{i}]")
    out_e.loss.backward()
    out_t.loss.backward()
    assert_same_grads(tri, eager)


@pytest.mark.parametrize("overrides", [dict(qkv_bias=False), dict(hidden_act="gelu"), dict(hidden_act="quick_gelu")],
                         ids=str)
def test_variants_match_eager(overrides):
    cfg, eager, tri = make_pair(**overrides)
    x, labels = inputs(cfg)
    out_e, out_t = eager(x, labels=labels), tri(x, labels=labels)
    assert_close(out_t.logits, out_e.logits, 1e-4, name="logits")
    out_e.loss.backward()
    out_t.loss.backward()
    assert_same_grads(tri, eager)


def test_attentions_and_head_mask_use_eager_attention_with_one_log_line(caplog):
    cfg, eager, tri = make_pair(head=False)
    x, _ = inputs(cfg)
    forget_said()
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5], device=DEVICE)
    with caplog.at_level(logging.WARNING, logger="vivit_kernels"):
        out_t = tri(x, output_attentions=True, head_mask=mask)
        tri(x, output_attentions=True, head_mask=mask)
    out_e = eager(x, output_attentions=True, head_mask=mask)
    assert_close(out_t.last_hidden_state, out_e.last_hidden_state, 1e-5, name="last_hidden_state")
    for a, b in zip(out_t.attentions, out_e.attentions, strict=True):
        assert_close(a, b, 1e-5, name="attentions")
    lines = [r.message for r in caplog.records if "eager attention" in r.message]
    assert len(lines) == 1 and "head_mask" in lines[0], lines


def test_attention_dropout_uses_eager_attention_in_training():
    cfg = vk.VivitConfig.from_preset("tiny", attention_probs_dropout_prob=0.5)
    model = vk.VivitModel(cfg, attn="triton").to(DEVICE).train()
    x, _ = inputs(cfg)
    assert not torch.allclose(model(x).last_hidden_state, model(x).last_hidden_state)  # dropout really applied
    model.eval()
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model(dtype):
    cfg, eager, tri = make_pair()
    x, _ = inputs(cfg)
    ref = eager(x).logits
    low_eager = eager.to(dtype)(x).logits.float()
    low_triton = tri.to(dtype)(x).logits.float()
    err_ours, err_torch = (low_triton - ref).abs().max().item(), (low_eager - ref).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-3, (err_ours, err_torch)


def test_autocast_runs_our_kernels_in_its_dtype_with_fp32_weights(caplog):
    """Trainer's bf16 (autocast over fp32 weights): every op of ours runs on bf16 activations with the weights cast
    as autocast casts them (so: exactly the bf16 model's result), nothing falls back, gradients reach the fp32
    weights (equal to the bf16 model's gradients)."""
    cfg, _, tri = make_pair()
    low = vk.VivitForVideoClassification(cfg, attn="triton").to(DEVICE)
    low.load_state_dict(tri.state_dict())
    low.to(torch.bfloat16)
    x, y = inputs(cfg)
    forget_said()
    with caplog.at_level(logging.WARNING, logger="vivit_kernels"):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            launches, _, _ = count_launches(lambda: tri(x, labels=y).loss.backward())
            out = tri(x).logits
    assert not [r for r in caplog.records if "dtype" in r.getMessage()], [r.getMessage() for r in caplog.records]
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in tri.parameters())
    assert launches > 7 * cfg.num_hidden_layers  # forward and backward kernels of ours
    expected = low(x.to(torch.bfloat16)).logits
    assert torch.equal(out, expected), (out - expected).abs().max()
    low(x.to(torch.bfloat16), labels=y).loss.backward()
    autocast_grads = {n: p.grad.clone() for n, p in tri.named_parameters() if p.grad is not None}
    tri.zero_grad()
    tri(x, labels=y).loss.backward()  # fp32: the reference
    low_grads = dict(low.named_parameters())
    for name, p in tri.named_parameters():
        assert name in autocast_grads and autocast_grads[name].dtype == torch.float32, name
        err_ours = (autocast_grads[name] - p.grad).abs().max().item()
        err_bf16 = (low_grads[name].grad.float() - p.grad).abs().max().item()
        assert err_ours <= 3 * err_bf16 + 1e-3, (name, err_ours, err_bf16)  # flash-attention's rule for gradients


def test_compile_fullgraph_triton_model():
    torch._dynamo.reset()
    cfg, eager, tri = make_pair()
    x, labels = inputs(cfg)
    compiled = torch.compile(tri, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels=labels)
    out.loss.backward()
    ref = eager(x, labels=labels)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, 1e-4, name="logits")
    assert_same_grads(tri, eager)


def test_training_steps_match_eager():
    """A few AdamW steps on a synthetic batch: the losses of the two backends stay together."""
    cfg, eager, tri = make_pair()
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
    for a, b in zip(losses["triton"], losses["eager"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), losses


def test_interpolated_positions_match_eager():
    cfg, eager, tri = make_pair()
    x = torch.randn(2, 6, 3, 48, 64, device=DEVICE)
    assert_close(tri(x, interpolate_pos_encoding=True).logits, eager(x, interpolate_pos_encoding=True).logits, 1e-4,
                 name="logits")


def test_transformers_attention_interface():
    import transformers

    from vivit_kernels.integrations import register_transformers_attention, transformers_attention_forward

    config = transformers.VivitConfig(image_size=32, num_frames=4, tubelet_size=[2, 16, 16], hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
    model = randomize(transformers.VivitModel(config)).to(DEVICE).eval()
    x = torch.randn(2, 4, 3, 32, 32, device=DEVICE)
    model.set_attn_implementation("eager")
    ref = model(x).last_hidden_state
    name = register_transformers_attention()
    model.set_attn_implementation(name)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["vivit_kernels"] is transformers_attention_forward
    x2 = x.clone().requires_grad_()
    out = model(x2).last_hidden_state
    assert_close(out, ref, 1e-4, name="last_hidden_state")
    out.sum().backward()
    model.set_attn_implementation("eager")
    x3 = x.clone().requires_grad_()
    model(x3).last_hidden_state.sum().backward()
    assert_close(x2.grad, x3.grad, 1e-4, name="input grad")


# ------------------------------------------------------------------------------------------------
# kernels behind the modules: what is fused, what runs its own forward
# ------------------------------------------------------------------------------------------------
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
            name = func.__name__.split(".")[0]
            if func.namespace == "aten" and name not in _NO_LAUNCH:
                aten.append(name)
            return func(*args, **(kwargs or {}))

    before = sum(LAUNCHES.values())
    with Recorder():
        fn()
    return sum(LAUNCHES.values()) - before, len(aten), aten


def test_seven_launches_per_layer():
    """LayerNorm, QKV GEMM (three weights read in place), attention, out-proj GEMM + residual, LayerNorm,
    FC1 + gelu, FC2 + residual."""
    cfg, eager, tri = make_pair(head=False)
    layer = tri.eval().layers[0]
    x = torch.randn(2, 9, cfg.hidden_size, device=DEVICE)
    with torch.no_grad():
        triton_launches, aten_launches, names = count_launches(lambda: layer(x))
    assert triton_launches == 7 and aten_launches == 0, (triton_launches, names)
    with torch.no_grad():
        _, eager_ops, _ = count_launches(lambda: eager.eval().layers[0](x))
    assert eager_ops > 7


def test_whole_forward_launches():
    """Embedding (1) + 7 per layer + final LayerNorm (1), and the pooler's dense + tanh in torch."""
    cfg, _, tri = make_pair(head=False)
    x, _ = inputs(cfg)
    with torch.no_grad():
        triton_launches, aten_launches, names = count_launches(lambda: tri.eval()(x))
    assert triton_launches == 1 + 7 * cfg.num_hidden_layers + 1
    assert aten_launches <= 3, names


class Zeros(nn.Module):
    """A replacement module transformers' ViViT does not know."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Wrapped(nn.Module):
    """A LoRA-like wrapper: the plain linear inside, plus its own low-rank term."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.down = nn.Linear(base.in_features, 2, bias=False)
        self.up = nn.Linear(2, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


@pytest.mark.parametrize("where", ["attention.q_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"])
@pytest.mark.parametrize("kind", ["replaced", "wrapped"])
def test_replaced_or_wrapped_modules_run_their_own_forward(where, kind, caplog):
    cfg, eager, tri = make_pair()
    x, labels = inputs(cfg)
    for model in (eager, tri):
        for layer in model.vivit.layers:
            parent_name, child = where.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, child)
            torch.manual_seed(5)
            new = Zeros(old.out_features) if kind == "replaced" else Wrapped(old)
            setattr(parent, child, new.to(DEVICE))
    forget_said()
    with caplog.at_level(logging.WARNING, logger="vivit_kernels"):
        out_t = tri(x, labels=labels)
    out_e = eager(x, labels=labels)
    assert_close(out_t.logits, out_e.logits, 1e-4, name="logits")  # the replacement took effect in both
    out_t.loss.backward()
    out_e.loss.backward()
    assert_same_grads(tri, eager)
    logged = [r.message for r in caplog.records if where in r.message]
    assert len(logged) == 1 and f"vivit.layers.*.{where}" in logged[0] and "runs its own forward" in logged[0], logged


def test_forward_hooks_fire_and_count():
    cfg, eager, tri = make_pair()
    x, _ = inputs(cfg)
    calls = {"eager": 0, "triton": 0}
    for name, model in (("eager", eager), ("triton", tri)):
        for layer in model.vivit.layers:
            def hook(module, args, output, name=name):
                calls[name] += 1
                return output * 0.5  # a hook that changes the output must change the result
            layer.attention.k_proj.register_forward_hook(hook)
            layer.mlp.fc2.register_forward_hook(hook)
    out_t, out_e = tri(x).logits, eager(x).logits
    assert calls["triton"] == calls["eager"] == 2 * cfg.num_hidden_layers
    assert_close(out_t, out_e, 1e-4, name="hooked logits")


def test_modules_without_hooks_again_fuse():
    """transformers' output-capturing hooks stay installed after output_hidden_states: they must not disable the
    fused path afterwards."""
    cfg, _, tri = make_pair(head=False)
    x, _ = inputs(cfg)
    tri.eval()
    with torch.no_grad():
        tri(x, output_hidden_states=True, output_attentions=True)
        triton_launches, aten_launches, names = count_launches(lambda: tri(x))
    assert triton_launches == 1 + 7 * cfg.num_hidden_layers + 1, names


def test_apply_vivit_kernels_to_a_transformers_model():
    import transformers

    config = transformers.VivitConfig(**vk.VivitConfig.from_preset("tiny").to_dict())
    hf = randomize(transformers.VivitForVideoClassification(config)).to(DEVICE).eval()
    x, _ = inputs(config)
    with torch.no_grad():
        ref = hf(x).logits
        assert vk.apply_vivit_kernels(hf, attn="triton") is hf
        assert type(hf.vivit.layers[0]).__name__ == "KernelVivitLayer"
        launches, _, _ = count_launches(lambda: hf(x))
        assert launches == 1 + 7 * config.num_hidden_layers + 1
        assert_close(hf(x).logits, ref, 1e-4, name="logits")
        vk.apply_vivit_kernels(hf, attn="eager")
        assert type(hf.vivit.layers[0]) is transformers.models.vivit.modeling_vivit.VivitLayer
        assert_close(hf(x).logits, ref, 1e-5, name="back to eager")
    with pytest.raises(ValueError, match="no ViViT base model .* inside this Linear"):
        vk.apply_vivit_kernels(nn.Linear(2, 2))


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


def _dispatched_ours(fn) -> set[str]:
    """The vivit_kernels custom ops dispatched while ``fn`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "vivit_kernels":
                seen.add(f"vivit_kernels::{func.__name__.split('.')[0]}")
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


def _train_step(model, x, labels):
    def step():
        model.zero_grad(set_to_none=True)
        model(x, labels=labels).loss.backward()

    return step


@pytest.mark.parametrize("op", __import__("vivit_kernels.ops.registry", fromlist=["backend_ops"]).backend_ops())
def test_an_op_switched_off_runs_transformers_path(op):
    """ops={op: False}: that op's kernels never run (forward or backward), the others do, and the model still
    equals eager (outputs and every gradient)."""
    from vivit_kernels.ops.registry import OPS, backend_ops

    cfg, eager, tri = make_pair()
    tri.set_attn("triton", ops={op: False})
    x, labels = inputs(cfg)
    ran = _dispatched_ours(_train_step(tri, x, labels))
    assert not ran & set(OPS[op].custom_ops), ran
    others = {name for other in backend_ops() if other != op and other != "attention" for name in OPS[other].custom_ops}
    if op == "qkv":  # without the fused projection, attention runs on separate q, k, v: "attention", not "_qkv"
        others = others - set(OPS["attention_qkv"].custom_ops) | set(OPS["attention"].custom_ops)
    # (attention_qkv off: transformers' attention on the fused projection's q, k, v, not our "attention" op)
    assert ran == others, ran ^ others
    _train_step(eager, x, labels)()
    with torch.no_grad():
        assert_close(tri(x).logits, eager(x).logits, 1e-4, name=f"logits without {op}")
    assert_same_grads(tri, eager)


def test_only_the_ops_asked_for_run_and_unknown_names_are_errors():
    from vivit_kernels.ops.registry import OPS

    cfg, eager, tri = make_pair()
    on = ["qkv", "attention_qkv"]  # attention_qkv reads qkv's fused output
    tri.set_attn("triton", ops=on)
    x, labels = inputs(cfg)
    ran = _dispatched_ours(_train_step(tri, x, labels))
    assert ran == {name for op in on for name in OPS[op].custom_ops}, ran
    with pytest.raises(ValueError, match="unknown op 'softmax'; the ops a ViViT layer runs: layer_norm"):
        tri.set_attn("triton", ops={"softmax": False})
    with pytest.raises(ValueError, match="attn='triton' or 'auto', got attn='sdpa'"):
        tri.set_attn("sdpa", ops=["mlp"])
    with pytest.raises(TypeError, match="got the string 'mlp'"):
        tri.set_attn("triton", ops="mlp")
