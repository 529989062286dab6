"""Evaluations bound to what they measured: another model's eval_results.json stops the release in
one line (or, when asked for, is shown labelled as another model's); the model's own results reach
the card and the Hub's model-index."""

from __future__ import annotations

import json

import pytest

import merge_and_upload
from hai_medqa.model.identity import eval_model_identity, model_fingerprint
from hai_medqa.publish.release import make_release

BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"


def _results(label: str, identity: dict | None, rouge: float) -> dict:
    out = {"model": label, "samples": 35, "seed": 0, "generation": {"max_new_tokens": 64},
           "data": {"path": "/private/data/val.jsonl", "sha256": "cd" * 32, "records": 35, "evaluated": 35},
           "metrics": {"rougeL": rouge}, "metrics_stderr": {"rougeL": 0.02}}
    if identity is not None:
        out["evaluated_model"] = identity
    return out


def _write(path, results) -> str:
    path.write_text(json.dumps(results), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("identity, whose", [
    ({"weights": "base", "fingerprint": "ee" * 32, "base_model": BASE_ID}, f"the base model {BASE_ID} without any adapter"),
    ({"weights": "adapter", "fingerprint": "12" * 32, "base_model": BASE_ID}, "the adapter with weights sha256 121212121212"),
    (None, "an unidentified model"),
])
def test_foreign_results_refused_in_one_line(identity, whose, licensed_base, tiny_lora_run, tmp_path, capfd):
    evals, out, log = tmp_path / "eval_results.json", tmp_path / "merged", tmp_path / "merge.log"
    args = ["--base", str(licensed_base), "--adapter", str(tiny_lora_run), "--output", str(out),
            "--base-model-id", BASE_ID, "--eval-results", _write(evals, _results("base", identity, 0.2)),
            "--log-file", str(log)]
    assert merge_and_upload.main(args) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"error: {evals} holds results of {whose}") and err.count("\n") == 1
    assert "not of the model being released" in err and "--include-foreign-eval" in err
    assert err.strip() in log.read_text(encoding="utf-8")
    assert not out.exists()  # stopped before the merge


def test_own_and_foreign_results_with_include_foreign_eval(tiny_exaone_dir, tiny_lora_run, tmp_path):
    from huggingface_hub import ModelCard

    adapter = tiny_lora_run / "adapter_best"
    own = _write(tmp_path / "own.json", _results("finetune", {
        "weights": "adapter", "fingerprint": model_fingerprint(adapter), "base_model": BASE_ID}, 0.3456))
    base = _write(tmp_path / "base.json", _results("base", {
        "weights": "base", "fingerprint": "ee" * 32, "base_model": BASE_ID}, 0.1234))
    out = tmp_path / "merged"
    make_release(str(tiny_exaone_dir), tiny_lora_run, out, base_model=BASE_ID, eval_results=[base, own],
                 include_foreign_eval=True)
    card = (out / "README.md").read_text(encoding="utf-8")
    main, comparison = card.split("### Other models, for comparison")
    assert "| rougeL | 0.3456 | 0.02 | 35 |" in main and "0.1234" not in main
    assert f"Results of the base model {BASE_ID} without any adapter (label 'base')" in comparison
    assert "| rougeL | 0.1234 | 0.02 | 35 |" in comparison and "not this model's" in comparison
    index = [(r.metric_name, r.metric_value) for r in ModelCard(card).data.eval_results]
    assert index == [("rougeL (n=35, s.e. 0.0200)", 0.3456)]  # only the model's own results
    info = json.loads((out / "release_info.json").read_text())
    assert [(e["file"], e["own"]) for e in info["evaluations"]] == [("comparison/01-base.json", False),
                                                                     ("eval_results.json", True)]
    assert json.loads((out / "eval_results.json").read_text())["metrics"]["rougeL"] == 0.3456


def test_merged_model_results_bound_through_its_merge_record(tiny_exaone_dir, tiny_lora_run, tmp_path):
    """evaluate.py on a merged folder records eval_model_identity(folder): the adapter merged in and
    how. A release of the same adapter merged the same way takes the results as its own (in any layout);
    a release merged another way refuses them."""
    first = tmp_path / "first"
    make_release(str(tiny_exaone_dir), tiny_lora_run, first)
    identity = eval_model_identity(first)
    assert identity["weights"] == "merged" and identity["fingerprint"] == model_fingerprint(first)
    assert identity["adapter_fingerprint"] == model_fingerprint(tiny_lora_run / "adapter_best")
    evals = _write(tmp_path / "eval_results.json", _results("merged", identity, 0.3))

    make_release(str(tiny_exaone_dir), tiny_lora_run, tmp_path / "exaone", layout="exaone", eval_results=evals)
    assert json.loads((tmp_path / "exaone" / "release_info.json").read_text())["evaluations"][0]["own"] is True
    with pytest.raises(Exception, match="merged weights sha256 .* made from adapter"):
        make_release(str(tiny_exaone_dir), tiny_lora_run, tmp_path / "nf4", merge_into="nf4", eval_results=evals)
    assert not (tmp_path / "nf4").exists()


def test_adapter_identity_of_a_run_folder(tiny_exaone_dir, tiny_lora_run):
    identity = eval_model_identity(None, tiny_lora_run)  # a run folder: its adapter_best/
    assert identity["weights"] == "adapter" and identity["quantize_4bit"] is False
    assert identity["fingerprint"] == model_fingerprint(tiny_lora_run / "adapter_best")
    assert eval_model_identity(str(tiny_exaone_dir))["weights"] == "base"
