"""GGUF export and its release folder (issue 16), read back with llama.cpp's own gguf reader. What
llama.cpp computes from these files is checked by llama.cpp itself in tests/engines/test_llama_cpp.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from hai_medqa.chat_format import EOT
from hai_medqa.publish.gguf_export import (
    GGUFExportError,
    detect_pre_tokenizer,
    export_gguf,
    llama3_rope_factors,
    parse_gguf_types,
)

FAKE_TOKEN = "hf_FAKEtokenVALUE0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def merged(tiny_exaone_dir, tiny_lora_run, tmp_path_factory) -> Path:
    import shutil

    from hai_medqa.publish.release import make_release
    from hai_medqa.run_folder import TrainingRecord, write_training_record

    run = tmp_path_factory.mktemp("gguf_run") / "run"
    shutil.copytree(tiny_lora_run, run)
    write_training_record(run / "adapter_best", TrainingRecord(base_model="LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct",
                                                               system_prompt="너는 의료 상담 챗봇이다."))
    out = tmp_path_factory.mktemp("gguf_merged") / "EXAONE-tiny-HAI-MedQA"
    make_release(str(tiny_exaone_dir), run, out, base_model="LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct")
    return out


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    out["__tensors__"] = {t.name: t for t in reader.tensors}
    return out


def test_type_names():
    assert parse_gguf_types("F16, q8_0,Q4_K_M,f16") == ["f16", "q8_0", "q4_k_m"]
    with pytest.raises(GGUFExportError, match=r"unknown GGUF type 'q9'.*known: .*q4_k_m"):
        parse_gguf_types("f16,q9")
    with pytest.raises(GGUFExportError, match="importance matrix"):
        parse_gguf_types("iq2_xxs")
    with pytest.raises(GGUFExportError, match="no GGUF type"):
        parse_gguf_types(" , ")


def test_pre_tokenizer_recognised_from_structure():
    bpe = {"model": {"type": "BPE"}}
    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    exaone = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, gpt2]}
    assert detect_pre_tokenizer({**bpe, "pre_tokenizer": exaone}) == "exaone"
    assert detect_pre_tokenizer({**bpe, "pre_tokenizer": gpt2}) == "gpt-2"
    with pytest.raises(GGUFExportError, match="neither EXAONE's"):
        detect_pre_tokenizer({**bpe, "pre_tokenizer": {"type": "Metaspace"}})
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        detect_pre_tokenizer({"model": {"type": "Unigram"}, "pre_tokenizer": gpt2})


def test_rope_freqs_equal_transformers_llama3_scaling():
    """rope_freqs (llama.cpp divides each inverse frequency by it) reproduces transformers' own llama3 init."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for window in (32, 8192):
        cfg = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 16, "max_position_embeddings": 1024,
               "rope_parameters": {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": window}}
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**cfg), "cpu")
        base = 1.0 / (1000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        np.testing.assert_allclose(llama3_rope_factors(cfg), (base / scaled).numpy(), rtol=1e-6)
    assert llama3_rope_factors({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}) is None


def test_metadata_and_tensors(merged, tmp_path):
    records = export_gguf(merged, tmp_path, "f32,f16,q8_0", basename="EXAONE-tiny", progress=False)
    assert [r["file"] for r in records] == ["EXAONE-tiny-F32.gguf", "EXAONE-tiny-F16.gguf", "EXAONE-tiny-Q8_0.gguf"]
    cfg = json.loads((merged / "config.json").read_text(encoding="utf-8"))
    tok = json.loads((merged / "tokenizer.json").read_text(encoding="utf-8"))
    eot = next(t["id"] for t in tok["added_tokens"] if t["content"] == EOT)
    f = _fields(tmp_path / "EXAONE-tiny-F32.gguf")
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == cfg["num_hidden_layers"] and f["llama.rope.freq_base"] == cfg["rope_theta"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == detect_pre_tokenizer(tok)
    assert f["tokenizer.ggml.eos_token_id"] == eot and f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text(encoding="utf-8")
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"] and f["tokenizer.ggml.tokens"][eot] == EOT
    assert f["tokenizer.ggml.token_type"][eot] == 3  # CONTROL: never produced from plain text by accident
    tensors = f["__tensors__"]
    assert len(tensors) == 1 + 3 + 9 * cfg["num_hidden_layers"]  # rope_freqs, embed/norm/output, 9 per layer
    np.testing.assert_array_equal(tensors["rope_freqs.weight"].data, llama3_rope_factors(cfg))
    q8 = _fields(tmp_path / "EXAONE-tiny-Q8_0.gguf")["__tensors__"]
    assert q8["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert q8["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms stay F32, as llama.cpp's converter does
    assert _fields(tmp_path / "EXAONE-tiny-F16.gguf")["__tensors__"]["output.weight"].tensor_type.name == "F16"


def test_q_and_k_rows_permuted_to_ggml_rope_order(merged, tmp_path):
    """llama.cpp rotates adjacent pairs; HF rotates halves. The q/k rows are regrouped accordingly,
    every other tensor is copied unchanged."""
    from safetensors.numpy import load_file

    export_gguf(merged, tmp_path, "f32", basename="m", progress=False)
    t = _fields(tmp_path / "m-F32.gguf")["__tensors__"]
    (shard,) = sorted(merged.glob("*.safetensors"))
    hf = load_file(shard)
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    head_dim = 16
    got = np.asarray(t["blk.1.attn_q.weight"].data)
    # Row r of head h in GGML order is HF row (r // 2) + (r % 2) * head_dim / 2 of that head.
    for h in range(q.shape[0] // head_dim):
        for r in range(head_dim):
            np.testing.assert_array_equal(got[h * head_dim + r], q[h * head_dim + r // 2 + (r % 2) * head_dim // 2])
    np.testing.assert_array_equal(np.asarray(t["blk.1.ffn_down.weight"].data),
                                  hf["model.layers.1.mlp.down_proj.weight"])


def test_bad_input_refused_before_writing(merged, tmp_path):
    from hai_medqa.publish.gguf_release import build_gguf_release

    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        build_gguf_release(merged, "f16,q9", repo_id="o/EXAONE-x", out_dir=tmp_path / "g")
    assert not (tmp_path / "g").exists()
    with pytest.raises(Exception, match="overlaps"):
        build_gguf_release(merged, "f16", repo_id="o/EXAONE-x", out_dir=merged / "gguf")
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(merged, bad)
    tok = json.loads((bad / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "_"}
    (bad / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    with pytest.raises(GGUFExportError, match="pre-tokenizer"):
        build_gguf_release(bad, "f16", repo_id="o/EXAONE-x", out_dir=tmp_path / "g2")
    assert not (tmp_path / "g2").exists() and not list(tmp_path.glob(".g2*"))


def test_release_folder_and_push_to_gguf_repo(merged, tmp_path, monkeypatch):
    from hai_medqa.publish.gguf_release import build_gguf_release, make_gguf_release

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = mock.MagicMock(name="HfApi()")
    out = tmp_path / "EXAONE-tiny-HAI-MedQA-GGUF"
    res = make_gguf_release(merged, "f16,q8_0", repo_id="labuser/EXAONE-tiny-HAI-MedQA", out_dir=out, push=True,
                            api=api)
    assert res.repo_id == "labuser/EXAONE-tiny-HAI-MedQA-GGUF"
    api.create_repo.assert_called_once_with(repo_id="labuser/EXAONE-tiny-HAI-MedQA-GGUF", repo_type="model",
                                            private=True, exist_ok=True)
    files = sorted(p.name for p in out.iterdir())
    assert sorted(api.upload_folder.call_args.kwargs["allow_patterns"]) == files
    assert files == sorted(["EXAONE-tiny-HAI-MedQA-F16.gguf", "EXAONE-tiny-HAI-MedQA-Q8_0.gguf", "LICENSE",
                            "Modelfile", "README.md", "gguf_info.json"])
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "base_model: labuser/EXAONE-tiny-HAI-MedQA" in card and "base_model_relation: quantized" in card
    assert "license_name: exaone" in card and "ollama create" in card and "--jinja" in card
    modelfile = (out / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("# Ollama") and "FROM ./EXAONE-tiny-HAI-MedQA-F16.gguf" in modelfile
    assert 'SYSTEM """너는 의료 상담 챗봇이다."""' in modelfile
    for p in out.iterdir():  # nothing local leaks into what is published
        assert str(merged).encode() not in p.read_bytes() and str(tmp_path).encode() not in p.read_bytes()
        assert FAKE_TOKEN.encode() not in p.read_bytes()
    # the same export again is recognised and reused (resuming a failed upload costs no re-export)
    before = (out / "EXAONE-tiny-HAI-MedQA-F16.gguf").stat().st_mtime_ns
    build_gguf_release(merged, "f16,q8_0", repo_id="labuser/EXAONE-tiny-HAI-MedQA", out_dir=out)
    assert (out / "EXAONE-tiny-HAI-MedQA-F16.gguf").stat().st_mtime_ns == before
    # another export into the same folder replaces nothing without --overwrite
    with pytest.raises(Exception, match="already exists"):
        build_gguf_release(merged, "f16", repo_id="labuser/EXAONE-tiny-HAI-MedQA", out_dir=out)
    assert (out / "EXAONE-tiny-HAI-MedQA-Q8_0.gguf").is_file()


def test_export_streams_tensor_by_tensor(tmp_path):
    """A 300 MB float32 model exports to f16 with a peak of far less than one extra copy of the model
    (the whole model in memory even once would add 300 MB)."""
    from hai_medqa.fixtures.tiny_model import build_exaone_checkpoint, build_tokenizer
    from hai_medqa.model.convert import ensure_llama_checkpoint

    tok = build_tokenizer(tmp_path / "tok")
    shape = {"hidden_size": 512, "num_layers": 24, "num_attention_heads": 8, "num_key_value_heads": 8,
             "head_dim": 64, "intermediate_size": 1408, "vocab_size": 1024, "torch_dtype": "float32",
             "tie_word_embeddings": False}
    exa = build_exaone_checkpoint(tmp_path / "big", shape, tokenizer_dir=tok, max_shard_bytes=64 << 20)
    llama = ensure_llama_checkpoint(exa)
    (llama / "chat_template.jinja").write_text(
        json.loads((tok / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"], encoding="utf-8")
    model_bytes = sum(p.stat().st_size for p in llama.glob("*.safetensors"))
    assert model_bytes > 250 << 20
    script = textwrap.dedent(f"""
        import resource, sys
        from hai_medqa.publish.gguf_export import export_gguf, read_source_model
        read_source_model({str(llama)!r})  # imports and headers before the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        export_gguf({str(llama)!r}, {str(tmp_path)!r}, "f16", basename="big", progress=False)
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    base_kib, peak_kib = map(int, proc.stdout.split()[-2:])
    grown = (peak_kib - base_kib) * 1024
    print(f"GGUF f16 export of a {model_bytes >> 20} MiB model grew the peak RSS by {grown >> 20} MiB")
    assert (tmp_path / "big-F16.gguf").stat().st_size > model_bytes // 2 - (1 << 20)
    assert grown < model_bytes // 4, f"export grew the process by {grown >> 20} MiB for a {model_bytes >> 20} MiB model"


def test_merge_and_upload_gguf_option(tiny_exaone_dir, tiny_lora_run, tmp_path, capsys):
    import merge_and_upload

    out = tmp_path / "merged"
    args = ["--base", str(tiny_exaone_dir), "--adapter", str(tiny_lora_run / "adapter_best"), "--output", str(out),
            "--repo-id", "EXAONE-tiny-HAI-MedQA", "--base-model-id", "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"]
    assert merge_and_upload.main([*args, "--gguf", "f16,q9"]) == 1  # refused before the merge
    assert "unknown GGUF type 'q9'" in capsys.readouterr().err and not out.exists()
    assert merge_and_upload.main([*args, "--gguf", "f16,q8_0", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    gguf_dir = tmp_path / "merged-GGUF"
    assert sorted(p.name for p in gguf_dir.glob("*.gguf")) == ["EXAONE-tiny-HAI-MedQA-F16.gguf",
                                                               "EXAONE-tiny-HAI-MedQA-Q8_0.gguf"]
    assert not list(out.glob("*.gguf"))  # the merged repo's upload does not carry them
    assert "EXAONE-tiny-HAI-MedQA-GGUF" in printed and "EXAONE-tiny-HAI-MedQA-Q8_0.gguf" in printed
