"""Activation offloading (`offload_activations`, hai_medqa/train/activation_offload.py) on the CPU.

On the CPU the hooks take their stream-less path: plain copies out in the forward and back one layer
ahead in the backward - the same bookkeeping as on a GPU, so which tensors leave, in which order they
come back and the numerics are checked here. Losses and LoRA gradients are compared **bitwise**
(`torch.equal`): offloading only copies the layer inputs (exact), the recomputation then runs the same
kernels on the same values in the same order on one thread, and no random numbers are drawn by the
hooks (LoRA dropout is on, so a disturbed RNG would show). The CUDA path (side stream, events,
``record_stream``) needs a GPU: `test_cuda_offload_matches_and_frees_device_memory` runs only there.
With compiled layers (aot_eager here): `test_offloading_wraps_the_checkpoint_of_compiled_layers`. Under FSDP
on two processes: tests/train/test_fsdp_save.py.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hai_medqa.config import ConfigError, load_config
from hai_medqa.fixtures.tiny_model import packed_label_batches
from hai_medqa.model.load import load_causal_lm
from hai_medqa.train import activation_offload, backends, fast_lora
from hai_medqa.train.config import TrainConfig, resolve_profile, settle_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons: one thread, one reduction order
    yield
    torch.set_num_threads(threads)


def _model(path, *, every_n: int, offload: bool, device="cpu", dtype=torch.float32):
    """The trainer's model build in small (model_build.build_model's order): NF4 base, checkpointing every
    n-th layer, offloading, LoRA (non-zero B, dropout on), the fused LoRA forward."""
    model = load_causal_lm(path, quantize_4bit=True, dtype=dtype, device_map={"": 0 if device == "cuda" else device},
                           attn_implementation="sdpa")
    if device == "cpu":
        backends.keep_cpu_4bit_layout_trainable(model)
    model.config.use_cache = False
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n)
    model.enable_input_require_grads()
    if offload:
        activation_offload.enable(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    fast_lora.fuse_lora_forward(model)
    return model.train()


def _train(model, batches, accumulation: int = 2):
    """Per optimizer step: the micro-batch losses and the accumulated LoRA gradients; AdamW steps in between."""
    torch.manual_seed(123)  # LoRA dropout draws the same masks in both runs
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for start in range(0, len(batches), accumulation):
        for batch in batches[start:start + accumulation]:
            out = model(**batch, use_cache=False)
            (out.loss / accumulation).backward()
            losses.append(out.loss.detach().clone())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _layers(model):
    from hai_medqa.train.compile_regions import decoder_layers

    return decoder_layers(model)


@pytest.mark.parametrize("every_n", [1, 2])
def test_offloading_trains_bitwise_like_keeping_the_inputs(tiny_llama_dir, every_n):
    """Two optimizer steps of two micro-batches each: every micro-batch loss and every LoRA gradient equal
    bit for bit with and without offloading; the hooks moved exactly the checkpointed layers' inputs."""
    batches = packed_label_batches(4)
    ref_losses, ref_grads = _train(_model(tiny_llama_dir, every_n=every_n, offload=False), batches)
    model = _model(tiny_llama_dir, every_n=every_n, offload=True)
    losses, grads = _train(model, batches)
    for i, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert torch.equal(a, b), f"micro-batch {i + 1}: loss {b.item()!r} vs {a.item()!r}"
    for step, (ga, gb) in enumerate(zip(ref_grads, grads, strict=True)):
        assert ga.keys() == gb.keys() and len(ga) == 2 * len(TARGETS) * model.config.num_hidden_layers
        for name in ga:
            assert torch.equal(ga[name], gb[name]), (
                f"step {step + 1}: {name} differs by {(gb[name] - ga[name]).abs().max().item():.2e}")
    layers = _layers(model)
    checkpointed = [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]
    assert checkpointed == list(range(0, len(layers), every_n))
    stats = activation_offload.offloader_of(model).stats
    # one saved tensor (the layer input) per checkpointed layer and micro-batch; layer 0's is the embedding
    # output, a leaf the graph holds anyway, so it stays; each other one goes out, comes back once, all but the
    # first of each backward already prefetched one layer ahead
    offloaded = len(checkpointed) - 1
    # (empty placeholders are counted apart: torch 2.11's checkpoint saves one per call, 2.13's none; on the
    # GPU image's 2.11 this count read 16 and 12 here when empties were counted as kept, 2026-11-30)
    assert stats.kept == len(batches)
    assert stats.packed == stats.unpacked == offloaded * len(batches)
    assert stats.prefetched == (offloaded - 1) * len(batches)
    hidden = model.config.hidden_size
    assert stats.packed_bytes == offloaded * len(batches) * 48 * hidden * 4  # tokens x hidden x fp32


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_layer_inputs_are_not_kept_in_device_memory(tiny_llama_dir, offload):
    """After the forward, a checkpointed layer's input tensor is freed when offloaded (only its host copy
    lives on) and alive without offloading (the checkpoint holds it); non-checkpointed layers keep theirs,
    and so does layer 0 (its input, the embedding output, is a leaf the graph holds)."""
    model = _model(tiny_llama_dir, every_n=2, offload=offload)
    layers = _layers(model)
    inputs: dict[int, weakref.ref] = {}
    handles = [layer.register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: inputs.__setitem__(i, weakref.ref(args[0] if args else kwargs["hidden_states"])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    batch = packed_label_batches(1)[0]
    out = model(**batch, use_cache=False)
    gc.collect()
    for h in handles:
        h.remove()
    alive = {i: ref() is not None for i, ref in sorted(inputs.items())}
    checkpointed = {i for i, layer in enumerate(layers) if layer.gradient_checkpointing}
    assert checkpointed == {0, 2}
    assert alive == {0: True, 1: True, 2: not offload}
    out.loss.backward()  # and the backward still finds every input
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_stored_copies_are_host_tensors_of_their_own(tiny_llama_dir):
    """What the pack hook keeps is a CPU tensor with its own storage (not a view of the device tensor)."""
    offloader = activation_offload.ActivationOffloader()
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2
    with offloader.hooks():
        y = torch.utils.checkpoint.checkpoint(lambda t: torch.sin(t) * t, h, use_reentrant=False)
    handle = offloader._last()
    assert handle is not None and handle.host.device.type == "cpu"
    assert handle.host.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
    assert torch.equal(handle.host, h.detach())
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)  # the same function, no checkpoint, no hooks
    h2 = x2 * 2
    (torch.sin(h2) * h2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert offloader.stats.packed == offloader.stats.unpacked == 1


def test_enable_refuses_a_model_without_checkpointed_layers(tiny_llama_dir):
    model = load_causal_lm(tiny_llama_dir, quantize_4bit=False, dtype=torch.float32, device_map={"": "cpu"},
                           attn_implementation="sdpa")
    with pytest.raises(ValueError, match="needs activation checkpointing"):
        activation_offload.enable(model)
    model.activation_checkpointing_enable({"use_reentrant": False})
    first = activation_offload.enable(model)
    assert activation_offload.enable(model) is first  # idempotent: no double wrapping
    fn = _layers(model)[0]._gradient_checkpointing_func
    assert isinstance(fn, activation_offload.OffloadingCheckpoint)
    assert not isinstance(fn.checkpoint_fn, activation_offload.OffloadingCheckpoint)


def test_config_refuses_offloading_without_checkpointing():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, {"offload_activations": "true", "gradient_checkpointing": "false"})
    assert "\n" not in str(e.value) and "offload_activations" in str(e.value)
    assert "gradient_checkpointing" in str(e.value)
    cfg, _ = load_config(TrainConfig, None, {"offload_activations": "true"})  # default: checkpointing on
    assert cfg.offload_activations and cfg.gradient_checkpointing
    assert TrainConfig().offload_activations is False  # opt-in
    # profile fast turns checkpointing off: refused once the profile is applied
    fast = TrainConfig(profile="fast", offload_activations=True)
    with pytest.raises(ConfigError, match="offload_activations: true needs gradient_checkpointing"):
        settle_config(fast, {"profile", "offload_activations"}, on_gpu=True, fsdp_version=None, resume=False)


def test_profile_auto_keeps_checkpointing_when_offloading_is_asked():
    """auto would pick fast on a GPU large enough; with offload_activations it picks lean (checkpointed)."""
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 1000,
             "num_attention_heads": 4}
    huge_gpu = 200 * 2**30
    _, name = resolve_profile(TrainConfig(), set(), on_gpu=True, model_config=small, gpu_memory_bytes=huge_gpu)
    assert name == "fast"
    cfg, name = resolve_profile(TrainConfig(offload_activations=True), {"offload_activations"}, on_gpu=True,
                                model_config=small, gpu_memory_bytes=huge_gpu)
    assert name == "lean" and cfg.gradient_checkpointing


@pytest.mark.skipif(not CUDA, reason="the CUDA path (copy stream, events, record_stream) needs a GPU")
def test_cuda_offload_matches_and_frees_device_memory(tiny_llama_dir):
    """On a GPU: the same losses and gradients, and the checkpointed inputs are not held on the device between
    forward and backward. Float tolerance here, not bitwise: the copies are exact, but GPU attention backward
    kernels may accumulate with atomics, so two runs of the same model can differ in the last bits."""
    batches = packed_label_batches(4, length=512, device="cuda")
    ref = _train(_model(tiny_llama_dir, every_n=1, offload=False, device="cuda"), batches)
    model = _model(tiny_llama_dir, every_n=1, offload=True, device="cuda")
    got = _train(model, batches)
    for a, b in zip(ref[0], got[0], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
    for ga, gb in zip(ref[1], got[1], strict=True):
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
    assert activation_offload.offloader_of(model).stats.prefetched > 0
    torch.cuda.synchronize()
    held = []
    for offload in (False, True):
        m = model if offload else _model(tiny_llama_dir, every_n=1, offload=False, device="cuda")
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = m(**batches[0], use_cache=False)
        torch.cuda.synchronize()
        torch.empty(1, device="cuda")  # an allocation processes the copy stream's record_stream events
        held.append(torch.cuda.memory_allocated() - before)
        out.loss.backward()
        del out
    layer_input = 512 * model.config.hidden_size * 4
    assert held[0] - held[1] >= (model.config.num_hidden_layers - 1) * layer_input  # all but layer 0's


def test_offloading_wraps_the_checkpoint_of_compiled_layers(tiny_llama_dir):
    """compile_layers takes each layer's checkpoint function outside the compiled region: with offloading it
    takes the offloading one, so the inputs still go to the host; losses and gradients as eager without
    offloading (float tolerance: the aot_eager region may order float ops differently from eager)."""
    import torch._dynamo

    from hai_medqa.train import compile_regions

    batches = packed_label_batches(2)
    ref_losses, ref_grads = _train(_model(tiny_llama_dir, every_n=1, offload=False), batches, accumulation=1)
    torch._dynamo.reset()
    try:
        model = _model(tiny_llama_dir, every_n=1, offload=True)
        compile_regions.compile_decoder_layers(model, dynamic=False, backend="aot_eager")
        assert isinstance(_layers(model)[1]._compiled_call_impl.checkpoint_fn, activation_offload.OffloadingCheckpoint)
        losses, grads = _train(model, batches, accumulation=1)
    finally:
        torch._dynamo.reset()
    for a, b in zip(ref_losses, losses, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    for ga, gb in zip(ref_grads, grads, strict=True):
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6, msg=name)
    stats = activation_offload.offloader_of(model).stats
    assert stats.packed == stats.unpacked == (model.config.num_hidden_layers - 1) * len(batches)
