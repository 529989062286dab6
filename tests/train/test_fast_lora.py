"""The fused LoRA forward and the dequantised-NF4 cache compute exactly what PEFT + bitsandbytes compute.

Both are speed options of the training path (docs/performance.md); these tests hold them to the
plain path's numbers on the real 4-bit tiny model (bitsandbytes NF4 runs on CPU).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hai_medqa.model.load import load_causal_lm
from hai_medqa.train.fast_lora import cache_dequantized_weights, fuse_lora_forward, unfuse_lora_forward

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(path, *, quantize_4bit=True, dropout=0.0):
    model = load_causal_lm(path, quantize_4bit=quantize_4bit, dtype=torch.float32, device_map="cpu")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (2, 24), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("quantize_4bit", [True, False], ids=["nf4", "fp32"])
def test_fused_forward_matches_peft(tiny_llama_dir, batch, quantize_4bit):
    model = _peft_model(tiny_llama_dir, quantize_4bit=quantize_4bit)
    model.train()
    loss_ref, logits_ref, grads_ref = _loss_and_grads(model, batch)
    assert fuse_lora_forward(model) == 7 * model.config.num_hidden_layers
    loss, logits, grads = _loss_and_grads(model, batch)
    assert torch.allclose(logits, logits_ref, atol=1e-5, rtol=0)
    assert abs(loss.item() - loss_ref.item()) < 1e-6
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * model.config.num_hidden_layers
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], atol=1e-5, rtol=1e-4), name
    # The saved adapter does not change: same parameter names, and undoing restores PEFT's forward.
    assert unfuse_lora_forward(model) == 7 * model.config.num_hidden_layers
    assert all("_hai_peft_forward" not in k for k in model.state_dict())


def test_fused_forward_is_really_used_and_falls_back_when_disabled(tiny_llama_dir, batch):
    model = _peft_model(tiny_llama_dir)
    fuse_lora_forward(model)
    model.eval()
    with torch.no_grad():
        with_lora = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():  # PEFT's own forward path (fallback): base model only
            base = model(input_ids=batch["input_ids"]).logits
    assert (with_lora - base).abs().max() > 1e-3  # the adapter contributes (init_lora_weights=False)
    # A layer whose forward is rebound carries the original for the fallback.
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert hasattr(layer, "_hai_peft_forward")


def test_fused_forward_applies_dropout_in_training(tiny_llama_dir, batch):
    model = _peft_model(tiny_llama_dir, dropout=0.5)
    fuse_lora_forward(model)
    model.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(input_ids=batch["input_ids"]).logits
        torch.manual_seed(4)
        b = model(input_ids=batch["input_ids"]).logits
        model.eval()
        c = model(input_ids=batch["input_ids"]).logits
        d = model(input_ids=batch["input_ids"]).logits
    assert (a - b).abs().max() > 1e-4  # different dropout masks
    assert torch.equal(c, d)  # no dropout in eval


def test_dequantized_cache_is_the_nf4_forward(tiny_llama_dir, batch):
    model = _peft_model(tiny_llama_dir)
    model.train()
    loss_ref, logits_ref, grads_ref = _loss_and_grads(model, batch)
    cached = cache_dequantized_weights(model, torch.float32)
    assert cached == 7 * model.config.num_hidden_layers
    assert cache_dequantized_weights(model, torch.float32) == 0  # idempotent
    loss, logits, grads = _loss_and_grads(model, batch)
    assert torch.allclose(logits, logits_ref, atol=1e-5, rtol=0)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], atol=1e-5, rtol=1e-4), name
    # The cached matrices really are the NF4 values, not the original full-precision weights.
    full = load_causal_lm(tiny_llama_dir, quantize_4bit=False, dtype=torch.float32, device_map="cpu")
    w_full = full.model.layers[0].mlp.up_proj.weight
    w_cached = model.base_model.model.model.layers[0].mlp.up_proj.base_layer._hai_dequantized.weight
    assert w_cached.shape == w_full.shape
    assert 0 < (w_cached - w_full).abs().max() < 0.2 * w_full.abs().max()


def test_nf4_in_place_kernel_is_the_fused_forward_without_the_output_copy(tiny_llama_dir, batch):
    """lora_kernel: fused_nf4 adds the LoRA term into bitsandbytes' own NF4 output instead of into a copy of it.
    Its forward must be the fused forward bit for bit (the same gemm_4bit and the same addmm, only in place), its
    gradients the same products (summed in another order at most), and it must really run: every projection
    through the custom operator, none through the copying addmm."""
    from hai_medqa.train import fast_lora

    model = _peft_model(tiny_llama_dir)
    model.train()
    n = 7 * model.config.num_hidden_layers
    assert fuse_lora_forward(model) == n
    loss_ref, logits_ref, grads_ref = _loss_and_grads(model, batch)
    assert unfuse_lora_forward(model) == n and fuse_lora_forward(model, nf4_in_place=True) == n
    calls = []
    real_op = fast_lora.nf4_lora_linear
    fast_lora.nf4_lora_linear = lambda *a: calls.append(1) or real_op(*a)
    try:
        loss, logits, grads = _loss_and_grads(model, batch)
    finally:
        fast_lora.nf4_lora_linear = real_op
    assert len(calls) == n
    assert torch.equal(logits, logits_ref) and torch.equal(loss, loss_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], atol=1e-6, rtol=1e-5), name
    # evaluation (no autograd) goes through the copying path: gemm_4bit's inference route is bitsandbytes' own
    with torch.no_grad():
        calls.clear()
        fast_lora.nf4_lora_linear = lambda *a: calls.append(1) or real_op(*a)
        try:
            eval_logits = model(**batch, use_cache=False).logits
        finally:
            fast_lora.nf4_lora_linear = real_op
    assert calls == [] and torch.equal(eval_logits, logits_ref)


def test_nf4_in_place_kernel_compiles_without_graph_breaks(tiny_llama_dir, batch):
    """Inside torch.compile the operator is one opaque node with its own backward (no graph break, no copy of
    the base output): the compiled step gives the eager step's loss."""
    model = _peft_model(tiny_llama_dir)
    model.train()
    fuse_lora_forward(model, nf4_in_place=True)
    loss_ref, _, _ = _loss_and_grads(model, batch)
    layer = model.base_model.model.model.layers[0]
    import torch._dynamo

    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer.mlp)(torch.randn(2, 24, model.config.hidden_size, requires_grad=True))
    assert explained.graph_break_count == 0, explained.break_reasons
    layer.mlp.compile(backend="aot_eager", fullgraph=True)
    try:
        loss, _, grads = _loss_and_grads(model, batch)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(loss, loss_ref, atol=1e-6) and all(torch.isfinite(g).all() for g in grads.values())
