"""The model card: valid Hub metadata, only recorded facts, and a usage snippet that really runs."""

from __future__ import annotations

import json
import re

import pytest

from hai_medqa.merge import merge_adapter
from hai_medqa.publish import render_model_card
from hai_medqa.publish.release import make_release

BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
REPO_ID = "labuser/EXAONE-3.5-7.8B-Instruct-HAI-MedQA"


@pytest.fixture(scope="module")
def merged(tiny_exaone_dir, tiny_lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "merged"
    make_release(str(tiny_exaone_dir), tiny_lora_run, out, repo_id=REPO_ID, base_model=BASE_ID)  # merge, then release
    return out


def test_metadata_parses_with_required_fields(merged):
    from huggingface_hub import ModelCard

    card = ModelCard((merged / "README.md").read_text(encoding="utf-8"))
    meta = card.data.to_dict()
    assert meta["base_model"] == BASE_ID
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "exaone", "LICENSE")
    assert meta["language"] == ["ko"] and meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers" and {"exaone", "medical", "korean"} <= set(meta["tags"])


def test_body_holds_recorded_facts_disclaimers_and_citation(merged):
    text = (merged / "README.md").read_text(encoding="utf-8")
    assert "의료 조언" in text and "does not replace medical advice" in text  # Korean + English disclaimer
    assert "arXiv:2412.04862" in text and "EXAONE 3.5" in text
    # The fixture run recorded no data provenance: the card claims nothing about the data (issue 13;
    # it used to state AI Hub's expert-written answers whatever the run was trained on).
    assert "The training data was not recorded" in text and "expert-written" not in text
    # Training settings come from the run's files (conftest wrote lora_r 4, learning_rate 0.003, 60 steps),
    # once each and without bookkeeping rows (issue 13: it used to list config, summary and run_info keys).
    table = text[text.index("## Training settings"):text.index("<details>")]
    assert "| LoRA rank r | 4 |" in table and "| learning rate | 0.003 |" in table and "| steps | 60 |" in table
    assert "| LoRA targets | down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj |" in table
    assert "| precision | base in 4-bit NF4 (QLoRA) |" in table and "| LoRA alpha | 8 |" in table
    labels = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert len(labels) == len(set(labels)) and not any(k in labels for k in ("lora_r", "result: global_step"))
    assert "merged into the original (unquantised) base weights" in text
    # No evaluation file: the card says so and shows no metric table.
    assert "No evaluation of this model was recorded" in text and "| metric |" not in text
    assert "full text of the agreement is missing" in text  # the tiny base has no LICENSE file


def test_card_data_section_comes_from_the_preprocess_report(provenance_run, tiny_exaone_dir, tmp_path):
    """Trained on the bundled sample: the card says so, with the split, counts, pairing and skips of
    the preprocess report, and makes no AI Hub claim."""
    out = tmp_path / "m"
    make_release(str(tiny_exaone_dir), provenance_run, out, repo_id=REPO_ID, base_model=BASE_ID)
    text = (out / "README.md").read_text(encoding="utf-8")
    intro = text[text.index("# EXAONE"):text.index("## 의료 면책 고지")]
    assert "fine-tuned with QLoRA on the **bundled synthetic sample**" in intro and "not a medical model" in intro
    data = text[text.index("## Training data"):text.index("## Training settings")]
    assert "**train**: `train.jsonl`, 243 records" in data and "**validation**: `val.jsonl`" in data
    assert data.count("bundled synthetic sample") == 2 and "not AI Hub data" in data
    assert "split `train`" in data and "split `validation`" in data
    assert "pairing `round_robin`, seed 0" in data and "- skipped: nothing" in data
    assert "expert-written" not in text and "dataSetSn=71762" not in data


def _own_eval(adapter_dir, **identity) -> dict:
    from hai_medqa.model.identity import model_fingerprint

    return {"model": "finetune",
            "evaluated_model": {"weights": "adapter", "fingerprint": model_fingerprint(adapter_dir),
                                "base_model": BASE_ID, "base_model_revision": None, "quantize_4bit": True, **identity},
            "samples": 35, "seed": 0, "generation": {"max_new_tokens": 256},
            "data": {"path": "/somewhere/private/val.jsonl", "sha256": "ab" * 32, "records": 35, "evaluated": 35},
            "metrics": {"rouge1": 0.3172, "rougeL": 0.2811}, "metrics_stderr": {"rouge1": 0.0123, "rougeL": 0.0101},
            "kormedmcqa": {"doctor": 0.4125},
            "kormedmcqa_detail": {"split": "test", "subsets": {"doctor": {"n": 80}}, "stderr": {"doctor": 0.055}}}


def test_eval_results_shown_only_from_the_file(tiny_exaone_dir, tiny_lora_run, tmp_path):
    """Results of this model (its adapter's fingerprint) appear in the card with model, data, sample
    count and standard errors, and in the Hub's model-index."""
    from huggingface_hub import ModelCard

    (tmp_path / "eval_results.json").write_text(json.dumps(_own_eval(tiny_lora_run / "adapter_best")))
    out = tmp_path / "m"
    make_release(str(tiny_exaone_dir), tiny_lora_run, out, repo_id=REPO_ID, base_model=BASE_ID,
                 eval_results=tmp_path / "eval_results.json")
    text = render_model_card(out, repo_id=REPO_ID, base_model=BASE_ID)
    assert "| rouge1 | 0.3172 | 0.0123 | 35 |" in text and "| KorMedMCQA doctor | 0.4125 | 0.055 | 80 |" in text
    assert "Measured on this model: the adapter with weights sha256" in text and f"on {BASE_ID}" in text
    assert f"sha256 `{'ab' * 32}`, 35 records), 35 samples evaluated" in text and "No evaluation of" not in text
    index = {(r.metric_name, r.metric_value, r.dataset_type) for r in ModelCard(text).data.eval_results}
    assert ("rouge1 (n=35, s.e. 0.0123)", 0.3172, "hai-medqa-validation") in index
    assert ("accuracy doctor (n=80, s.e. 0.0550)", 0.4125, "sean0042/KorMedMCQA") in index
    published = json.loads((out / "eval_results.json").read_text())
    assert published["data"]["file"] == "val.jsonl" and "/somewhere/private" not in json.dumps(published)


def test_usage_snippet_runs_with_saved_chat_template(merged, capsys):
    """The card's Python, pointed at the local folder, loads with plain transformers, formats the
    prompt exactly as the project's chat format and generates."""
    import torch

    from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT, render
    from hai_medqa.publish.model_card import EXAMPLE_QUESTION

    text = (merged / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"## Usage\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "trust_remote_code" not in snippet
    code = snippet.replace(REPO_ID, str(merged)).replace("max_new_tokens=512", "max_new_tokens=4")
    code = code.replace('device_map="auto"', 'device_map="cpu"')
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "model_card_usage", "exec"), scope)
    prompt = scope["tokenizer"].decode(scope["inputs"]["input_ids"][0])
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": EXAMPLE_QUESTION}]
    assert prompt == render(messages, add_generation_prompt=True)
    assert scope["output"].shape[1] > scope["inputs"]["input_ids"].shape[1]
    assert scope["model"].generation_config.eos_token_id == scope["tokenizer"].convert_tokens_to_ids("[|endofturn|]")


def test_exaone_layout_card_says_remote_code(tiny_exaone_dir, tiny_lora_run, tmp_path):
    out = tmp_path / "ex"
    merge_adapter(tiny_exaone_dir, tiny_lora_run, out, layout="exaone")
    text = render_model_card(out, repo_id=REPO_ID, base_model=BASE_ID)
    assert "trust_remote_code=True" in text and "original layout" in text


def test_snippet_uses_the_trained_system_prompt_and_base(tiny_exaone_dir, tiny_lora_run, tmp_path):
    """The trainer's note beside the adapter (hai_medqa_training.json) sets the snippet's system
    prompt and, failing any other record, the card's base model."""
    import shutil

    from hai_medqa.publish.release import make_release

    run = tmp_path / "run"
    shutil.copytree(tiny_lora_run, run)
    (run / "adapter_best" / "hai_medqa_training.json").write_text(json.dumps(
        {"base_model": "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct", "system_prompt": "당신은 테스트용 의료 챗봇입니다."}))
    result = make_release(str(tiny_exaone_dir), run, tmp_path / "out")
    text = (result.folder / "README.md").read_text(encoding="utf-8")
    assert '"content": "당신은 테스트용 의료 챗봇입니다."' in text
    assert "base_model: LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct" in text
    assert result.repo_id == "<your-hf-username>/EXAONE-3.5-2.4B-Instruct-HAI-MedQA"
    assert (result.folder / "training" / "hai_medqa_training.json").is_file()
