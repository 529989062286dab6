"""fsdp_lora.configure on one process: which modules stay replicated, and replicas loaded on `meta`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hai_medqa.train import fsdp_lora


def tiny_peft_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=97))
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_replicas_loaded_on_meta_get_real_storage():
    """With cpu_ram_efficient_loading, ranks > 0 hold the model (and PEFT's LoRA) on `meta`; FSDP
    materialises only what it manages, so configure must give the replicated LoRA modules storage
    (broadcast_from_rank0 then fills it) or the first forward on those ranks fails."""
    model = tiny_peft_llama()
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert len(lora) == 8
    lora_params = sum(p.numel() for m in lora for p in m.parameters())
    for m in lora:
        m.to(device="meta")
    plugin = SimpleNamespace(transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    info = fsdp_lora.configure(model, plugin)
    assert info == {"decoder_layers": 2, "replicated_modules": 8, "replicated_params": lora_params}
    assert [id(m) for m in plugin.ignored_modules] == [id(m) for m in lora]
    assert not any(p.is_meta for m in lora for p in m.parameters())
    assert all(p.requires_grad for m in lora for p in m.parameters())
