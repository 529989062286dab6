"""The merged folder carries what other engines read (issue 16): legacy RoPE keys derived from
rope_parameters, a tokenizer class transformers 4.x knows, EOS/pad in the generation config. The
check against transformers 4.57.6 itself is tests/engines/test_transformers4.py."""

from __future__ import annotations

import json

import pytest
import torch

from hai_medqa.merge.engine_config import (
    PORTABLE_TOKENIZER_CLASS,
    legacy_rope_keys,
    make_tokenizer_config_portable,
    with_legacy_rope_keys,
)


def test_legacy_keys_derived_from_rope_parameters():
    cfg = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 123.0, "factor": 4.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 2.0, "original_max_position_embeddings": 16}}
    out = with_legacy_rope_keys(cfg)
    assert out["rope_theta"] == 123.0
    assert out["rope_scaling"] == {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 2.0, "original_max_position_embeddings": 16}
    assert out["rope_parameters"] == cfg["rope_parameters"] and "rope_theta" not in cfg  # input untouched
    plain = legacy_rope_keys({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain == {"rope_theta": 5e5, "rope_scaling": None}
    assert legacy_rope_keys({"hidden_size": 8}) == {}


@pytest.fixture(scope="module")
def merged(tiny_exaone_dir, tiny_lora_run, tmp_path_factory):
    from hai_medqa.merge import merge_adapter

    return merge_adapter(tiny_exaone_dir, tiny_lora_run / "adapter_best",
                         tmp_path_factory.mktemp("ec") / "merged").output


def test_merged_folder_has_engine_keys(merged):
    from hai_medqa.chat_format import EOT

    cfg = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    rp = cfg["rope_parameters"]
    assert cfg["rope_theta"] == rp["rope_theta"]
    assert cfg["rope_scaling"] == {k: v for k, v in rp.items() if k != "rope_theta"}
    assert cfg["rope_scaling"]["rope_type"] == "llama3"  # the tiny model is scaled on purpose
    tok_cfg = json.loads((merged / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert tok_cfg["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    assert tok_cfg["add_bos_token"] is False and "is_local" not in tok_cfg
    tok = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    eot_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == EOT)
    pad_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == tok_cfg["pad_token"])
    gen = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == eot_id and gen["pad_token_id"] == pad_id != eot_id


def test_transformers5_reads_the_same_model_with_and_without_legacy_keys(merged, tmp_path):
    """The legacy keys change nothing for transformers 5 (it reads rope_parameters)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = tmp_path / "bare"
    shutil.copytree(merged, bare)
    cfg = json.loads((bare / "config.json").read_text(encoding="utf-8"))
    cfg.pop("rope_theta"), cfg.pop("rope_scaling")
    (bare / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(merged)  # the portable class loads in transformers 5
    ids = torch.tensor([tok("[|user|]두통이 심해요 123\n[|assistant|]").input_ids])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(bare, dtype=torch.float32).eval()(ids).logits
    assert torch.equal(a, b)


def test_tokenizer_config_rewrite_keeps_other_keys(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "eos_token": "[|endofturn|]", "is_local": True,
         "local_files_only": False, "add_bos_token": False}), encoding="utf-8")
    make_tokenizer_config_portable(tmp_path)
    data = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert data == {"tokenizer_class": PORTABLE_TOKENIZER_CLASS, "eos_token": "[|endofturn|]",
                    "add_bos_token": False, "add_eos_token": False}
