"""`make demo` (python -m hai_medqa.demo): every stage runs, and the trained tiny model answers the consultation
sample's first complaint with the sample's follow-up question, verbatim, as its last answer (issue 14).
About a minute on an idle 2-core CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hai_medqa.demo import CONSULTATIONS, first_consultation


def test_the_demo_consultation_is_the_samples_first():
    first = json.loads((CONSULTATIONS / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])["messages"]
    complaint, follow_up, n = first_consultation()
    assert (complaint, follow_up) == (first[0]["content"], first[1]["content"]) == ("배가 아파요",
                                                                                     "복통은 어떤 부위에 발생하나요?")
    assert 40 <= n <= 80


@pytest.mark.slow
def test_demo_ends_with_the_trained_follow_up_question(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "-m", "hai_medqa.demo", "--workdir", str(tmp_path / "demo")],
                          cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("1/5 preprocess", "2/5 tiny", "3/5 QLoRA", "4/5 merge", "5/5 "):
        assert f"--- {step}" in out
    assert "What it does not prove" in out  # it says plainly what the tiny model is
    # the last answer, as the user sees it: the follow-up question, then the disclaimer (nothing else generated)
    last = out[out.rindex("사용자> "):]
    assert last.startswith("사용자> 배가 아파요\nAI> 복통은 어떤 부위에 발생하나요?\n\n※ "), last
    answer = json.loads((tmp_path / "demo" / "answer.jsonl").read_text(encoding="utf-8"))
    assert answer["model_answer"] == "복통은 어떤 부위에 발생하나요?" and answer["safety"] == []
    # the run trained every assistant turn of the consultations and recorded it
    train = json.loads((tmp_path / "demo" / "run" / "run_info.json").read_text(encoding="utf-8"))["data"]["train_file"]
    n_turns = sum(1 for line in (CONSULTATIONS / "train.jsonl").read_text(encoding="utf-8").splitlines()
                  for m in json.loads(line)["messages"] if m["role"] == "assistant")
    assert train["formats"] == {"messages": train["records"]} and train["trained_turns"] == n_turns
