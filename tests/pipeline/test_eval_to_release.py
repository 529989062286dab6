"""From evaluate.py to the release: a real eval_results.json of the tiny model names the model it
measured (EVAL_MODEL_KEY: the adapter's fingerprint, or the base alone under --compare), the data
(hash and record count) and the settings; merge_and_upload.py takes it as the released model's own
for the same adapter, and refuses it in one line for another model."""

from __future__ import annotations

import json

import pytest

import merge_and_upload
from hai_medqa.cli import run_cli
from hai_medqa.evaluation.cli import main as evaluate_main
from hai_medqa.io_utils import sha256_file
from hai_medqa.model.identity import model_fingerprint
from hai_medqa.run_folder import EVAL_MODEL_KEY

SAMPLES = 3


@pytest.fixture(scope="module")
def evaluations(tiny_exaone_dir, tiny_lora_run, sample_jsonl, tmp_path_factory) -> dict:
    """evaluate.py --compare base RUN on the tiny model: {"base": results, "finetune": results, "dir": out}."""
    out = tmp_path_factory.mktemp("eval_to_release")
    args = ["--model", str(tiny_exaone_dir), "--compare", "base", str(tiny_lora_run), "--labels", "base", "finetune",
            "--data", str(sample_jsonl["validation"]), "--samples", str(SAMPLES), "--max-new-tokens", "6",
            "--batch-size", "3", "--dtype", "float32", "--device", "cpu", "--output-dir", str(out)]
    assert run_cli(evaluate_main, args) == 0
    return {label: json.loads((out / label / "eval_results.json").read_text(encoding="utf-8"))
            for label in ("base", "finetune")} | {"dir": out}


def test_eval_results_name_the_model_data_and_settings(evaluations, tiny_lora_run, sample_jsonl):
    val = sample_jsonl["validation"]
    records = sum(1 for line in val.read_text(encoding="utf-8").splitlines() if line.strip())
    for label, weights in (("base", "base"), ("finetune", "adapter")):
        r = evaluations[label]
        identity = r[EVAL_MODEL_KEY]
        assert identity["weights"] == weights and identity["quantize_4bit"] is False
        assert identity["base_model"] is None  # a local base: no Hub id, and no path either
        assert r["data"]["file"] == val.name and r["data"]["sha256"] == sha256_file(val)
        assert r["data"]["records"] == records and r["data"]["evaluated"] == r["samples"] == SAMPLES
        assert r["seed"] == 0 and r["generation"]["max_new_tokens"] == 6 and r["metrics_detail"]["max_length"] == 2048
        assert set(r["metrics_stderr"]) == {"rouge1", "rouge2", "rougeL", "char_rougeL"}
    assert evaluations["finetune"][EVAL_MODEL_KEY]["fingerprint"] == model_fingerprint(tiny_lora_run / "adapter_best")
    assert evaluations["base"][EVAL_MODEL_KEY]["fingerprint"] != evaluations["finetune"][EVAL_MODEL_KEY]["fingerprint"]


def test_release_takes_its_own_evaluation(evaluations, tiny_exaone_dir, tiny_lora_run, tmp_path):
    from huggingface_hub import ModelCard

    own = evaluations["dir"] / "finetune" / "eval_results.json"
    out = tmp_path / "merged"
    assert merge_and_upload.main(["--base", str(tiny_exaone_dir), "--adapter", str(tiny_lora_run),
                                  "--output", str(out), "--eval-results", str(own)]) == 0
    info = json.loads((out / "release_info.json").read_text(encoding="utf-8"))
    assert [(e["file"], e["own"]) for e in info["evaluations"]] == [("eval_results.json", True)]
    card = (out / "README.md").read_text(encoding="utf-8")
    rouge, se = evaluations["finetune"]["metrics"]["rougeL"], evaluations["finetune"]["metrics_stderr"]["rougeL"]
    assert f"| rougeL | {rouge:.4g} | {se:.4g} | {SAMPLES} |" in card  # value, standard error, samples
    index = {r.metric_name: r.metric_value for r in ModelCard(card).data.eval_results}
    assert index[f"rougeL (n={SAMPLES}, s.e. {se:.4f})"] == rouge


def test_release_refuses_another_models_evaluation(evaluations, tiny_exaone_dir, tiny_lora_run,
                                                   tiny_exaone_tied_dir, tiny_lora_run_tied, tmp_path, capfd):
    base_results = evaluations["dir"] / "base" / "eval_results.json"
    own = evaluations["dir"] / "finetune" / "eval_results.json"
    cases = [  # (base, adapter, results, whose): the base model's numbers; this adapter's on another adapter
        (tiny_exaone_dir, tiny_lora_run, base_results, "the base model (a local folder) without any adapter"),
        (tiny_exaone_tied_dir, tiny_lora_run_tied, own, "the adapter with weights sha256 "
         + model_fingerprint(tiny_lora_run / "adapter_best")[:12]),
    ]
    for i, (base, adapter, results, whose) in enumerate(cases):
        out = tmp_path / f"refused_{i}"
        assert merge_and_upload.main(["--base", str(base), "--adapter", str(adapter), "--output", str(out),
                                      "--eval-results", str(results)]) == 1
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {results} holds results of {whose}"), err[-2000:]
        assert "not of the model being released" in lines[0] and not out.exists()
