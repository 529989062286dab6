"""Exact conversion both ways, the conversion cache, and one clear error per bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hai_medqa.model import convert as convert_mod
from hai_medqa.model.convert import (
    RECORD_FILE,
    convert_exaone_to_llama,
    convert_llama_to_exaone,
    ensure_llama_checkpoint,
)
from hai_medqa.model.exaone_layout import ModelLayoutError, exaone_to_llama_name


def _tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                out[k] = f.get_tensor(k)
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_exaone_llama_exaone_round_trip_is_byte_identical(variant, tiny_exaone_dir, tiny_exaone_tied_dir, tmp_path):
    src = tiny_exaone_dir if variant == "untied" else tiny_exaone_tied_dir
    llama = convert_exaone_to_llama(src, tmp_path / "llama")
    back = convert_llama_to_exaone(llama, tmp_path / "back")

    original, as_llama, round_trip = _tensors(src), _tensors(llama), _tensors(back)
    assert ("lm_head.weight" in original) == (variant == "untied")
    assert set(as_llama) == {exaone_to_llama_name(k) for k in original}
    assert set(round_trip) == set(original)
    for name, t in original.items():
        assert _same_bytes(as_llama[exaone_to_llama_name(name)], t), name
        assert _same_bytes(round_trip[name], t), name
    # shard layout and index preserved
    assert sorted(p.name for p in back.glob("*.safetensors")) == sorted(p.name for p in src.glob("*.safetensors"))
    assert len(list(src.glob("*.safetensors"))) >= 2
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    cfg_src = json.loads((src / "config.json").read_text())
    cfg_llama = json.loads((llama / "config.json").read_text())
    cfg_back = json.loads((back / "config.json").read_text())
    # values and key order; auto_map (EXAONE-only) now names the Hub repo holding the modeling code,
    # which is never downloaded next to the weights
    assert list(cfg_back) == list(cfg_src)
    assert {k: v for k, v in cfg_back.items() if k != "auto_map"} == {
        k: v for k, v in cfg_src.items() if k != "auto_map"}
    assert cfg_back["auto_map"] == {k: f"LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct--{v}" for k, v in cfg_src["auto_map"].items()}
    # every value shared by both layouts carried over under its Llama name
    renames = {"num_layers": "num_hidden_layers", "activation_function": "hidden_act",
               "layer_norm_epsilon": "rms_norm_eps", "torch_dtype": "dtype"}
    for key, value in cfg_src.items():
        if key in ("auto_map", "embed_dropout", "architectures", "model_type", "rope_scaling", "rope_theta"):
            continue
        assert cfg_llama[renames.get(key, key)] == value, key
    assert cfg_llama["rope_parameters"] == {**cfg_src["rope_scaling"], "rope_theta": cfg_src["rope_theta"]}
    assert cfg_llama["model_type"] == "llama" and "auto_map" not in cfg_llama
    # tokenizer files copied unchanged
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (llama / name).read_bytes() == (src / name).read_bytes(), name
    record = json.loads((llama / RECORD_FILE).read_text())
    assert record["direction"] == "exaone->llama" and record["source_config"] == cfg_src


def test_llama_to_exaone_without_reference_keeps_shared_values(tiny_llama_dir, tmp_path):
    """A merged model saved by transformers has no conversion record; the export still maps every
    shared value and points auto_map at EXAONE's code on the Hub."""
    plain = tmp_path / "plain_llama"
    shutil.copytree(tiny_llama_dir, plain)
    (plain / RECORD_FILE).unlink()
    out = convert_llama_to_exaone(plain, tmp_path / "exaone")
    cfg = json.loads((out / "config.json").read_text())
    llama_cfg = json.loads((plain / "config.json").read_text())
    assert cfg["model_type"] == "exaone" and cfg["architectures"] == ["ExaoneForCausalLM"]
    assert cfg["num_layers"] == llama_cfg["num_hidden_layers"]
    assert cfg["layer_norm_epsilon"] == llama_cfg["rms_norm_eps"]
    assert cfg["rope_theta"] == llama_cfg["rope_parameters"]["rope_theta"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("LGAI-EXAONE/")
    assert "num_hidden_layers" not in cfg and "rope_parameters" not in cfg


def test_llama_folder_passes_through_untouched(tiny_llama_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()}
    assert ensure_llama_checkpoint(tiny_llama_dir) == tiny_llama_dir
    assert {p.name: p.stat().st_mtime_ns for p in tiny_llama_dir.iterdir()} == before


def test_conversion_is_cached_by_source_identity(tiny_exaone_dir, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(tiny_exaone_dir, src)
    cache = tmp_path / "cache"
    first = ensure_llama_checkpoint(src, cache_dir=cache)
    assert first.parent == cache and (first / RECORD_FILE).is_file()

    calls = []
    real = convert_mod.convert_exaone_to_llama
    monkeypatch.setattr(convert_mod, "convert_exaone_to_llama", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ensure_llama_checkpoint(src, cache_dir=cache) == first
    assert calls == []  # second run: no conversion
    # a changed shard is a different source -> converted again into a new cache entry
    shard = sorted(src.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    second = ensure_llama_checkpoint(src, cache_dir=cache)
    assert second != first and calls == [1]
    # an explicit source id (Hub repo@commit) is the key
    a = ensure_llama_checkpoint(src, cache_dir=cache, source_id="hub:x/y@" + "a" * 40, name="x--y")
    assert a.name.startswith("x--y-") and calls == [1, 1]


def test_two_runs_converting_one_checkpoint_at_once_convert_it_once(tiny_exaone_dir, tmp_path, monkeypatch):
    """Two runs started together on one cache (side by side on two GPUs): the second must wait for the first's
    conversion and reuse it, not convert again and rename over the folder the first is loading (seen on the
    H200s: 'Directory not empty' on the second rename). The first is a real process paused just before its
    rename; this one must neither convert nor fail, and must return the folder the first made."""
    import subprocess
    import sys
    import time

    from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_PAUSE_ENV, FAULT_POINT_ENV

    src, cache, announce = tmp_path / "src", tmp_path / "cache", tmp_path / "paused"
    shutil.copytree(tiny_exaone_dir, src)
    env = dict(os.environ, **{FAULT_FILE_ENV: str(announce), FAULT_PAUSE_ENV: "3"})
    code = ("import sys; from hai_medqa.model.convert import ensure_llama_checkpoint; "
            "print(ensure_llama_checkpoint(sys.argv[1], cache_dir=sys.argv[2]))")
    # the point's name holds the target folder's name, known once the key is: ask for it without converting
    calls = []
    monkeypatch.setattr(convert_mod, "convert_exaone_to_llama", lambda f, t, **k: calls.append(t) or t)
    target_name = ensure_llama_checkpoint(src, cache_dir=cache).name
    monkeypatch.undo()
    shutil.rmtree(cache, ignore_errors=True)
    env[FAULT_POINT_ENV] = f"before_rename:{target_name}"
    first = subprocess.Popen([sys.executable, "-c", code, str(src), str(cache)], env=env, stdout=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 60
    while not announce.exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first run never reached its rename"
        time.sleep(0.05)
    converted = []
    real = convert_mod.convert_exaone_to_llama
    monkeypatch.setattr(convert_mod, "convert_exaone_to_llama",
                        lambda *a, **k: converted.append(1) or real(*a, **k))
    second = ensure_llama_checkpoint(src, cache_dir=cache)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 0
    assert converted == [], "the second run converted again instead of waiting for the first"
    assert Path(out.strip().splitlines()[-1]) == second and (second / RECORD_FILE).is_file()


def test_killed_conversion_leaves_nothing(tiny_exaone_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_copy_side_files", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_exaone_to_llama(tiny_exaone_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- bad inputs: one clear, single-line error each, nothing written --------------------------------

def _broken_copy(src, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _break_missing_config(d):
    (d / "config.json").unlink()


def _break_model_type(d):
    _edit_config(d, model_type="gpt2")


def _break_missing_key(d):
    _edit_config(d, hidden_size=None)


def _break_missing_shard(d):
    sorted(d.glob("model-*.safetensors"))[1].unlink()


def _shard_holding(d, name):
    return d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][name]


def _break_shape(d):
    name = "transformer.h.1.attn.attention.q_proj.weight"
    shard = _shard_holding(d, name)
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(8, 64)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _break_unknown_tensor(d):
    shard = sorted(d.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["transformer.h.0.attn.attention.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.h.0.attn.attention.q_proj.bias"] = shard.name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _break_missing_tensor(d):
    shard = _shard_holding(d, "transformer.ln_f.weight")
    tensors = load_file(str(shard))
    tensors.pop("transformer.ln_f.weight")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("transformer.ln_f.weight")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _break_truncated(d):
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


def _break_pickle_only(d):
    for p in d.glob("*.safetensors"):
        p.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")


@pytest.mark.parametrize(("breaker", "message"), [
    (_break_missing_config, "config.json: missing"),
    (_break_model_type, "model_type is 'gpt2'; expected 'exaone'"),
    (_break_missing_key, "missing required key(s) hidden_size"),
    (_break_missing_shard, "lists shard 'model-00002-of-"),
    (_break_shape, "has shape [8, 64], config.json implies [64, 64]"),
    (_break_unknown_tensor, "unexpected tensor 'transformer.h.0.attn.attention.q_proj.bias'"),
    (_break_missing_tensor, "missing tensor(s) transformer.ln_f.weight"),
    (_break_truncated, "truncated"),
    (_break_pickle_only, "refusing to load them"),
])
def test_bad_input_gives_one_clear_error(breaker, message, tiny_exaone_dir, tmp_path):
    src = _broken_copy(tiny_exaone_dir, tmp_path)
    breaker(src)
    out = tmp_path / "out"
    with pytest.raises(ModelLayoutError) as e:
        convert_exaone_to_llama(src, out)
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_wrong_direction_and_existing_destination(tiny_exaone_dir, tiny_llama_dir, tmp_path):
    with pytest.raises(ModelLayoutError, match="expected a Llama checkpoint"):
        convert_llama_to_exaone(tiny_exaone_dir, tmp_path / "a")
    with pytest.raises(ModelLayoutError, match="expected an EXAONE-3.5 checkpoint"):
        convert_exaone_to_llama(tiny_llama_dir, tmp_path / "b")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ModelLayoutError, match="not empty"):
        convert_exaone_to_llama(tiny_exaone_dir, busy)
    assert (busy / "keep.txt").read_text() == "mine"


def test_cli_prints_error_line_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert convert_mod.main([str(tmp_path / "src"), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.json: missing" in err[0]


def test_cli_converts_both_directions(tiny_exaone_dir, tmp_path, capsys):
    assert convert_mod.main([str(tiny_exaone_dir), str(tmp_path / "llama")]) == 0
    assert convert_mod.main([str(tmp_path / "llama"), str(tmp_path / "exaone")]) == 0
    back = json.loads((tmp_path / "exaone" / "config.json").read_text())
    original = json.loads((tiny_exaone_dir / "config.json").read_text())
    assert back["num_layers"] == original["num_layers"] and back["rope_scaling"] == original["rope_scaling"]
