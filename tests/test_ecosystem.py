"""The tools transformers users bring, on our model with attn="triton" (kernels on the test device): PEFT LoRA,
Trainer (train, checkpoint, resume, reload, gradient checkpointing), FSDP2 (two gloo processes), torch.export and
ONNX export."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import transformers

import vivit_kernels as vk
from vivit_kernels._compat import training_checkpointing_argument

from helpers import DEVICE, assert_close

pytestmark = pytest.mark.triton


def tiny_pair():
    """Our model (triton) and transformers' own model (eager) with the same random weights."""
    cfg = vk.VivitConfig.from_preset("tiny")
    g = torch.Generator().manual_seed(0)
    ours = vk.VivitForVideoClassification(cfg, attn="triton")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    theirs = transformers.VivitForVideoClassification(transformers.VivitConfig(**cfg.to_dict()))
    theirs.set_attn_implementation("eager")
    theirs.load_state_dict(ours.state_dict())
    return cfg, ours.to(DEVICE), theirs.to(DEVICE)


def batch(cfg, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.num_frames, 3, 32, 32, generator=g)
    return x.to(DEVICE), torch.randint(0, cfg.num_labels, (n,), generator=g).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# PEFT
# ------------------------------------------------------------------------------------------------
def _lora(model, targets=("q_proj", "v_proj"), rank=4):
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero adapters (lora_B starts at zero) so that they change the output
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def test_lora_on_q_and_v_equals_lora_on_transformers_and_trains():
    cfg, ours, theirs = tiny_pair()
    ours, theirs = _lora(ours), _lora(theirs)
    x, labels = batch(cfg)
    out_o, out_t = ours(pixel_values=x, labels=labels), theirs(pixel_values=x, labels=labels)
    assert_close(out_o.logits, out_t.logits, 1e-4, name="logits")
    out_o.loss.backward()
    out_t.loss.backward()
    adapters_t = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
    adapters_o = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert adapters_o.keys() == adapters_t.keys() and len(adapters_o) == 4 * cfg.num_hidden_layers
    for n, p in adapters_o.items():
        assert p.grad is not None and p.grad.abs().max() > 0, n
        assert_close(p.grad, adapters_t[n].grad, 1e-4, rtol=1e-4, name=n)
    for n, p in ours.named_parameters():  # only adapters (and the classifier PEFT keeps trainable) train
        if "lora_" not in n and "classifier" not in n:
            assert not p.requires_grad, n
    before = {n: p.detach().clone() for n, p in adapters_o.items()}
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = ours(pixel_values=x, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in adapters_o.items())


def _dispatched(fn) -> list[tuple[str, tuple]]:
    """(custom op name, its arguments) of every vivit_kernels op dispatched while ``fn`` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "vivit_kernels":
                seen.append((func.__name__.split(".")[0], args))
            return func(*args, **(kwargs or {}))

    with Recorder():
        fn()
    return seen


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")],
                         ids=["q-v", "every-linear"])
def test_lora_stays_on_our_fused_gemms_and_frozen_weights_get_no_gradient(targets):
    """PEFT LoRA on any projection: the base GEMMs stay ours (QKV one launch per layer, the MLP op where fc1 and
    fc2 are plain), the adapters' update is added, the result equals transformers' eager model with the same
    adapters (outputs and every adapter gradient), and no backward op computes a frozen base weight's gradient."""
    cfg, ours, theirs = tiny_pair()
    ours, theirs = _lora(ours, targets), _lora(theirs, targets)
    x, labels = batch(cfg)
    out = {}

    def step():
        out["ours"] = ours(pixel_values=x, labels=labels)
        out["ours"].loss.backward()

    calls = _dispatched(step)
    names = [name for name, _ in calls]
    layers = cfg.num_hidden_layers
    assert names.count("qkv_fwd") == layers  # the three base projections: one GEMM per layer, adapters or not
    assert names.count("mlp_fwd") == (0 if "fc1" in targets else layers)
    # o_proj's GEMM (+ residual) each layer; with fc1 and fc2 adapted, theirs too instead of the MLP op
    assert names.count("linear_fwd") == layers * (3 if "fc1" in targets else 1)
    for name, args in calls:  # every base weight is frozen: no weight or bias gradient is computed
        if name == "qkv_bwd":
            assert not any(args[6][1:]), args[6]
        elif name in ("linear_bwd",):
            assert not args[5] and not args[6], args[4:7]
        elif name == "mlp_bwd":
            assert not any(args[6][1:]), args[6]
        elif name == "layer_norm_bwd":
            assert not args[6] and not args[7], args[5:8]
    ref = theirs(pixel_values=x, labels=labels)
    ref.loss.backward()
    assert_close(out["ours"].logits, ref.logits, 1e-4, name="logits")
    theirs_params = dict(theirs.named_parameters())
    adapters = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * len(targets) * layers
    for n, p in adapters.items():
        assert_close(p.grad, theirs_params[n].grad, 1e-4, rtol=1e-4, name=n)
    # merged adapters: the base weights hold the update; our GEMMs alone, the same outputs
    with torch.no_grad():
        ours.merge_adapter()
        theirs.merge_adapter()
        names = [name for name, _ in _dispatched(lambda: ours(pixel_values=x))]
        assert_close(ours(pixel_values=x).logits, theirs(pixel_values=x).logits, 1e-4, name="merged")
        assert names.count("qkv_fwd") == layers
        ours.unmerge_adapter()
        merged = ours.merge_and_unload()  # plain modules again
        assert_close(merged(pixel_values=x).logits, ref.logits.detach(), 1e-4, name="merge_and_unload")


EVERY_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_lora_of_each_rank_runs_inside_our_gemms_and_equals_peft(rank):
    """PEFT LoRA of rank 1, 8 and 64 on every linear, two adapter matrices frozen: the adapters run inside our GEMMs
    (no torch matmul of rank width anywhere in the step; fc1's GEMM keeps gelu_fast with its adapter inside it),
    and logits and every trainable adapter's gradient equal transformers' eager model with the same adapters; the
    frozen ones get none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cfg, ours, theirs = tiny_pair()
    ours, theirs = _lora(ours, EVERY_LINEAR, rank), _lora(theirs, EVERY_LINEAR, rank)
    last = cfg.num_hidden_layers - 1
    frozen = ("layer.0.attention.attention.q_proj.lora_A", f"layer.{last}.mlp.fc2.lora_B")
    for model in (ours, theirs):
        for n, p in model.named_parameters():
            if any(f in n for f in frozen):
                p.requires_grad_(False)
    x, labels = batch(cfg)
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func.namespace, func.__name__.split(".")[0], args))
            return func(*args, **(kwargs or {}))

    with Recorder():
        out = ours(pixel_values=x, labels=labels)
        out.loss.backward()
    matmuls = [[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)] for ns, name, args in seen
               if ns == "aten" and name in ("mm", "addmm", "bmm", "linear")]
    # (the classifier's GEMMs aside: they hold num_labels)
    rank_wide = [shapes for shapes in matmuls if any(rank in s[-2:] for s in shapes)
                 and not any(cfg.num_labels in s for s in shapes)]
    assert not rank_wide, rank_wide
    fc1 = [args for ns, name, args in seen if name == "linear_fwd" and args[4] == "gelu_fast"]
    assert len(fc1) == cfg.num_hidden_layers and all(len(args[7]) == 1 for args in fc1)
    ref = theirs(pixel_values=x, labels=labels)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, 1e-4, name="logits")
    theirs_params = dict(theirs.named_parameters())
    adapters = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * len(EVERY_LINEAR) * cfg.num_hidden_layers
    for n, p in adapters.items():
        if any(f in n for f in frozen):
            assert p.grad is None, n
        else:
            assert_close(p.grad, theirs_params[n].grad, 1e-4, rtol=1e-4, name=n)


def test_lora_with_dropout_stays_in_the_qkv_op_and_matches_peft():
    """lora_dropout > 0 in training: each adapter's dropped input goes into the QKV op (no update added on a view of
    its output); with the same random state the masks are PEFT's own, so logits and every adapter gradient equal
    transformers' eager model with the same adapters."""
    import peft

    cfg, ours, theirs = tiny_pair()

    def lora(model):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                           target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        return model.train()

    ours, theirs = lora(ours), lora(theirs)
    x, labels = batch(cfg)
    out = {}

    def step():
        torch.manual_seed(3)
        out["ours"] = ours(pixel_values=x, labels=labels)
        out["ours"].loss.backward()

    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Recorder(TorchDispatchMode):  # every op dispatched outside our ops (what runs inside one is not seen)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Recorder():
        step()
    # one QKV op a layer; no update added on a view of its output (in place, then copied back by autograd)
    assert names.count("qkv_fwd") == cfg.num_hidden_layers and "addmm_" not in names, sorted(set(names))
    torch.manual_seed(3)
    ref = theirs(pixel_values=x, labels=labels)
    ref.loss.backward()
    assert_close(out["ours"].logits, ref.logits, 1e-4, name="logits")
    theirs_params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if "lora_" in n:
            assert_close(p.grad, theirs_params[n].grad, 1e-4, rtol=1e-4, name=n)
    torch.manual_seed(4)  # another mask: another output (the dropout is really applied)
    assert not torch.allclose(ours(pixel_values=x).logits, out["ours"].logits)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), EVERY_LINEAR], ids=["q-v", "every-linear"])
def test_lora_on_a_bf16_model_with_peft_fp32_adapters(targets):
    """A bf16 model: PEFT keeps its adapters in fp32 (``autocast_adapter_dtype``) and casts x up; our GEMMs read
    them as they are and take their products in bf16, their gradients written in fp32. Logits and every adapter
    gradient within the tolerance rule against transformers' eager model in fp32, PEFT's own bf16 forward giving
    PyTorch's own error."""
    from vivit_kernels.testing import judge_outputs

    cfg, ours, theirs = tiny_pair()
    theirs_bf16 = transformers.VivitForVideoClassification(transformers.VivitConfig(**cfg.to_dict()))
    theirs_bf16.set_attn_implementation("eager")
    theirs_bf16.load_state_dict(theirs.state_dict())
    ours, theirs_bf16 = ours.to(torch.bfloat16), theirs_bf16.to(DEVICE, torch.bfloat16)
    ours, theirs, theirs_bf16 = _lora(ours, targets, 8), _lora(theirs, targets, 8), _lora(theirs_bf16, targets, 8)
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's upcast
    x, labels = batch(cfg)
    results = []
    for model, dtype in ((ours, torch.bfloat16), (theirs, torch.float32), (theirs_bf16, torch.bfloat16)):
        logits = model(pixel_values=x.to(dtype)).logits
        adapters = [p for n, p in sorted(model.named_parameters()) if "lora_" in n]
        grads = torch.autograd.grad(logits.float().square().mean(), adapters)
        results.append((logits.float(), [g.float() for g in grads]))
    comparisons = judge_outputs(*results[0], ref=results[1], low=results[2], name="lora bf16")
    assert all(c.ok for c in comparisons), [c.message() for c in comparisons if not c.ok]


def test_apply_vivit_kernels_to_a_peft_wrapped_transformers_model():
    cfg, ours, theirs = tiny_pair()
    wrapped = _lora(theirs)
    x, _ = batch(cfg)
    with torch.no_grad():
        ref = wrapped(pixel_values=x).logits
        vk.apply_vivit_kernels(wrapped, attn="triton")
        assert type(wrapped.base_model.model.vivit.layers[0]).__name__ == "KernelVivitLayer"
        assert_close(wrapped(pixel_values=x).logits, ref, 1e-4, name="logits")


# ------------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------------
class Clips(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 4, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _trainer(model, out_dir, **overrides):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, report_to=[], use_cpu=DEVICE.type == "cpu", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **overrides)
    return transformers.Trainer(model=model, args=args, train_dataset=Clips())


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_trains_checkpoints_resumes_and_reloads(gradient_checkpointing, tmp_path):
    _, model, _ = tiny_pair()
    # the field's name differs between transformers 5.17 and later 5.x (the old name is deprecated there)
    trainer = _trainer(model, tmp_path, **{training_checkpointing_argument(): gradient_checkpointing})
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert model.attn == "triton" and all(
        layer.gradient_checkpointing == gradient_checkpointing for layer in model.vivit.layers
    )
    for step in (2, 4):
        files = os.listdir(tmp_path / f"checkpoint-{step}")
        assert "config.json" in files and "model.safetensors" in files, files
    reloaded = vk.VivitForVideoClassification.from_pretrained(tmp_path / "checkpoint-4", attn="triton").to(DEVICE)
    by_transformers = transformers.AutoModelForVideoClassification.from_pretrained(tmp_path / "checkpoint-4")
    assert type(by_transformers) is transformers.VivitForVideoClassification
    x, _ = batch(vk.VivitConfig.from_preset("tiny"))
    with torch.no_grad():
        assert_close(reloaded.eval()(x).logits, model.eval()(x).logits, 1e-5, name="reloaded")
        assert_close(by_transformers.to(DEVICE).eval()(x).logits, model(x).logits, 1e-4, name="transformers reload")
    if not gradient_checkpointing:  # resume from the middle: two more steps from checkpoint-2's weights
        _, fresh, _ = tiny_pair()
        resumed = _trainer(fresh, tmp_path / "again")
        assert resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2")).global_step == 4
        at_2 = vk.VivitForVideoClassification.from_pretrained(tmp_path / "checkpoint-2")
        pairs = zip(fresh.named_parameters(), at_2.parameters(), strict=True)
        moved = [n for (n, a), b in pairs if not torch.equal(a.cpu(), b)]
        assert moved, "resuming trained nothing"
        # the uninterrupted run's weights
        for (n, a), b in zip(fresh.named_parameters(), model.parameters(), strict=True):
            assert_close(a, b, 1e-5, name=n)


# ------------------------------------------------------------------------------------------------
# FSDP2
# ------------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, world: int, init_file: str, out_file: str, attn: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = vk.VivitForVideoClassification("tiny", attn=attn)
        for layer in model.vivit.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _fsdp_data()
        for _ in range(2):
            opt.zero_grad()
            model(x[rank : rank + 1], labels=y[rank : rank + 1]).loss.backward()
            opt.step()
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(state, out_file)
        dist.barrier()  # no rank tears down while another still talks to it
        del model, opt, state
        gc.collect()  # the shards (DTensors on the group's mesh) go before the group does
    finally:
        dist.destroy_process_group()


def _fsdp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 3, 32, 32, generator=g), torch.tensor([1, 3])


@pytest.mark.cpu_only
def test_fsdp2_two_processes_train_and_full_state_dict(tmp_path):
    """Two gloo processes (CPU on purpose: one GPU machine cannot run two NCCL ranks on one device), one sample
    each: the gathered state dict has transformers' names and equals one process training on both samples."""
    import torch.multiprocessing as mp

    out_file = str(tmp_path / "state.pt")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), out_file, "triton"), nprocs=2)
    state = torch.load(out_file)
    torch.manual_seed(0)
    reference = vk.VivitForVideoClassification("tiny", attn="eager")
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = _fsdp_data()
    for _ in range(2):
        opt.zero_grad()
        reference(x, labels=y).loss.backward()
        opt.step()
    expected = reference.state_dict()
    assert list(state) == list(expected)
    for name, value in expected.items():
        assert_close(state[name], value, 1e-5, name=name)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "triton"])
def test_torch_export(attn):
    cfg, ours, theirs = tiny_pair()
    ours.set_attn(attn).eval()
    x, _ = batch(cfg)
    program = torch.export.export(ours, (x,))
    if attn == "triton":  # our kernels are in the exported graph, flash attention included
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("flash_attn_qkv_fwd" in op for op in ops) and any("qkv_fwd" in op for op in ops), ops
    with torch.no_grad():
        assert_close(program.module()(x).logits, ours(x).logits, 1e-5, name="exported logits")


@pytest.mark.cpu_only
def test_onnx_export_of_the_default_outputs(tmp_path):
    """ONNX of the default (sdpa) model, checked and evaluated with onnx's reference evaluator (CPU on purpose:
    ONNX export is a host-side path). Our Triton ops have no ONNX form: the triton model exports to torch.export."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = vk.VivitForVideoClassification("tiny").eval()
    x = torch.randn(1, 4, 3, 32, 32)
    torch.onnx.export(model, (x,), str(tmp_path / "vivit.onnx"), dynamo=True, input_names=["pixel_values"])
    graph = onnx.load(str(tmp_path / "vivit.onnx"))
    onnx.checker.check_model(graph)
    (logits,) = ReferenceEvaluator(graph).run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(logits), model(x).logits, 1e-5, name="onnx logits")
