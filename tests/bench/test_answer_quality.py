"""bench/answer_quality.py on the CPU (tiny model, plain profile): two arms trained with S_F2.py, their answers to
the same samples compared through evaluate.py with each difference's paired noise."""

from __future__ import annotations

import json

import yaml


def test_two_arms_are_trained_apart_and_their_answers_compared_within_noise(tmp_path, bench_module):
    quality = bench_module("answer_quality")
    out = tmp_path / "out" / "answer_quality.json"
    rc = quality.main(["--shape", "tiny", "--profile", "plain", "--arm-b", "lora_dropout=0.1", "--steps", "2",
                       "--samples", "3", "--max-new-tokens", "4", "--labels", "ref", "other",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["exit_code"] for r in report["runs"]] == [0, 0, 0]
    # arm B is arm A plus its keys, and each run folder recorded its own
    dropout = {arm: yaml.safe_load((tmp_path / "work" / run / "resolved_config.yaml").read_text())["lora_dropout"]
               for arm, run in (("ref", "run_a"), ("other", "run_b"))}
    assert dropout["other"] == 0.1 and dropout["ref"] != 0.1
    assert report["arms"]["other"]["lora_dropout"] == "0.1" and "lora_dropout" not in report["arms"]["ref"]
    assert set(report["summaries"]) == {"ref", "other"}
    rows = {r["metric"]: r for r in report["comparison"]}
    assert rows["char_rougeL"]["delta_stderr"] is not None and rows["answer_ppl"]["within_noise"] is None
    v = report["verdict"]
    assert v["rouge_rows"] == 4 and sorted(v["within_noise"] + v["outside_noise"]) == sorted(
        ["rouge1", "rouge2", "rougeL", "char_rougeL"])
    assert v["match_within_noise"] == (not v["outside_noise"])
    assert sorted(v["b_better_outside_noise"] + v["b_worse_outside_noise"]) == sorted(v["outside_noise"])
    # how many different answers each arm gave, counted from its predictions
    for arm in ("ref", "other"):
        answers = [json.loads(x)["prediction"] for x in
                   (tmp_path / "work" / "compare" / arm / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        assert v["distinct_answers"][arm] == len(set(answers)) and v["samples"] == len(answers) == 3
    assert v["judgeable"] == all(n >= 1.5 for n in v["distinct_answers"].values())
    assert "| metric | ref | other |" in report["compare_md"]


def test_a_failed_training_arm_stops_before_any_answer(tmp_path, bench_module):
    quality = bench_module("answer_quality")
    out = tmp_path / "out" / "answer_quality.json"
    rc = quality.main(["--shape", "tiny", "--profile", "plain", "--arm-b", "lora_dropout=7", "--steps", "2",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 1
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["exit_code"] == 0 for r in report["runs"]] == [True, False] and "comparison" not in report


def test_the_verdict_docstring_example(bench_module):
    import doctest

    quality = bench_module("answer_quality")
    result = doctest.testmod(quality, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0
