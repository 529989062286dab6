"""The adapter-only release loads with plain PEFT onto a model with EXAONE-3.5's own module names, and
its Llama-named original onto a Llama-layout copy; both give the project's merged model's logits."""

from __future__ import annotations

import ast
import json
import re
import warnings

import torch
from safetensors.torch import load_file
from torch import nn

from hai_medqa.publish.release import make_release

BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 250, 12, 64, 3, 18, 200, 40, 2, 77, 150, 90]])


class _Attention(nn.Module):
    """EXAONE's attention holder: ``attn.attention.{q,k,v,out}_proj`` (out_proj is Llama's o_proj)."""


def _exaone_named(llama) -> nn.Module:
    """The Llama model's own modules re-hung under EXAONE-3.5's module names (transformer.wte,
    transformer.h.N.attn.attention.out_proj, mlp.c_fc_0, ...), so its state dict has exactly the keys
    of an EXAONE checkpoint. The forward is Llama's, reading the renamed modules through properties:
    a module PEFT replaces under its EXAONE name is the one the forward uses."""
    attn_cls = type(llama.model.layers[0].self_attn)
    mlp_cls = type(llama.model.layers[0].mlp)
    renamed_attn = type("ExaoneAttention", (attn_cls,), {"o_proj": property(lambda self: self.out_proj)})
    renamed_mlp = type("ExaoneMLP", (mlp_cls,), {
        "gate_proj": property(lambda self: self.c_fc_0), "up_proj": property(lambda self: self.c_fc_1),
        "down_proj": property(lambda self: self.c_proj)})

    root = nn.Module()
    root.transformer = nn.Module()
    root.transformer.wte = llama.model.embed_tokens
    blocks = nn.ModuleList()
    for layer in llama.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn._modules["out_proj"] = attn._modules.pop("o_proj")
        attn.__class__ = renamed_attn
        for old, new in (("gate_proj", "c_fc_0"), ("up_proj", "c_fc_1"), ("down_proj", "c_proj")):
            mlp._modules[new] = mlp._modules.pop(old)
        mlp.__class__ = renamed_mlp
        block = nn.Module()
        block.ln_1, block.ln_2, block.mlp = layer.input_layernorm, layer.post_attention_layernorm, mlp
        block.attn = _Attention()
        block.attn.attention = attn
        blocks.append(block)
    root.transformer.h = blocks
    root.transformer.ln_f = llama.model.norm
    root.lm_head = llama.lm_head
    object.__setattr__(root, "_llama", llama)  # not a submodule: PEFT sees only the EXAONE names
    root.forward = lambda input_ids: llama(input_ids=input_ids)
    root.config = llama.config
    return root


def _exaone_model(exaone_dir) -> nn.Module:
    """A model built with EXAONE's module names, holding the EXAONE checkpoint's weights (loaded
    strictly: every checkpoint key lands on a module of that name)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hai_medqa.model.exaone_layout import exaone_config_to_llama

    config = exaone_config_to_llama(json.loads((exaone_dir / "config.json").read_text()))
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures",
                                                                                          "model_type")}))
    model = _exaone_named(llama).float().eval()
    state = {k: v for f in sorted(exaone_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_released_adapter_loads_on_exaone_module_names(licensed_base, tiny_lora_run, tmp_path):
    from peft import PeftModel

    released, merged = tmp_path / "adapter_release", tmp_path / "merged"
    make_release(str(licensed_base), tiny_lora_run, released, adapter_only=True, base_model=BASE_ID)
    make_release(str(licensed_base), tiny_lora_run, merged, base_model=BASE_ID)

    cfg = json.loads((released / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == BASE_ID
    assert cfg["target_modules"] == ["c_fc_0", "c_fc_1", "c_proj", "k_proj", "out_proj", "q_proj", "v_proj"]
    keys = set(load_file(released / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.attention.out_proj.lora_A.weight" in keys
    assert not any(".model.layers." in k for k in keys)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about missing or unexpected adapter keys
        model = PeftModel.from_pretrained(_exaone_model(licensed_base), str(released))
    check = model.load_adapter(str(released), adapter_name="check")  # the same load, with its key report
    assert check.missing_keys == [] and check.unexpected_keys == []
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".default." in k}
    assert set(loaded) == keys  # every adapter tensor landed, and nothing else is LoRA
    assert all(torch.equal(loaded[k], v) for k, v in load_file(released / "adapter_model.safetensors").items())

    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()  # the project's merge
    torch.testing.assert_close(_logits(model), _logits(ours), atol=1e-5, rtol=0)
    assert (_logits(model) - _logits(_exaone_model(licensed_base))).abs().max() > 1e-3  # the adapter acts


def test_llama_subfolder_loads_on_a_llama_layout_copy(licensed_base, tiny_llama_dir, tiny_lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    released, merged = tmp_path / "adapter_release", tmp_path / "merged"
    make_release(str(licensed_base), tiny_lora_run, released, adapter_only=True, base_model=BASE_ID)
    make_release(str(licensed_base), tiny_lora_run, merged, base_model=BASE_ID)
    assert json.loads((released / "llama" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(released), subfolder="llama").eval()
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(model), _logits(ours), atol=1e-5, rtol=0)


def test_adapter_card_usage_needs_only_transformers_and_peft(licensed_base, tiny_lora_run, tmp_path):
    released = tmp_path / "adapter_release"
    make_release(str(licensed_base), tiny_lora_run, released, adapter_only=True, base_model=BASE_ID)
    card = (released / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)
    imported = {(n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
                for n in ast.walk(ast.parse(snippet)) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported == {"transformers", "peft"}
    assert f'"{BASE_ID}"' in snippet and "PeftModel.from_pretrained(base" in snippet
    assert 'subfolder="llama"' in card  # how to use it on a Llama-layout copy
    assert "hai_medqa" not in snippet
