"""fsdp_lora.configure on one process: which modules stay replicated, and replicas loaded on `meta`."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hai_medqa.train import fsdp_lora


def tiny_peft_llama(tied: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=97,
                                        tie_word_embeddings=tied))
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
    assert info == {"decoder_layers": 2, "embedding_unit": 1, "units": 4, "replicated_modules": 8,
                    "replicated_params": lora_params}
    assert [id(m) for m in plugin.ignored_modules] == [id(m) for m in lora]
    assert not any(p.is_meta for m in lora for p in m.parameters())
    assert all(p.requires_grad for m in lora for p in m.parameters())


def test_the_embedding_is_its_own_unit_unless_tied_to_the_head():
    """An untied input embedding (EXAONE-3.5 7.8B, 32B) is wrapped on its own, so FSDP1 does not keep it gathered
    as part of the root through the whole step; a tied one (2.4B) stays in the root (one weight, one unit)."""
    from functools import partial

    for tied, units in ((False, 4), (True, 3)):
        model = tiny_peft_llama(tied=tied)
        plugin = SimpleNamespace(transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
        info = fsdp_lora.configure(model, plugin)
        assert info["units"] == units and info["embedding_unit"] == (0 if tied else 1)
        policy = plugin.auto_wrap_policy
        assert isinstance(policy, partial)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert policy(embedding, recurse=False, nonwrapped_numel=embedding.weight.numel()) is (not tied)
        assert policy(head, recurse=False, nonwrapped_numel=head.weight.numel()) is False
        assert policy(model.base_model.model.model.layers[0], recurse=False, nonwrapped_numel=1) is True
