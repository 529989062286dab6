"""End to end through S_F2.py on the bundled sample with the tiny EXAONE stand-in (CPU, 4-bit NF4).

One real CLI run (a subprocess, as users run it: the session fixture cli_training_run in
tests/conftest.py, whose console tests/common/test_third_party_noise.py reads) is shared by every test
in this module.
"""

from __future__ import annotations

import json

import pytest
import torch

from hai_medqa import chat_format
from hai_medqa.config import load_config
from hai_medqa.io_utils import sha256_file
from hai_medqa.train.config import TrainConfig

STEPS = 24


@pytest.fixture(scope="module")
def run_dir(cli_training_run):
    assert cli_training_run["steps"] == STEPS
    return cli_training_run["dir"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_training_loss_falls_substantially(run_dir):
    lines = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    first, last = train[0]["loss"], sum(r["loss"] for r in train[-4:]) / 4
    assert last < first - 1.0, (first, last)  # nats per answer token, from a random start
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    for r in train:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= r.keys()
    for r in evals:
        assert r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-3)


def test_run_folder_holds_everything_promised(run_dir, sample_jsonl):
    for name in ("resolved_config.yaml", "run_info.json", "metrics.jsonl", "train.log", "loss_curve.png",
                 "summary.json", "adapter_best/adapter_model.safetensors", "adapter_last/adapter_config.json",
                 "adapter_last/chat_template.jinja", "adapter_last/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000016", "step_0000024"]  # save_total_limit: 2
    cfg, _ = load_config(TrainConfig, run_dir / "resolved_config.yaml")
    assert cfg.max_steps == STEPS and cfg.lora_r == 16 and cfg.train_file == str(sample_jsonl["train"])
    info = json.loads((run_dir / "run_info.json").read_text(encoding="utf-8"))
    assert info["data"]["train_file"]["sha256"] == sha256_file(sample_jsonl["train"])
    assert info["data"]["val_file"]["sha256"] == sha256_file(sample_jsonl["validation"])
    assert {"torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= info["versions"].keys()
    assert info["git_commit"] and info["device"]["type"] == "cpu"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "completed" and summary["global_step"] == STEPS
    assert summary["trainable_params"] > 0 and summary["best_step"] in (8, 16, 24)
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert "trainable parameters" in log and "model loaded (4-bit NF4" in log


def test_adapter_loads_with_peft_and_changes_the_output(run_dir, tiny_exaone_dir):
    from peft import PeftModel

    from hai_medqa.model.load import load_causal_lm, load_tokenizer

    adapter = run_dir / "adapter_best"
    tok = load_tokenizer(adapter)
    assert chat_format.check_tokenizer_template(tok) == []  # tokenizer + chat template beside the adapter
    prompt = chat_format.render([{"role": "system", "content": chat_format.DEFAULT_SYSTEM_PROMPT},
                                 {"role": "user", "content": "두통이 심할 때 어떻게 해야 하나요?"}],
                                add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = load_causal_lm(tiny_exaone_dir, quantize_4bit=True, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids, use_cache=False).logits[0, -1].clone()
        base_gen = base.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=ids, use_cache=False).logits[0, -1]
        tuned_gen = tuned.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert (tuned_logits - base_logits).abs().max() > 0.5
    assert not torch.equal(tuned_gen, base_gen)
    meta = json.loads((adapter / "hai_medqa_training.json").read_text(encoding="utf-8"))
    assert meta["base_layout"] == "llama" and meta["system_prompt"] == chat_format.DEFAULT_SYSTEM_PROMPT


def test_run_adapters_are_shareable_and_their_weights_are_peft_s(run_dir, sample_jsonl):
    """The trainer finishes each adapter folder (train.adapter_folder.finish_adapter_folder): the tiny
    local base is named by no path (null), the record carries the data's provenance, the README is
    the project's card, and the weights are PEFT's bytes as saved (adapter_last equals the step-24
    checkpoint's adapter, which nothing rewrites)."""
    from hai_medqa.data.provenance import SYNTHETIC_SAMPLE

    assert sha256_file(run_dir / "adapter_last" / "adapter_model.safetensors") == sha256_file(
        run_dir / "checkpoints" / f"step_{STEPS:07d}" / "adapter_model.safetensors")
    for name in ("adapter_best", "adapter_last"):
        adapter = run_dir / name
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] is None
        record = json.loads((adapter / "hai_medqa_training.json").read_text(encoding="utf-8"))
        assert record["base_model"] is None
        train, val = record["data"]["train"], record["data"]["validation"]
        assert (train["source"], train["split"], train["sha256"]) == (
            SYNTHETIC_SAMPLE, "train", sha256_file(sample_jsonl["train"]))
        assert (val["source"], val["split"], val["sha256"]) == (
            SYNTHETIC_SAMPLE, "validation", sha256_file(sample_jsonl["validation"]))
        card = (adapter / "README.md").read_text(encoding="utf-8")
        assert "[More Information Needed]" not in card and "bundled synthetic sample" in card
        assert f"# HAI MedQA LoRA adapter at step {record['step']}" in card and "| LoRA rank r | 16 |" in card
        steps = f"{STEPS}" if record["step"] == STEPS else f"{record['step']} of {STEPS}"  # mid-run: its own step
        assert f"| steps | {steps} |" in card and "| tokens seen |" in card
