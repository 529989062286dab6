"""The streaming merge against PEFT itself: same logits, same weights, in every mode and layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hai_medqa.merge import AdapterError, MergeError, merge_adapter, nf4_roundtrip
from hai_medqa.merge.nf4 import NF4Settings
from hai_medqa.merge.safetensors_stream import PlannedTensor, StreamingShardWriter, read_header, read_tensor

IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 250, 12, 64, 3, 18, 200, 40, 2, 77, 150, 90]])


def _peft_model(base_llama, adapter_dir, **load_kwargs):
    from peft import PeftModel

    from hai_medqa.model.load import load_causal_lm

    model = load_causal_lm(base_llama, dtype=torch.float32, **load_kwargs)
    return PeftModel.from_pretrained(model, adapter_dir)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _plain_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_merged_llama_layout_equals_peft(variant, request, tmp_path):
    from hai_medqa.model.convert import ensure_llama_checkpoint

    base = request.getfixturevalue("tiny_exaone_dir" if variant == "untied" else "tiny_exaone_tied_dir")
    run = request.getfixturevalue("tiny_lora_run" if variant == "untied" else "tiny_lora_run_tied")
    out = tmp_path / "merged"
    merge_adapter(base, run / "adapter_best", out)  # from the EXAONE layout, streamed and renamed

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg
    merged = _plain_load(out)  # plain transformers, no remote code
    peft_model = _peft_model(ensure_llama_checkpoint(base), run / "adapter_best")
    # Different float summation order (x@W' vs x@W + s*(x@A)@B) is the only difference: fp32 noise.
    torch.testing.assert_close(_logits(merged), _logits(peft_model), atol=1e-5, rtol=0)

    # The merged weights themselves equal PEFT's own merge_and_unload bit for bit.
    reference = peft_model.merge_and_unload().state_dict()
    ours = merged.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"):
        assert torch.equal(ours[name], reference[name]), name
    # ...and they really changed (the adapter has non-zero deltas).
    base_sd = {k: v for f in ensure_llama_checkpoint(base).glob("*.safetensors") for k, v in load_file(f).items()}
    changed = [n for n in base_sd if not torch.equal(base_sd[n], ours[n])]
    assert len(changed) == 21 and all(n.endswith("_proj.weight") for n in changed)
    shard_names = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert ("lm_head.weight" in shard_names) == (variant == "untied")
    assert merged.config.tie_word_embeddings == (variant == "tied")


def test_exaone_layout_loads_back_with_identical_logits(tiny_exaone_dir, tiny_lora_run, tmp_path):
    from hai_medqa.model.load import load_causal_lm

    llama_out, exaone_out = tmp_path / "llama", tmp_path / "exaone"
    merge_adapter(tiny_exaone_dir, tiny_lora_run / "adapter_best", llama_out)
    merge_adapter(tiny_exaone_dir, tiny_lora_run / "adapter_best", exaone_out, layout="exaone", max_shard_bytes=200_000)

    cfg = json.loads((exaone_out / "config.json").read_text())
    assert cfg["model_type"] == "exaone" and cfg["architectures"] == ["ExaoneForCausalLM"]
    assert all("--" in ref for ref in cfg["auto_map"].values())  # points at the Hub code, none shipped
    names = {k for f in exaone_out.glob("*.safetensors") for k in read_header(f)[0]}
    assert "transformer.h.0.attn.attention.out_proj.weight" in names and not any(n.startswith("model.") for n in names)
    assert len(list(exaone_out.glob("model-*.safetensors"))) >= 2
    index = json.loads((exaone_out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names

    # From the converted Llama folder, the original EXAONE config comes back (the conversion record).
    from hai_medqa.model.convert import ensure_llama_checkpoint

    merge_adapter(ensure_llama_checkpoint(tiny_exaone_dir), tiny_lora_run / "adapter_best", tmp_path / "ex2",
                  layout="exaone")
    assert json.loads((tmp_path / "ex2" / "config.json").read_text()) == cfg

    # EXAONE's remote code cannot run here; the project's loader converts it back to Llama.
    back = load_causal_lm(exaone_out, dtype=torch.float32)
    assert torch.equal(_logits(back), _logits(_plain_load(llama_out)))


def test_rslora_scaling_matches_peft(tiny_llama_dir, tmp_path):
    """alpha/sqrt(r) scaling: every merged weight equals PEFT's own merge bit for bit."""
    from conftest import make_lora_run

    run = make_lora_run(tiny_llama_dir, tmp_path / "run", seed=3, use_rslora=True)
    merge_adapter(tiny_llama_dir, run / "adapter_best", tmp_path / "out")
    ours = {k: v for f in (tmp_path / "out").glob("*.safetensors") for k, v in load_file(f).items()}
    reference = _peft_model(tiny_llama_dir, run / "adapter_best").merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_nf4_merge_reproduces_training_forward(tiny_exaone_dir, tiny_llama_dir, tiny_lora_run, tmp_path):
    adapter = tiny_lora_run / "adapter_best"
    merge_adapter(tiny_exaone_dir, adapter, tmp_path / "nf4", merge_into="nf4")
    merge_adapter(tiny_exaone_dir, adapter, tmp_path / "orig")
    info = json.loads((tmp_path / "nf4" / "merge_info.json").read_text())
    assert info["merge_into"] == "nf4" and info["nf4"]["quant_type"] == "nf4" and info["nf4"]["double_quant"]

    # The training model: base loaded in 4-bit NF4 + the adapter, in train mode. (bitsandbytes swaps
    # in an AVX512-bf16 packed kernel on CPU in eval mode; training always runs dequantise+matmul.)
    training = _peft_model(tiny_llama_dir, adapter, quantize_4bit=True)
    training.train()
    q_layer = training.base_model.model.model.layers[1].mlp.up_proj.base_layer
    import bitsandbytes.functional as bnbf

    held = bnbf.dequantize_4bit(q_layer.weight.data, q_layer.weight.quant_state)
    name = "model.layers.1.mlp.up_proj.weight"
    original = next(load_file(f)[name] for f in tiny_llama_dir.glob("*.safetensors") if name in read_header(f)[0])
    assert torch.equal(nf4_roundtrip(original, NF4Settings.from_project()), held)  # our round trip is bnb's

    expected = _logits(training)
    # The NF4-dequantised weights + delta in fp32: same math as training, only summation order
    # differs, so the fp32 tolerance holds.
    torch.testing.assert_close(_logits(_plain_load(tmp_path / "nf4")), expected, atol=1e-5, rtol=0)
    # Merging into the original weights gives a visibly different model (the NF4 error).
    assert (_logits(_plain_load(tmp_path / "orig")) - expected).abs().max() > 1e-3


def test_other_model_adapter_refused_before_writing(tiny_exaone_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "a")
    with pytest.raises(MergeError, match="another model"):
        merge_adapter(tiny_exaone_dir, tmp_path / "a", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_incomplete_adapter_refused(tiny_exaone_dir, tiny_lora_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_lora_run / "adapter_best", adapter)
    weights = load_file(adapter / "adapter_model.safetensors")
    dropped = {k: v for k, v in weights.items() if "layers.2.self_attn.k_proj" not in k}
    assert len(dropped) == len(weights) - 2
    save_file(dropped, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"targets 1 module.*layers\.2\.self_attn\.k_proj"):
        merge_adapter(tiny_exaone_dir, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 8}, "rank 4 but the config says r=8"),
])
def test_unsupported_adapter_features_refused(tiny_exaone_dir, tiny_lora_run, tmp_path, change, message):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_lora_run / "adapter_best", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(change)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        merge_adapter(tiny_exaone_dir, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_unless_overwrite(tiny_exaone_dir, tiny_lora_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="already exists"):
        merge_adapter(tiny_exaone_dir, tiny_lora_run / "adapter_best", out)
    assert (out / "keep.txt").read_text() == "mine"
    for unsafe in (tiny_lora_run, tiny_lora_run / "adapter_best", tiny_lora_run / "adapter_best" / "x",
                   tiny_exaone_dir):
        with pytest.raises(MergeError, match="overlaps"):
            merge_adapter(tiny_exaone_dir, tiny_lora_run / "adapter_best", unsafe, overwrite=True)
    assert (tiny_lora_run / "adapter_best" / "adapter_model.safetensors").is_file()


def test_side_files(tiny_exaone_dir, tiny_lora_run, tmp_path):
    from hai_medqa.chat_format import EOT, render
    from hai_medqa.model.load import load_tokenizer

    out = tmp_path / "out"
    merge_adapter(tiny_exaone_dir, tiny_lora_run, out)  # a run folder resolves to adapter_best/
    tok = load_tokenizer(out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(EOT) != gen["pad_token_id"] == tok.pad_token_id
    msgs = [{"role": "user", "content": "두통이 심해요"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render(msgs, True)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["adapted_weights"] == 21 and info["layout"] == "llama" and info["base_layout"] == "exaone"
    # Merging only merges: the license, the run's files and the card are the release's (tests/publish).
    assert not (out / "LICENSE").exists() and not (out / "training").exists() and not (out / "README.md").exists()


def test_streaming_writer_roundtrip_bf16(tmp_path):
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2)}
    path = tmp_path / "x.safetensors"
    plan = [PlannedTensor(k, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32"}[v.dtype],
                          tuple(v.shape)) for k, v in tensors.items()]
    with StreamingShardWriter(path, plan, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(path)  # the reference reader
    infos, meta = read_header(path)
    assert meta == {"format": "pt"}
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v) and torch.equal(read_tensor(infos[k]), v)
    with pytest.raises(RuntimeError, match="missing"), StreamingShardWriter(tmp_path / "y.safetensors", plan, {}) as w:
        w.write("a", tensors["a"])


def test_adapter_with_exaone_module_names_merges_identically(tiny_exaone_dir, tiny_lora_run, tmp_path):
    """An adapter trained on EXAONE's own module names (remote-code training) maps through the one
    name table to the same merge as the Llama-named adapter."""
    from hai_medqa.model.exaone_layout import llama_to_exaone_name

    prefix = "base_model.model."
    src = tiny_lora_run / "adapter_best"
    adapter = tmp_path / "exaone_named"
    shutil.copytree(src, adapter)
    renamed = {}
    for key, value in load_file(src / "adapter_model.safetensors").items():
        module, _, rest = key[len(prefix):].rpartition(".lora_")
        renamed[prefix + llama_to_exaone_name(module + ".weight").removesuffix(".weight") + ".lora_" + rest] = value
    save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc_0", "c_fc_1", "c_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    merge_adapter(tiny_exaone_dir, src, tmp_path / "a")
    merge_adapter(tiny_exaone_dir, adapter, tmp_path / "b")
    a, b = (load_file(next((tmp_path / d).glob("model-*.safetensors"))) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_imports_no_later_stage():
    """Merging only merges: no module of hai_medqa.merge imports the release stage or any stage that
    runs after training (issue 12: the only upward import was merge -> publish)."""
    import ast
    from pathlib import Path

    import hai_medqa.merge

    forbidden = ("hai_medqa.publish", "hai_medqa.train", "hai_medqa.inference", "hai_medqa.evaluation")
    found = []
    for path in sorted(Path(hai_medqa.merge.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith(forbidden)]
    assert found == []
