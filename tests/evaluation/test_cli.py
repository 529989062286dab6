"""evaluate.py on the tiny stand-in: answer perplexity uses the training loss tokens, results JSON
schema, --compare outputs (JSON, markdown, PNG), clear errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

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
    # padding in a batch does not change the score. Tolerance as above: float32 sums over padded and unpadded
    # shapes differ in the last bits (a clean-clone run once gave 5.4e-5 relative at ppl ~1593), while a pad
    # token scored or attended to moves the score by percents.
    one_by_one = answer_perplexity(model, tok, CONVERSATIONS, system_prompt=system, batch_size=1)
    assert one_by_one["answer_ppl"] == pytest.approx(got["answer_ppl"], rel=1e-4)


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
    # the noise of each ROUGE difference, from the two models' per-sample scores on the same samples
    rouge = next(r for r in cmp["rows"] if r["metric"] == "char_rougeL")
    diffs = [q["char_rougeL"] - p["char_rougeL"] for p, q in zip(pa, pb, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    assert rouge["delta"] == pytest.approx(mean) and rouge["delta_stderr"] == pytest.approx(se)
    assert rouge["within_noise"] == (abs(mean) <= 1.96 * se) and ppl_row["delta_stderr"] is None
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
    assert "| answer perplexity ↓ | 12.0000 | **9.0000** | -3.0000 | — |" in table  # no per-sample noise


def test_a_comparison_says_whether_a_difference_is_within_the_noise_of_the_same_samples():
    """Two models on the same samples: per-sample differences give the noise of the mean difference. A shift
    well inside it is "within noise" (no side bold); the same mean shift with steady per-sample differences is
    a real one. KorMedMCQA items pair by position, per subset and pooled."""
    from hai_medqa.evaluation.report import NOISE_Z, paired_differences

    a = {"metrics": {"rougeL": 0.30, "char_rougeL": 0.30}, "kormedmcqa": {"doctor": 0.5, "micro": 0.5, "macro": 0.5}}
    b = {"metrics": {"rougeL": 0.31, "char_rougeL": 0.31}, "kormedmcqa": {"doctor": 0.75, "micro": 0.75, "macro": 0.75}}
    noisy = [0.2, -0.18, 0.25, -0.2, 0.01, -0.03, 0.04, -0.01]  # mean +0.01, spread ~0.15
    steady = [0.01 + 0.001 * (k % 2) for k in range(8)]  # mean ~+0.01, spread ~0.0005
    samples_a = [{"line": k, "rougeL": 0.3, "char_rougeL": 0.3} for k in range(8)]
    samples_b = [{"line": k, "rougeL": 0.3 + noisy[k], "char_rougeL": 0.3 + steady[k]} for k in reversed(range(8))]
    mcq = [{"subset": "doctor", "source": str(k), "gold": "A"} for k in range(4)]
    mcq_a = [dict(m, pred=p) for m, p in zip(mcq, "AABB", strict=True)]
    mcq_b = [dict(m, pred=p) for m, p in zip(mcq, "AAAB", strict=True)]
    paired = paired_differences(samples_a, samples_b, mcq_a, mcq_b)
    assert paired["rougeL"] == pytest.approx(noisy) and paired["doctor"] == paired["micro"] == [0.0, 0.0, 1.0, 0.0]
    rows = {r["metric"]: r for r in comparison_rows(a, b, paired)}
    assert rows["rougeL"]["within_noise"] is True and rows["rougeL"]["better"] is None
    assert rows["rougeL"]["delta_stderr"] > rows["rougeL"]["delta"] / NOISE_Z
    assert rows["char_rougeL"]["within_noise"] is False and rows["char_rougeL"]["better"] == "B"
    assert rows["doctor"]["within_noise"] is True  # one item of four
    assert rows["macro"]["delta_stderr"] is None and rows["macro"]["better"] == "B"  # no per-sample figure
    table = markdown_table(list(rows.values()), "A", "B")
    assert "| ROUGE-L (morpheme) ↑ | 0.3000 | 0.3100 | +0.0100 | ±" in table and ": within noise |" in table
    assert "| ROUGE-L (character) ↑ | 0.3000 | **0.3100** |" in table and ": a real difference |" in table
    # other items (another subset or order) are not paired
    assert "doctor" not in paired_differences([], [], mcq_a, [dict(m, subset="nurse") for m in mcq_b])


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


# ---------------------------------------------------------------- guards (before any model loads)


@pytest.fixture
def no_model_load(monkeypatch):
    from hai_medqa.evaluation import cli as eval_cli

    def tripwire(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(eval_cli, "load_for_inference", tripwire)


@pytest.mark.parametrize("case", ["output_dir_is_file", "output_in_model", "output_in_adapter", "data_is_folder",
                                  "kormedmcqa_is_file"])
def test_paths_are_checked_before_any_work(tmp_path, tiny_exaone_dir, tiny_lora_run, val_jsonl, capsys,
                                           no_model_load, case):
    out, data, extra = tmp_path / "eval", val_jsonl, []
    expected = {"output_dir_is_file": "is a file; expected a folder", "output_in_model": "lies inside the input --model",
                "output_in_adapter": "lies inside the input --adapter", "data_is_folder": "is a folder; expected a file",
                "kormedmcqa_is_file": "is a file; expected a folder"}[case]
    if case == "output_dir_is_file":
        out = tmp_path / "results.json"
        out.write_text("keep me", encoding="utf-8")
    elif case == "output_in_model":
        out = tiny_exaone_dir / "eval"
    elif case == "output_in_adapter":
        extra = ["--adapter", str(tiny_lora_run)]
        out = tiny_lora_run / "adapter_best"
    elif case == "data_is_folder":
        data = tmp_path
    elif case == "kormedmcqa_is_file":
        extra = ["--kormedmcqa", str(val_jsonl)]
    rc = run_cli(eval_main, ["--model", str(tiny_exaone_dir), "--data", str(data), "--output-dir", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tiny_exaone_dir / "eval").exists() and not (tiny_lora_run / "adapter_best" / "eval_results.json").exists()
    if case == "output_dir_is_file":
        assert out.read_text(encoding="utf-8") == "keep me"


def test_results_may_go_into_the_run_folder(tmp_path, tiny_exaone_dir, tiny_lora_run, val_jsonl, no_model_load):
    """RUN/eval_results.json is where merge_and_upload.py looks: the adapter read is RUN/adapter_best."""
    with pytest.raises(AssertionError, match="a model was loaded"):  # the guards let it through
        eval_main(["--model", str(tiny_exaone_dir), "--adapter", str(tiny_lora_run), "--data", str(val_jsonl),
                   "--output-dir", str(tiny_lora_run)])


# ---------------------------------------------------------------- interrupt and resume (real kills)

EVAL_ARGS = ["--dtype", "float32", "--device", "cpu", "--samples", "8", "--batch-size", "2", "--max-new-tokens", "8",
             "--kormedmcqa-subsets", "pharm,dentist", "--kormedmcqa-max-new-tokens", "3"]


def _eval_args(repo_root, tiny_exaone_dir, run, val, out) -> list[str]:
    return ["--model", str(tiny_exaone_dir), "--compare", "base", str(run), "--labels", "base", "ft", "--data", str(val),
            "--kormedmcqa", str(repo_root / "tests" / "fixtures" / "kormedmcqa"), "--output-dir", str(out), *EVAL_ARGS]


def _snapshot(out) -> dict:
    """Every result file, with the creation time (the one field two runs never share) taken out."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if name.endswith(".json"):
            obj = json.loads(path.read_text(encoding="utf-8"))
            for res in [obj, *(obj.get("results") or {}).values()]:
                res.pop("created", None)
            files[name] = obj
        elif not name.endswith(".png"):  # matplotlib embeds nothing variable, but the plot is checked by size only
            files[name] = path.read_bytes()
        else:
            files[name] = path.stat().st_size > 5000
    return files


@pytest.fixture(scope="module")
def uninterrupted_eval(tmp_path_factory, repo_root, tiny_exaone_dir, tiny_lora_run, val_jsonl) -> dict:
    out = tmp_path_factory.mktemp("eval_full") / "eval"
    assert run_cli(eval_main, _eval_args(repo_root, tiny_exaone_dir, tiny_lora_run, val_jsonl, out)) == 0
    snap = _snapshot(out)
    assert not [n for n in snap if n.endswith(".partial")]  # the journals are gone
    return snap


@pytest.mark.slow
@pytest.mark.parametrize("sig, during", [(signal.SIGINT, "base"), (signal.SIGTERM, "ft"), (signal.SIGKILL, "base")],
                         ids=["SIGINT-first-model", "SIGTERM-second-model", "SIGKILL-first-model"])
def test_killed_evaluation_resumes_to_the_same_results(tmp_path, repo_root, tiny_exaone_dir, tiny_lora_run, val_jsonl,
                                                       uninterrupted_eval, capsys, sig, during):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(repo_root / "evaluate.py"), *_eval_args(repo_root, tiny_exaone_dir, tiny_lora_run,
                                                                    val_jsonl, out)],
        cwd=repo_root, text=True, encoding="utf-8", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # Ctrl-C as at a terminal
    journal = out / during / "eval_results.json.partial"
    deadline = time.monotonic() + 300
    while _entries(journal) < 2:  # two answers of `during` are done: interrupt now
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be interrupted: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "no answers were journaled in time"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], err[-2000:]
    if sig != signal.SIGKILL:
        last = err.rstrip().splitlines()[-1]
        assert last.startswith(f"interrupted by {'Ctrl-C (SIGINT)' if sig == signal.SIGINT else 'SIGTERM'}: ")
        assert f"kept in {journal}; run the same command with --resume to continue" in last
    assert (out / "notes.txt").read_text(encoding="utf-8") == "the user's own file"
    assert not (out / "compare.json").exists() and not (out / during / "eval_results.json").exists()
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    done_first = ["base/eval_results.json", "base/eval_results.json.partial", "base/kormedmcqa_items.jsonl",
                  "base/predictions.jsonl"] if during == "ft" else []
    assert leftovers == sorted([*done_first, f"{during}/eval_results.json.partial", "notes.txt"])  # nothing stray

    assert run_cli(eval_main, _eval_args(repo_root, tiny_exaone_dir, tiny_lora_run, val_jsonl, out)) == 1
    assert "add --resume to continue it" in capsys.readouterr().err
    assert run_cli(eval_main, [*_eval_args(repo_root, tiny_exaone_dir, tiny_lora_run, val_jsonl, out), "--resume"]) == 0
    (out / "notes.txt").unlink()
    assert _snapshot(out) == uninterrupted_eval


def _entries(journal) -> int:
    try:
        return max(0, journal.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0
