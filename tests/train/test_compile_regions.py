"""Compiled decoder layers (`compile_layers`, hai_medqa/train/compile_regions.py) train like the eager ones.

On the CPU the region is compiled with the ``aot_eager`` backend: dynamo captures each layer (NF4 matmuls,
the fused LoRA forward, sdpa, RoPE, norms) and AOTAutograd differentiates it exactly as it does for
inductor, but the captured graphs run eagerly - so these checks are fast and exact. Inductor itself
(generated C++ kernels, fused rounding) is `test_inductor_layers_match_eager`: ~45 s of cold C++
compilation on the 2-core machine, so it is opt-in (HAI_TEST_COMPILE_SLOW=1), like
`test_flex_attention_forward_in_the_region_with_variable_rows` (flex attention's mask builder compiles with
inductor; flex has no CPU backward, so only the forward is checked there). Liger needs CUDA, and flex
attention's backward a GPU: `test_gpu_flex_liger_layers_match_eager` runs only on a GPU.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch._dynamo
from loguru import logger
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from hai_medqa.config import ConfigError, load_config
from hai_medqa.fixtures.tiny_model import packed_label_batches
from hai_medqa.model.load import load_causal_lm
from hai_medqa.train import backends, checkpoint, compile_regions, fast_lora
from hai_medqa.train.config import TrainConfig, check_fsdp_requirements
from hai_medqa.train.trainer import run_training

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled graphs and zeroed dynamo counters (they are process-wide)."""
    from torch._dynamo.utils import counters

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model trains fastest on one thread
    torch._dynamo.reset()
    counters.clear()
    compile_regions.reset_compile_stats()
    yield
    torch._dynamo.reset()
    counters.clear()
    compile_regions.reset_compile_stats()
    torch.set_num_threads(threads)


def _model(path, *, checkpointing: bool, device="cpu", dtype=torch.float32, attn="sdpa", liger=False):
    """The trainer's model build in small: NF4 base, checkpointing, LoRA (non-zero B), fused forward."""
    model = load_causal_lm(path, quantize_4bit=True, dtype=dtype, device_map={"": 0 if device == "cuda" else device},
                           attn_implementation=attn)
    if device == "cpu":
        backends.keep_cpu_4bit_layout_trainable(model)
    if liger:
        backends.maybe_apply_liger(model, True, torch.device(device), layer_kernels=False)
    model.config.use_cache = False
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                              init_lora_weights=False, task_type="CAUSAL_LM"))
    fast_lora.fuse_lora_forward(model)
    return model.train()


def _train(model, batches):
    """Loss and LoRA gradients of each step; AdamW steps in between, so step 2 runs on updated weights."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for batch in batches:
        out = model(**batch, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def _assert_same_training(ref, got, *, loss_rtol, grad_atol, grad_rtol):
    (ref_losses, ref_grads), (losses, grads) = ref, got
    for step, (a, b) in enumerate(zip(ref_losses, losses, strict=True)):
        assert abs(a - b) <= loss_rtol * abs(a), f"step {step + 1}: loss {b} vs eager {a}"
    for step, (ga, gb) in enumerate(zip(ref_grads, grads, strict=True)):
        assert ga.keys() == gb.keys() and len(ga) > 0
        for name in ga:
            assert torch.allclose(gb[name], ga[name], atol=grad_atol, rtol=grad_rtol), (
                f"step {step + 1}: {name} differs by {(gb[name] - ga[name]).abs().max().item():.2e}")


class _CallCounter:
    """Wraps a region's compiled callable and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_compiled_layers_train_like_eager(tiny_llama_dir):
    """Checkpointed layers (the lean profile's way): same losses and LoRA gradients over two steps; the
    recomputation reruns the compiled region; evaluation runs the eager layers."""
    batches = packed_label_batches(2)
    ref = _train(_model(tiny_llama_dir, checkpointing=True), batches)

    model = _model(tiny_llama_dir, checkpointing=True)
    n_layers = model.config.num_hidden_layers
    assert compile_regions.compile_decoder_layers(model, dynamic=False, backend="aot_eager") == n_layers
    first = compile_regions.decoder_layers(model)[0]
    # Checkpointing moved outside the region: transformers' own is off inside, ours wraps the compiled call.
    assert first.gradient_checkpointing is False and first._compiled_call_impl.checkpoint_fn is not None
    counter = first._compiled_call_impl.compiled = _CallCounter(first._compiled_call_impl.compiled)
    got = _train(model, batches)
    _assert_same_training(ref, got, loss_rtol=1e-6, grad_atol=1e-6, grad_rtol=1e-5)
    assert counter.calls == 2 * len(batches)  # forward + recomputation in backward, compiled both times
    stats = compile_regions.compile_stats()
    # One graph serves every layer (each layer's input needs a gradient under checkpointing).
    assert stats["region_graphs"] == 1, stats
    assert stats["region_graph_breaks"] == 0 and not stats["recompile_limit_reached"], stats
    # Evaluation runs the eager layers: no call of the region, no new graph for no-grad / eval mode.
    model.eval()
    with torch.no_grad():
        model(input_ids=batches[0]["input_ids"], position_ids=batches[0]["position_ids"], use_cache=False)
    assert compile_regions.compile_stats()["region_graphs"] == 1 and counter.calls == 2 * len(batches)
    # Module and parameter names are untouched (nothing like torch.compile's `_orig_mod` inserted).
    assert all("_orig_mod" not in n for n, _ in model.named_parameters())


def test_compiled_layers_hand_over_gradients_layer_by_layer(tiny_llama_dir):
    """DDP all-reduces a bucket of gradients as soon as it fills, overlapping the backward of the layers below; that
    needs each layer's LoRA gradients released when that layer's backward ends, not all at the end. In the autograd
    graph: one compiled backward node per layer call, each the parent of exactly its own layer's LoRA weights."""
    model = _model(tiny_llama_dir, checkpointing=False)
    compile_regions.compile_decoder_layers(model, dynamic=False, backend="aot_eager")
    layer_of = {id(p): int(n.split("layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**packed_label_batches(1)[0], use_cache=False).loss
    released: list[set[int]] = []  # per compiled backward node: the layers whose weights it hands gradients to
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        children = [fn for fn, _ in node.next_functions if fn is not None]
        if "CompiledFunction" in type(node).__name__:
            released.append({layer_of[id(fn.variable)] for fn in children if type(fn).__name__ == "AccumulateGrad"})
        todo.extend(children)
    n = model.config.num_hidden_layers
    assert sorted(released, key=min) == [{i} for i in range(n)], released
    per_layer = sum(1 for i in layer_of.values() if i == 0)
    assert per_layer == 2 * len(TARGETS)  # A and B of every projection


# A stand-in model for the region's bookkeeping (graphs, recompiles, breaks): compiles in a fraction of a second.
class ToyDecoderLayer(torch.nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.graph_break = graph_break

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.proj(hidden)
        if self.graph_break:
            torch._dynamo.graph_break()
        return hidden + torch.nn.functional.silu(h)


class ToyModel(torch.nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(ToyDecoderLayer(graph_break) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _toy_step(model, length):
    x = torch.ones(1, length, 8, requires_grad=True)
    out = model(x)
    out.sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_variable_rows_compile_once_more_then_reuse():
    """dynamic=None (the lean profile's variable rows): a static graph for the first length, one with a
    symbolic length at the first change, then no more recompiles; outputs and gradients as eager."""
    model, ref = ToyModel().train(), ToyModel().train()
    compile_regions.compile_decoder_layers(model, dynamic=None, backend="aot_eager")
    for length in (4, 6, 5, 9):
        (out, grads), (ref_out, ref_grads) = _toy_step(model, length), _toy_step(ref, length)
        assert torch.allclose(out, ref_out) and all(torch.allclose(grads[n], ref_grads[n]) for n in grads)
    stats = compile_regions.compile_stats()
    assert (stats["region_graphs"], stats["region_recompiles"], stats["region_graph_breaks"]) == (2, 1, 0), stats


def test_fixed_shapes_that_change_reach_the_recompile_limit_and_warn():
    """dynamic=False with a new length every step: every step recompiles until the limit; the stats and
    the warning line say that the region fell apart."""
    model = ToyModel().train()
    compile_regions.compile_decoder_layers(model, dynamic=False, backend="aot_eager")
    for length in range(2, 3 + compile_regions.RECOMPILE_LIMIT):
        _toy_step(model, length)
    stats = compile_regions.compile_stats()
    assert stats["recompile_limit_reached"] and stats["region_recompiles"] == compile_regions.RECOMPILE_LIMIT - 1
    assert "recompile limit reached" in _warnings(stats)


def test_graph_breaks_in_the_region_are_counted_and_warned():
    model = ToyModel(graph_break=True).train()
    compile_regions.compile_decoder_layers(model, dynamic=False, backend="aot_eager")
    _toy_step(model, 4)
    stats = compile_regions.compile_stats()
    assert stats["region_graph_breaks"] >= 1 and stats["region_graph_break_reasons"], stats
    assert stats["process_graph_breaks"] >= stats["region_graph_breaks"]
    assert "graph break" in _warnings(stats)
    # the same model without the break: nothing counted, an info line only
    torch._dynamo.reset()
    compile_regions.reset_compile_stats()
    clean = ToyModel().train()
    compile_regions.compile_decoder_layers(clean, dynamic=False, backend="aot_eager")
    _toy_step(clean, 4)
    assert compile_regions.compile_stats()["region_graph_breaks"] == 0
    assert _warnings(compile_regions.compile_stats()) == ""


def _warnings(stats) -> str:
    """The WARNING lines log_compile_stats writes for `stats` ("" when it only informs)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        compile_regions.log_compile_stats(stats, when="in the test")
    finally:
        logger.remove(sink)
    return "".join(lines)


def test_checkpoint_names_strip_torch_compile_wrapper(tiny_llama_dir):
    """A whole-model torch.compile inserts `_orig_mod` into every name; the checkpoint code strips it."""
    model = _model(tiny_llama_dir, checkpointing=False)
    wrapped = torch.compile(model, backend="aot_eager")  # nothing compiles until it is called
    assert any("_orig_mod" in n for n, _ in wrapped.named_parameters())
    assert checkpoint.trained_tensors(wrapped) == checkpoint.trained_tensors(model)
    assert len(checkpoint.trained_tensors(model)) == 2 * len(TARGETS) * model.config.num_hidden_layers


def test_compile_layers_is_refused_under_fsdp():
    with pytest.raises(ConfigError, match="compile_layers"):
        check_fsdp_requirements(TrainConfig(compile_layers=True), {"compile_layers"}, fsdp_version=1)
    check_fsdp_requirements(TrainConfig(compile_layers=True), {"compile_layers"}, fsdp_version=None)  # DDP: fine


def test_trainer_with_compiled_layers_saves_the_same_adapter(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path,
                                                             monkeypatch):
    """The whole run (S_F2.py's path) with compile_layers, fixed rows and no checkpointing (as `fast`):
    same losses, gradient norms and adapter as eager; the compile stats land in summary.json and the log."""
    monkeypatch.setenv(compile_regions.BACKEND_ENV, "aot_eager")

    def run(out, compile_layers):
        overrides = {"model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]), "val_file": "null",
                     "output_dir": str(out), "cache_dir": str(tmp_path / "cache"), "max_steps": "2",
                     "save_steps": "100", "gradient_accumulation_steps": "2", "tokens_per_micro_batch": "512",
                     "max_length": "512", "pad_to_fixed_length": "true", "warmup_ratio": "0", "lora_dropout": "0",
                     "gradient_checkpointing": "false",  # the fast profile's way (the test above: checkpointed)
                     "tensorboard": "false", "compile_layers": str(compile_layers).lower()}
        summary = run_training(*load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", overrides))
        assert summary["status"] == "completed"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        return summary, metrics, load_file(out / "adapter_last" / "adapter_model.safetensors")

    eager_summary, eager_metrics, eager_adapter = run(tmp_path / "eager", False)
    summary, metrics, adapter = run(tmp_path / "compiled", True)
    assert "compile" not in eager_summary
    for a, b in zip(eager_metrics, metrics, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5
    assert adapter.keys() == eager_adapter.keys() and adapter
    changed = 0
    for key, value in eager_adapter.items():
        assert torch.allclose(adapter[key], value, atol=1e-6, rtol=1e-5), key
        changed += int(key.endswith("lora_B.weight") and value.abs().max() > 0)
    assert changed, "the adapter never trained (lora_B still zero): the comparison would be empty"
    stats = summary["compile"]
    # two graphs: the first layer's input needs no gradient without checkpointing, the others' do
    assert stats["layers"] == 3 and stats["region_graphs"] == 2 and stats["region_graph_breaks"] == 0, stats
    log = (tmp_path / "compiled" / "train.log").read_text(encoding="utf-8")
    assert "compiling 3 decoder layers as regions" in log and "compiled layers after the first step" in log


def _has_cpp_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("c++") is not None


SLOW = os.environ.get("HAI_TEST_COMPILE_SLOW") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="inductor's cold C++ compile takes ~45 s of CPU on the 2-core machine; "
                                     "HAI_TEST_COMPILE_SLOW=1")
@pytest.mark.skipif(not _has_cpp_compiler(), reason="CPU inductor needs a C++ compiler (g++)")
def test_inductor_layers_match_eager(tiny_llama_dir):
    """The real backend: inductor's generated (fused) kernels; fp32 rounding apart, the same training."""
    batches = packed_label_batches(2)
    ref = _train(_model(tiny_llama_dir, checkpointing=True), batches)
    model = _model(tiny_llama_dir, checkpointing=True)
    compile_regions.compile_decoder_layers(model, dynamic=False, backend="inductor")
    got = _train(model, batches)
    _assert_same_training(ref, got, loss_rtol=1e-5, grad_atol=1e-4, grad_rtol=1e-3)
    stats = compile_regions.compile_stats()
    assert stats["region_graphs"] == 1 and stats["region_graph_breaks"] == 0, stats


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="flex attention's mask builder compiles with inductor (~25 s on the 2-core "
                                     "machine); HAI_TEST_COMPILE_SLOW=1")
@pytest.mark.skipif(not _has_cpp_compiler(), reason="CPU inductor needs a C++ compiler (g++)")
def test_flex_attention_forward_in_the_region_with_variable_rows(tiny_llama_dir):
    """The lean profile's attention inside the region: flex attention's BlockMask (built outside, per row)
    passes into the compiled layers; rows of new lengths reuse the symbolic-length graph (no recompile per
    step) and the logits equal sdpa's. Training mode without gradients: flex attention has no CPU backward."""
    ref = _model(tiny_llama_dir, checkpointing=False)
    model = _model(tiny_llama_dir, checkpointing=False, attn="flex_attention")
    compile_regions.compile_decoder_layers(model, dynamic=None, backend="aot_eager")
    for length in (128, 256, 192, 200):
        batch = packed_label_batches(1, length)[0]
        with torch.no_grad():
            want = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            got = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        assert (got - want).abs().max().item() < 1e-4, length
    stats = compile_regions.compile_stats()
    assert (stats["region_graphs"], stats["region_graph_breaks"]) == (2, 0), stats


@pytest.fixture(scope="module")
def gpu_llama_dir(tmp_path_factory):
    """A small random Llama with the EXAONE head size (128), the shape flex attention's GPU kernels were
    checked at (tests/train/test_packing_kernels.py); saved as safetensors so it loads in NF4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, vocab_size=512, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("gpu_llama")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.skipif(not CUDA, reason="GPU only: flex attention has no CPU backward; Liger needs CUDA")
@pytest.mark.parametrize("liger", [False, True], ids=["flex", "flex+liger-ce"])
def test_gpu_flex_liger_layers_match_eager(gpu_llama_dir, liger):
    """The GPU profiles' kernels inside the region: NF4 (CUDA), flex attention, and Liger's fused
    cross-entropy outside it; inductor on the GPU, bf16, checkpointed (lean) and fixed rows."""
    if liger:
        pytest.importorskip("liger_kernel")
    batches = packed_label_batches(2, length=256, device="cuda")
    kwargs = {"device": "cuda", "dtype": torch.bfloat16, "attn": "flex_attention", "liger": liger}
    ref = _train(_model(gpu_llama_dir, checkpointing=True, **kwargs), batches)
    model = _model(gpu_llama_dir, checkpointing=True, **kwargs)
    compile_regions.compile_decoder_layers(model, dynamic=False, backend="inductor")
    got = _train(model, batches)
    # bf16: fused kernels round differently, so losses within 1% and each gradient within 5% (relative norm)
    for step, (a, b) in enumerate(zip(ref[0], got[0], strict=True)):
        assert abs(a - b) <= 1e-2 * abs(a), f"step {step + 1}: loss {b} vs eager {a}"
    for step, (ga, gb) in enumerate(zip(ref[1], got[1], strict=True)):
        assert ga.keys() == gb.keys() and ga
        for name in ga:
            err = (gb[name] - ga[name]).norm() / ga[name].norm().clamp_min(1e-12)
            assert err < 5e-2, f"step {step + 1}: {name} differs by {err:.2%} (relative norm)"
    stats = compile_regions.compile_stats()
    assert stats["region_graphs"] == 1 and stats["region_graph_breaks"] == 0, stats
