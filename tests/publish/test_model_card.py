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
    assert "AI Hub" in text and "초거대AI 헬스케어 질의응답" in text
    # Training settings come from the run's files (conftest wrote lora_r 4, learning_rate 0.003, 60 steps).
    assert re.search(r"\| lora_r \| 4 \|", text) and re.search(r"\| learning_rate \| 0\.003 \|", text)
    assert re.search(r"\| result: global_step \| 60 \|", text)
    assert "merged into the original (unquantised) base weights" in text
    assert "| LoRA target modules | down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj |" in text
    # No evaluation file: the card says so and shows no metric table.
    assert "No evaluation results were recorded" in text and "| metric | value |" not in text


def test_eval_results_shown_only_from_the_file(tiny_exaone_dir, tiny_lora_run, tmp_path):
    results = {"model": "merged", "samples": 40, "seed": 0, "generation": {"max_new_tokens": 256},
               "metrics": {"rouge1": 0.3172, "rougeL": 0.2811}, "kormedmcqa": {"accuracy": 0.4125}}
    (tmp_path / "eval_results.json").write_text(json.dumps(results))
    out = tmp_path / "m"
    make_release(str(tiny_exaone_dir), tiny_lora_run, out, repo_id=REPO_ID, base_model=BASE_ID,
                 eval_results=tmp_path / "eval_results.json")
    text = render_model_card(out, repo_id=REPO_ID, base_model=BASE_ID)
    assert "| rouge1 | 0.3172 |" in text and "| kormedmcqa/accuracy | 0.4125 |" in text
    assert "| samples | 40 |" in text and "No evaluation results" not in text


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
