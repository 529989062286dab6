"""evaluate.py on the tiny stand-in: answer perplexity uses the training loss tokens, results JSON
schema, --compare outputs (JSON, markdown, PNG), clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hai_medqa import chat_format
from hai_medqa.cli import run_cli
from hai_medqa.evaluation.cli import main as eval_main
from hai_medqa.evaluation.perplexity import answer_perplexity
from hai_medqa.evaluation.report import comparison_rows, markdown_table
from hai_medqa.inference.generation import load_for_inference

CONVERSATIONS = [
    [{"role": "user", "content": "두통이 심해요"}, {"role": "assistant", "content": "충분히 쉬고 물을 드세요."}],
    [{"role": "user", "content": "감기에 항생제를 먹어야 하나요?"},
     {"role": "assistant", "content": "바이러스 감염에는 항생제가 효과가 없습니다. 증상이 오래가면 진료를 받으세요."}],
    [{"role": "user", "content": "열이 나요"}, {"role": "assistant", "content": "언제부터인가요?"},
     {"role": "user", "content": "어제부터요"}, {"role": "assistant", "content": "38도 이상이면 병원에 가세요."}],
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_exaone_dir):
    return load_for_inference(str(tiny_exaone_dir), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def val_jsonl(tmp_path_factory, repo_root):
    from hai_medqa.data.preprocess import run_preprocess

    out = tmp_path_factory.mktemp("val") / "val.jsonl"
    run_preprocess([repo_root / "hai_medqa" / "resources" / "aihub_sample" / "VL.zip"], out, progress=False)
    return out


def test_answer_perplexity_scores_exactly_the_answer_tokens(tiny_lm):
    tok, model = tiny_lm.tokenizer, tiny_lm.model
    system = chat_format.DEFAULT_SYSTEM_PROMPT
    got = answer_perplexity(model, tok, CONVERSATIONS, system_prompt=system, batch_size=3)
    # by hand: prompt tokens are context only; answer + [|endofturn|] tokens are scored
    nll, n = 0.0, 0
    for conv in CONVERSATIONS:
        prompt, answer = chat_format.split_prompt_answer([{"role": "system", "content": system}, *conv])
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        a_ids = tok(answer, add_special_tokens=False).input_ids
        assert a_ids[-1] == tok.convert_tokens_to_ids(chat_format.EOT)
        ids = torch.tensor([p_ids + a_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        for pos in range(len(p_ids), len(p_ids) + len(a_ids)):
            nll -= float(logp[pos - 1, ids[0, pos]])
        n += len(a_ids)
    assert got["answer_tokens"] == n
    assert got["answer_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # padding in a batch does not change the score
    one_by_one = answer_perplexity(model, tok, CONVERSATIONS, system_prompt=system, batch_size=1)
    assert one_by_one["answer_ppl"] == pytest.approx(got["answer_ppl"], rel=1e-5)


def test_evaluate_writes_results_in_the_documented_schema(tmp_path, tiny_exaone_dir, val_jsonl, repo_root):
    out = tmp_path / "eval"
    rc = eval_main(["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu",
                    "--data", str(val_jsonl), "--samples", "3", "--seed", "7", "--max-new-tokens", "4",
                    "--kormedmcqa", str(repo_root / "tests" / "fixtures" / "kormedmcqa"),
                    "--kormedmcqa-subsets", "pharm,dentist", "--kormedmcqa-fewshot", "1",
                    "--kormedmcqa-max-new-tokens", "3", "--output-dir", str(out)])
    assert rc == 0
    res = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert res["samples"] == 3 and res["seed"] == 7
    assert res["generation"]["max_new_tokens"] == 4 and res["generation"]["do_sample"] is False
    assert set(res["metrics"]) == {"rouge1", "rouge2", "rougeL", "char_rougeL", "answer_ppl"}
    assert all(0.0 <= res["metrics"][k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "char_rougeL"))
    assert res["metrics"]["answer_ppl"] > 1.0
    assert set(res["metrics_stderr"]) == {"rouge1", "rouge2", "rougeL", "char_rougeL"}
    assert set(res["kormedmcqa"]) == {"pharm", "dentist", "micro", "macro"}
    assert res["kormedmcqa_detail"]["fewshot"] == 1
    assert res["kormedmcqa_detail"]["subsets"]["pharm"]["n"] == 3
    assert res["data"]["evaluated"] == 3 and len(res["data"]["sha256"]) == 64
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 3 and {"line", "question", "reference", "prediction", "rougeL"} <= set(preds[0])
    assert res["metrics"]["rougeL"] == pytest.approx(sum(p["rougeL"] for p in preds) / 3)
    items = (out / "kormedmcqa_items.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(items) == 5


def test_compare_base_and_adapter(tmp_path, tiny_exaone_dir, tiny_lora_run, val_jsonl):
    out = tmp_path / "cmp"
    rc = eval_main(["--model", str(tiny_exaone_dir), "--dtype", "float32", "--device", "cpu",
                    "--compare", "base", str(tiny_lora_run), "--labels", "base", "finetune",
                    "--data", str(val_jsonl), "--samples", "2", "--max-new-tokens", "4", "--output-dir", str(out)])
    assert rc == 0
    a = json.loads((out / "base" / "eval_results.json").read_text(encoding="utf-8"))
    b = json.loads((out / "finetune" / "eval_results.json").read_text(encoding="utf-8"))
    assert a["model_info"]["adapter"] is None and b["model_info"]["adapter"].endswith("adapter_best")
    pa = [json.loads(x) for x in (out / "base" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    pb = [json.loads(x) for x in (out / "finetune" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["line"] for p in pa] == [p["line"] for p in pb]  # the same samples
    assert a["metrics"]["answer_ppl"] != b["metrics"]["answer_ppl"]  # the adapter changes the model
    cmp = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert (cmp["a"], cmp["b"]) == ("base", "finetune")
    ppl_row = next(r for r in cmp["rows"] if r["metric"] == "answer_ppl")
    assert ppl_row["delta"] == pytest.approx(b["metrics"]["answer_ppl"] - a["metrics"]["answer_ppl"])
    md = (out / "compare.md").read_text(encoding="utf-8")
    assert "| metric | base | finetune |" in md and "answer perplexity" in md
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_comparison_rows_know_which_direction_is_better():
    a = {"metrics": {"rougeL": 0.2, "answer_ppl": 12.0}, "kormedmcqa": {"doctor": 0.4, "micro": 0.4}}
    b = {"metrics": {"rougeL": 0.3, "answer_ppl": 9.0}, "kormedmcqa": {"doctor": 0.4, "micro": 0.4}}
    rows = {r["metric"]: r for r in comparison_rows(a, b)}
    assert rows["rougeL"]["better"] == "B" and rows["rougeL"]["delta"] == pytest.approx(0.1)
    assert rows["answer_ppl"]["better"] == "B" and rows["answer_ppl"]["delta"] == pytest.approx(-3.0)
    assert rows["doctor"]["better"] is None
    assert "rouge1" not in rows  # absent on both sides
    table = markdown_table(list(rows.values()), "A", "B")
    assert "| answer perplexity ↓ | 12.0000 | **9.0000** | -3.0000 |" in table


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to evaluate"),
        (["--data", "missing.jsonl"], "--data not found"),
        (["--data", "empty.jsonl"], "--data is empty"),
        (["--data", "bad.jsonl"], "--data has no usable records"),
        (["--kormedmcqa", "nowhere"], "KorMedMCQA folder not found"),
        (["--kormedmcqa", "mcq"], "missing column(s) E"),
        (["--data", "bad.jsonl", "--samples", "-1"], "--samples must be >= 0"),
        (["--kormedmcqa", "mcq", "--kormedmcqa-fewshot", "9"], "--kormedmcqa-fewshot must be 0-5"),
    ],
)
def test_bad_inputs_fail_before_loading_a_model(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q"}\n{oops\n', encoding="utf-8")
    (tmp_path / "mcq" / "doctor").mkdir(parents=True)
    (tmp_path / "mcq" / "doctor" / "test.csv").write_text("question,A,B,C,D,answer\nq,a,b,c,d,1\n", encoding="utf-8")
    # a model path that does not exist: these errors must come before any model loading
    rc = run_cli(eval_main, ["--model", str(tmp_path / "no_model"), "--kormedmcqa-subsets", "doctor", *args])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"error: {message}" in err or (message in err and err.startswith("error: "))
