"""Shared pytest fixtures. Expensive stand-ins (tiny checkpoints, tokenizers) are built once per
session into a temporary folder and reused by every test that asks for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# One CPU thread for torch, here and in every script a test starts (they inherit the environment; set
# before any test module imports torch, so threads torch starts later get it too). The tiny stand-ins'
# operations are too small to gain from a second thread, and on the shared 2-core machine (CI builds
# llama.cpp beside the suite) OpenMP's two threads wait for each other whenever the other core is busy:
# an evaluation pass of the tiny model took 7.4 s on 2 threads and 0.2 s on 1 (tests/train/test_eval_loss.py).
# Speed only: the scripts under test are the same, and a run's own cpu_threads still applies.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """torch on one thread in this process too (in case torch was imported before this file)."""
    import torch

    before, wanted = torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]
    if wanted.isdigit() and int(wanted) > 0:
        torch.set_num_threads(int(wanted))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


# --- tiny EXAONE stand-ins (owner: model / H2) ------------------------------------------------
# Built once per session in EXAONE-3.5's own layout; stages reach the Llama layout through the real
# conversion path (hai_medqa.model.load / ensure_llama_checkpoint).


@pytest.fixture(scope="session", autouse=True)
def _hai_medqa_cache(tmp_path_factory) -> Path:
    """Keep converted checkpoints out of the user's ~/.cache during tests."""
    cache = tmp_path_factory.mktemp("hai_medqa_cache")
    old = os.environ.get("HAI_MEDQA_CACHE")
    os.environ["HAI_MEDQA_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("HAI_MEDQA_CACHE", None)
    else:
        os.environ["HAI_MEDQA_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_exaone_dir(tmp_path_factory) -> Path:
    """Tiny random EXAONE-layout checkpoint (untied, >= 2 shards) with tokenizer + chat template."""
    from hai_medqa.fixtures.tiny_model import build_tiny_exaone

    return build_tiny_exaone(tmp_path_factory.mktemp("tiny_exaone") / "model", tied=False, seed=0)


@pytest.fixture(scope="session")
def tiny_exaone_tied_dir(tmp_path_factory) -> Path:
    """Tied-embedding variant (no lm_head.weight), like EXAONE-3.5-2.4B."""
    from hai_medqa.fixtures.tiny_model import build_tiny_exaone

    return build_tiny_exaone(tmp_path_factory.mktemp("tiny_exaone_tied") / "model", tied=True, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_exaone_dir) -> Path:
    """The tiny EXAONE checkpoint converted to Llama layout (cached conversion)."""
    from hai_medqa.model.convert import ensure_llama_checkpoint

    return ensure_llama_checkpoint(tiny_exaone_dir)


# --- LoRA adapters for the merge/publish tests (owner: merge / H5) ------------------------------


def make_lora_run(base_llama_dir: Path, run_dir: Path, *, seed: int = 0, use_rslora: bool = False) -> Path:
    """A training-run-shaped folder (RUN_DIR/adapter_best + run files) holding a PEFT LoRA adapter
    with non-zero deltas (init_lora_weights=False) on all seven projections of `base_llama_dir`."""
    import json

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    from hai_medqa.model.load import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    model = load_causal_lm(base_llama_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=use_rslora, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, cfg)
    adapter = run_dir / "adapter_best"
    peft_model.save_pretrained(adapter)
    load_tokenizer(base_llama_dir).save_pretrained(adapter)
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump({
        "model": "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", "seed": seed, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "learning_rate": 0.003, "max_length": 512, "quantize_4bit": True,
    }, sort_keys=False), encoding="utf-8")
    (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "global_step": 60,
                                                      "best_val_loss": 4.25}), encoding="utf-8")
    (run_dir / "run_info.json").write_text(json.dumps({"git_commit": "0123abc", "device": {"type": "cpu"}}),
                                           encoding="utf-8")
    return run_dir


@pytest.fixture(scope="session")
def tiny_lora_run(tiny_llama_dir, tmp_path_factory) -> Path:
    """RUN_DIR with adapter_best/ trained-shape LoRA for the untied tiny model."""
    return make_lora_run(tiny_llama_dir, tmp_path_factory.mktemp("lora_run") / "run")


@pytest.fixture(scope="session")
def tiny_lora_run_tied(tiny_exaone_tied_dir, tmp_path_factory) -> Path:
    """RUN_DIR with adapter_best/ for the tied-embedding tiny model."""
    from hai_medqa.model.convert import ensure_llama_checkpoint

    return make_lora_run(ensure_llama_checkpoint(tiny_exaone_tied_dir), tmp_path_factory.mktemp("lora_tied") / "run",
                         seed=1)


# --- bundled AI Hub sample and its preprocessed jsonl (owner: data / H1) --------------------------


@pytest.fixture(scope="session")
def aihub_sample_dir() -> Path:
    """The bundled synthetic AI Hub sample (tree + TL.zip/VL.zip), read-only."""
    from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR

    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_jsonl(tmp_path_factory, aihub_sample_dir) -> dict[str, Path]:
    """{"train": ..., "validation": ...}: the sample's TL.zip / VL.zip preprocessed with the defaults."""
    from hai_medqa.data import run_preprocess

    out = tmp_path_factory.mktemp("sample_jsonl")
    paths = {"train": out / "train.jsonl", "validation": out / "val.jsonl"}
    run_preprocess([aihub_sample_dir / "TL.zip"], paths["train"], progress=False)
    run_preprocess([aihub_sample_dir / "VL.zip"], paths["validation"], progress=False)
    return paths


# --- one real S_F2.py run (owner: pipeline) ------------------------------------------------------

CLI_RUN_STEPS = 24


@pytest.fixture(scope="session")
def cli_training_run(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path_factory, _hai_medqa_cache) -> dict:
    """One real CLI run of S_F2.py (a subprocess, as users run it) on the bundled sample with the tiny
    EXAONE stand-in, CLI_RUN_STEPS steps: {"dir": the run folder, "console": its stdout + stderr,
    "steps": CLI_RUN_STEPS}. Shared by tests/pipeline/test_train_e2e.py (the run folder) and
    tests/common/test_third_party_noise.py (the console), so the suite starts one interpreter for both."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("train_e2e") / "run"
    cmd = [sys.executable, str(repo_root / "S_F2.py"), "--config", str(repo_root / "configs" / "tiny_cpu.yaml"),
           "--model", str(tiny_exaone_dir),  # EXAONE layout: goes through the real conversion path
           "--train-file", str(sample_jsonl["train"]), "--val-file", str(sample_jsonl["validation"]),
           "--output-dir", str(out), "--max-steps", str(CLI_RUN_STEPS), "--eval-steps", "8", "--save-steps", "8",
           "--warmup-ratio", "0.05"]
    env = {**os.environ, "HAI_MEDQA_CACHE": str(_hai_medqa_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo_root, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": out, "console": proc.stdout + proc.stderr, "steps": CLI_RUN_STEPS}
