"""The EXAONE-layout stand-ins look like the real download and are reproducible."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from hai_medqa.chat_format import EOT, EXAONE_CHAT_TEMPLATE, check_tokenizer_template, render
from hai_medqa.model import tiny
from hai_medqa.model.exaone_layout import exaone_config_to_llama, expected_llama_shapes
from hai_medqa.model.load import load_tokenizer
from hai_medqa.model.tiny import SHAPES, build_exaone_checkpoint, build_tokenizer, resolve_shape

REAL_78B_KEYS = {"activation_function", "architectures", "attention_dropout", "auto_map", "bos_token_id",
                 "embed_dropout", "eos_token_id", "head_dim", "hidden_size", "initializer_range",
                 "intermediate_size", "layer_norm_epsilon", "max_position_embeddings", "model_type",
                 "num_attention_heads", "num_key_value_heads", "num_layers", "pad_token_id", "rope_scaling",
                 "rope_theta", "tie_word_embeddings", "torch_dtype", "vocab_size"}


def _tensor_names(folder):
    names = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            names.update(dict.fromkeys(f.keys(), shard.name))
    return names


def test_tiny_checkpoint_has_exaone_layout(tiny_exaone_dir, tiny_exaone_tied_dir):
    cfg = json.loads((tiny_exaone_dir / "config.json").read_text())
    assert set(cfg) >= REAL_78B_KEYS
    assert cfg["model_type"] == "exaone" and cfg["architectures"] == ["ExaoneForCausalLM"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    names = _tensor_names(tiny_exaone_dir)
    assert len(set(names.values())) >= 2  # really sharded
    assert "transformer.wte.weight" in names and "transformer.h.2.mlp.c_fc_0.weight" in names
    assert "lm_head.weight" in names and not any(n.startswith("model.") for n in names)
    index = json.loads((tiny_exaone_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict(sorted(names.items()))

    tied_cfg = json.loads((tiny_exaone_tied_dir / "config.json").read_text())
    tied_names = _tensor_names(tiny_exaone_tied_dir)
    assert tied_cfg["tie_word_embeddings"] is True and "lm_head.weight" not in tied_names
    assert len(set(tied_names.values())) >= 2


def test_tiny_tokenizer_carries_exaone_specials_and_template(tiny_exaone_dir):
    tok = load_tokenizer(tiny_exaone_dir)  # works on the EXAONE layout without remote code
    cfg = json.loads((tiny_exaone_dir / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]
    assert tok.convert_tokens_to_ids("[PAD]") == 0 == cfg["pad_token_id"]
    assert tok.convert_tokens_to_ids("[BOS]") == 1 == cfg["bos_token_id"]
    assert tok.eos_token == EOT and tok.eos_token_id == cfg["eos_token_id"] != tok.pad_token_id
    assert tok.chat_template == EXAONE_CHAT_TEMPLATE
    assert check_tokenizer_template(tok) == []
    # every chat marker is one token, and the transformers tokenizer agrees with the raw tokenizer.json
    text = render([{"role": "user", "content": "당뇨병 식이 요법은?"}], add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == Tokenizer.from_file(str(tiny_exaone_dir / "tokenizer.json")).encode(text).ids
    for marker in ("[|system|]", "[|endofturn|]", "[|user|]", "[|assistant|]"):
        assert tok.convert_tokens_to_ids(marker) in ids
    assert tok.decode(ids) == text
    assert ids[0] != tok.bos_token_id  # the template emits no BOS and neither does tokenization


def test_load_tokenizer_keeps_tokenizer_json_pipeline(tiny_exaone_dir, tmp_path):
    """transformers 5 rebuilds a GPT2Tokenizer from its class recipe and drops the pre-tokenizer in
    tokenizer.json; load_tokenizer must tokenize exactly like the file (the real EXAONE tokenizer's
    pre-tokenizer need not be GPT-2's)."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_exaone_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    text = "두통 123 hello  world"
    assert tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == raw.pre_tokenizer.pre_tokenize_str(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids
    assert tok.eos_token == EOT and tok.pad_token == "[PAD]" and tok.chat_template == EXAONE_CHAT_TEMPLATE


def test_tokenizer_is_trained_on_the_bundled_sample(tmp_path):
    corpus = tiny.sample_corpus()
    if not tiny.SAMPLE_DIR.is_dir():
        pytest.skip("bundled AI Hub sample not present")
    assert corpus != tiny._FALLBACK_CORPUS and len(corpus) > 100
    assert not any(t.startswith("HC-Q-") for t in corpus)  # ids are not text
    a = build_tokenizer(tmp_path / "a")
    b = build_tokenizer(tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()  # reproducible
    tok = Tokenizer.from_file(str(a / "tokenizer.json"))
    # trained merges compress sample text well below one token per byte
    text = corpus[0]
    assert len(tok.encode(text).ids) < len(text.encode("utf-8")) / 2


def test_builder_is_seeded(tmp_path):
    tok = build_tokenizer(tmp_path / "tok", texts=["두통 감기 발열"] * 3)
    a = build_exaone_checkpoint(tmp_path / "a", "tiny", tokenizer_dir=tok, seed=1, max_shard_bytes=10**9)
    b = build_exaone_checkpoint(tmp_path / "b", "tiny", tokenizer_dir=tok, seed=1, max_shard_bytes=10**9)
    c = build_exaone_checkpoint(tmp_path / "c", "tiny", tokenizer_dir=tok, seed=2, max_shard_bytes=10**9)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_custom_shape_respects_shard_limit_and_dtype(tmp_path):
    shape = {"hidden_size": 128, "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "intermediate_size": 256, "vocab_size": 1000}
    limit = 200_000
    out = build_exaone_checkpoint(tmp_path / "m", shape, max_shard_bytes=limit)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_layers"] == 2
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
        total = sum(math.prod(s) * 2 for s in sizes)
        assert total <= limit or len(sizes) == 1
        assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize(("name", "billions", "tied", "head_dim"), [
    ("2.4b", 2.4, True, 80), ("7.8b", 7.8, False, 128), ("32b", 32.0, False, 128)])
def test_named_shapes_have_the_real_sizes(name, billions, tied, head_dim):
    cfg = resolve_shape(name)
    llama = exaone_config_to_llama(cfg)
    n_params = sum(math.prod(s) for s in expected_llama_shapes(llama).values())
    assert abs(n_params / 1e9 - billions) < 0.05 * billions
    assert cfg["tie_word_embeddings"] is tied and llama["head_dim"] == head_dim
    assert llama["rope_parameters"]["rope_type"] == "llama3"


def test_cli(tmp_path, capsys):
    assert tiny.main([str(tmp_path / "cli_tiny"), "--tied"]) == 0
    assert json.loads((tmp_path / "cli_tiny" / "config.json").read_text())["tie_word_embeddings"] is True
    assert tiny.main([str(tmp_path / "x"), "--shape", "70b"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: unknown shape '70b'")
    assert set(SHAPES) == {"tiny", "2.4b", "7.8b", "32b"}
