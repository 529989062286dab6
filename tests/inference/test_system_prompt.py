"""A model trained with a custom system prompt is served (chat --prompt, batch, REPL) and evaluated
(generation and answer perplexity) with that prompt by default; an explicit --system-prompt
(including '' for none) still overrides it. (Before the fix both scripts used the project default.)"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from hai_medqa import chat_format
from hai_medqa.cli import run_cli
from hai_medqa.evaluation.cli import main as eval_main
from hai_medqa.evaluation.perplexity import answer_perplexity
from hai_medqa.evaluation.runner import EvalOptions, prepare_inputs
from hai_medqa.inference.chat_cli import main as chat_main
from hai_medqa.inference.generation import GenerationSettings, generate, load_for_inference
from hai_medqa.inference.system_prompt import choose_system_prompt
from hai_medqa.run_folder import RELEASE_TRAINING_DIR, TrainingRecord, write_training_record

RUN_PROMPT = "너는 간결하게 답하는 내과 의사다."
RELEASE_PROMPT = "You are a careful medical assistant."
MAX_NEW = 4
QUESTION = "두통이 자주 생겨요"


@pytest.fixture(scope="module")
def custom_run(tiny_lora_run, tiny_llama_dir, tmp_path_factory) -> Path:
    """A training run folder whose adapter was trained with RUN_PROMPT (its training record says so)."""
    run = tmp_path_factory.mktemp("custom_prompt") / "run"
    shutil.copytree(tiny_lora_run, run)
    write_training_record(run / "adapter_best", TrainingRecord(base_model=str(tiny_llama_dir), system_prompt=RUN_PROMPT))
    return run


@pytest.fixture(scope="module")
def release_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A merged release folder (Llama layout) carrying training/hai_medqa_training.json with RELEASE_PROMPT."""
    out = tmp_path_factory.mktemp("release") / "merged"
    shutil.copytree(tiny_llama_dir, out)
    (out / RELEASE_TRAINING_DIR).mkdir()
    write_training_record(out / RELEASE_TRAINING_DIR, TrainingRecord(base_model="x", system_prompt=RELEASE_PROMPT))
    return out


def _prompts(err: str) -> list[str]:
    return [json.loads(line[len("[prompt] "):]) for line in err.splitlines() if line.startswith("[prompt] ")]


def _rendered(system: str | None, question: str = QUESTION) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return chat_format.render(messages, add_generation_prompt=True)


def _base_args(tiny_exaone_dir) -> list[str]:
    return ["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", str(MAX_NEW)]


# ---------------------------------------------------------------- the rule, without a model


def test_choice_follows_the_record_and_the_flag_wins(custom_run, release_dir, tiny_exaone_dir):
    adapter = custom_run / "adapter_best"
    assert choose_system_prompt(None, str(tiny_exaone_dir), adapter).prompt == RUN_PROMPT
    assert choose_system_prompt(None, str(tiny_exaone_dir), adapter).source == f"training record in {adapter}"
    assert choose_system_prompt(None, str(release_dir), None).prompt == RELEASE_PROMPT
    assert choose_system_prompt(None, str(tiny_exaone_dir), None).prompt == chat_format.DEFAULT_SYSTEM_PROMPT
    assert choose_system_prompt(None, str(tiny_exaone_dir), None).source == "project default"
    assert choose_system_prompt("", str(release_dir), None).prompt == ""  # '' = no system prompt, still wins
    assert choose_system_prompt("다른 프롬프트", None, adapter).source == "--system-prompt"


def test_a_hub_release_record_is_fetched_alone(monkeypatch, tmp_path):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "abc"
    (snapshot / RELEASE_TRAINING_DIR).mkdir(parents=True)
    record = write_training_record(snapshot / RELEASE_TRAINING_DIR, TrainingRecord(base_model="x", system_prompt="허브"))
    asked = []

    def fake_download(repo_id, filename, revision=None, **_):
        asked.append((repo_id, filename, revision))
        if repo_id != "me/EXAONE-3.5-MedQA":
            raise huggingface_hub.errors.EntryNotFoundError("no such file")
        return str(record)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    choice = choose_system_prompt(None, "me/EXAONE-3.5-MedQA", None, revision="v1")
    assert (choice.prompt, choice.source) == ("허브", "training record in hub:me/EXAONE-3.5-MedQA")
    assert asked == [("me/EXAONE-3.5-MedQA", "training/hai_medqa_training.json", "v1")]  # the record, no weights
    assert choose_system_prompt(None, "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct", None).prompt == \
        chat_format.DEFAULT_SYSTEM_PROMPT


# ---------------------------------------------------------------- chat.py


def test_chat_prompt_uses_the_adapters_trained_prompt(tiny_exaone_dir, custom_run, capsys):
    args = [*_base_args(tiny_exaone_dir), "--adapter", str(custom_run), "--prompt", QUESTION, "--show-prompt",
            "--no-safety"]
    assert run_cli(chat_main, args) == 0
    err = capsys.readouterr().err
    assert _prompts(err) == [_rendered(RUN_PROMPT)]
    assert f"system prompt (training record in {custom_run / 'adapter_best'})" in err  # logged with its source

    assert run_cli(chat_main, [*args, "--system-prompt", ""]) == 0  # explicit: none
    assert _prompts(capsys.readouterr().err) == [_rendered(None)]
    assert run_cli(chat_main, [*args, "--system-prompt", "짧게"]) == 0
    assert _prompts(capsys.readouterr().err) == [_rendered("짧게")]


def test_chat_batch_uses_the_release_prompt(tmp_path, release_dir, capsys):
    src, dst = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions = [QUESTION, "열이 나요"]
    src.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    rc = run_cli(chat_main, ["--model", str(release_dir), "--dtype", "float32", "--device", "cpu", "--max-new-tokens",
                             str(MAX_NEW), "--input", str(src), "--output", str(dst), "--show-prompt"])
    assert rc == 0
    assert _prompts(capsys.readouterr().err) == [_rendered(RELEASE_PROMPT, q) for q in questions]
    lm = load_for_inference(str(release_dir), dtype="float32", device="cpu")
    expected = generate(lm, [_rendered(RELEASE_PROMPT, q) for q in questions], GenerationSettings(max_new_tokens=MAX_NEW))
    out = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
    assert [o["model_answer"] for o in out] == expected


def test_repl_uses_the_trained_prompt_and_system_still_replaces_it(tiny_exaone_dir, custom_run, monkeypatch, capsys):
    # chat.py's main in this process, its stdin replaced: the REPL reads a non-terminal stdin line by line
    # (tests/inference/test_repl.py drives the script itself through a pipe)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/system 새 프롬프트\n{QUESTION}\n/exit\n"))
    capsys.readouterr()
    rc = run_cli(chat_main, [*_base_args(tiny_exaone_dir), "--adapter", str(custom_run), "--show-prompt",
                             "--no-safety"])
    err = capsys.readouterr().err
    assert rc == 0, err[-2000:]
    assert _prompts(err) == [_rendered(RUN_PROMPT), _rendered("새 프롬프트")]


# ---------------------------------------------------------------- evaluate.py


@pytest.fixture(scope="module")
def val_jsonl(sample_jsonl) -> Path:
    return sample_jsonl["validation"]


def _eval(tmp_path, tiny_exaone_dir, val_jsonl, *extra) -> dict:
    out = tmp_path / "eval"
    rc = run_cli(eval_main, [*_base_args(tiny_exaone_dir), "--data", str(val_jsonl), "--samples", "2",
                             "--output-dir", str(out), *extra])
    assert rc == 0
    return out


def test_evaluate_uses_the_trained_prompt_for_generation_and_perplexity(tmp_path, tiny_exaone_dir, custom_run,
                                                                        val_jsonl):
    out = _eval(tmp_path, tiny_exaone_dir, val_jsonl, "--adapter", str(custom_run))
    res = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert res["system_prompt"] == RUN_PROMPT
    assert res["system_prompt_source"] == f"training record in {custom_run / 'adapter_best'}"
    # the perplexity input: the references rendered after the trained prompt, not the default one
    inputs = prepare_inputs(EvalOptions(data=str(val_jsonl), samples=2, seed=0))
    lm = load_for_inference(str(tiny_exaone_dir), str(custom_run), dtype="float32", device="cpu")
    with_run = answer_perplexity(lm.model, lm.tokenizer, inputs.conversations, system_prompt=RUN_PROMPT)
    with_default = answer_perplexity(lm.model, lm.tokenizer, inputs.conversations, system_prompt=None)
    assert res["metrics"]["answer_ppl"] == pytest.approx(with_run["answer_ppl"], rel=1e-6)
    assert not math.isclose(with_run["answer_ppl"], with_default["answer_ppl"], rel_tol=1e-6)
    # the generation input: the predictions are the answers to the prompts rendered with RUN_PROMPT
    preds = [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    prompts = [chat_format.split_prompt_answer([{"role": "system", "content": RUN_PROMPT}, *c])[0]
               for c in inputs.conversations]
    assert preds == generate(lm, prompts, GenerationSettings(max_new_tokens=MAX_NEW))


def test_evaluate_explicit_prompt_overrides_and_compare_shares_the_trained_one(tmp_path, tiny_exaone_dir, custom_run,
                                                                              val_jsonl):
    out = _eval(tmp_path, tiny_exaone_dir, val_jsonl, "--adapter", str(custom_run), "--system-prompt", "",
                "--no-perplexity")
    assert json.loads((out / "eval_results.json").read_text(encoding="utf-8"))["system_prompt"] == ""
    cmp = tmp_path / "cmp"
    rc = run_cli(eval_main, [*_base_args(tiny_exaone_dir), "--data", str(val_jsonl), "--samples", "2",
                             "--no-perplexity", "--compare", "base", str(custom_run), "--labels", "base", "ft",
                             "--output-dir", str(cmp)])
    assert rc == 0
    for label in ("base", "ft"):  # the same prompt for both sides: the fine-tune's
        assert json.loads((cmp / label / "eval_results.json").read_text(encoding="utf-8"))["system_prompt"] == RUN_PROMPT


def test_compare_refuses_two_different_trained_prompts(tmp_path, tiny_exaone_dir, custom_run, val_jsonl, capsys):
    other = tmp_path / "other_run"
    shutil.copytree(custom_run, other)
    write_training_record(other / "adapter_best", TrainingRecord(base_model="x", system_prompt="다른 프롬프트"))
    rc = run_cli(eval_main, [*_base_args(tiny_exaone_dir), "--data", str(val_jsonl), "--compare", str(custom_run),
                             str(other), "--output-dir", str(tmp_path / "cmp")])
    err = capsys.readouterr().err
    assert rc == 1 and "error: " in err and "different system prompts" in err and "--system-prompt" in err
