"""The whole pipeline on the bundled samples, on CPU, in about a minute and a half: `make demo`.

Runs the same top-level scripts a user runs, in order, printing each command first:
  1. preprocess_medical.py   bundled AI Hub sample (TL.zip / VL.zip) -> single-turn train/val jsonl, the data a
                             real run trains on
  2. hai_medqa.fixtures.tiny_model    tiny random-weight checkpoint in EXAONE-3.5's own layout (stands in for
                             LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct, which cannot be downloaded here)
  3. S_F2.py                 QLoRA fine-tuning (4-bit NF4 on CPU) on the bundled multi-turn consultation sample
                             (hai_medqa/resources/consultation_sample/) with configs/tiny_consultation.yaml
  4. merge_and_upload.py     streaming merge into full weights + model card, --dry-run upload
  5. chat.py                 the sample's first complaint, answered by the merged model

The tiny model is random and knows no Korean: it can only memorise. The demo proves that every stage
runs and hands the next one what it needs, and that training changes the model: asked the sample's
first complaint, it answers with the sample's follow-up question, word for word (checked; exit code 1
if not). It says nothing about medical quality. With the real model, replace the model path by the
Hub id and train on step 1's data (see README).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "hai_medqa" / "resources" / "aihub_sample"
CONSULTATIONS = REPO / "hai_medqa" / "resources" / "consultation_sample"
CONFIG = "configs/tiny_consultation.yaml"

INTRO = """\
What this demo is: every stage of the pipeline, on this CPU, with a tiny random-weight model (3 layers,
hidden size 64, a 1k-token vocabulary) standing in for EXAONE-3.5-7.8B-Instruct (a GPU and a 15 GB download).
The tiny model knows no Korean and no medicine; all it can do is memorise. So the demo trains it on the
bundled consultation sample ({n} short multi-turn consultations, every assistant turn trained) until it
has memorised them, and then asks it the sample's first complaint. What it proves: the stages hand each
other what they need, and fine-tuning teaches the model what the data says, in the chat format chat.py
uses - it answers with the sample's follow-up question, word for word. What it does not prove: anything
about medical quality. A real run trains EXAONE-3.5 on the AI Hub data step 1 prepares (see README)."""


def _run(step: str, args: list[str], note: str = "") -> None:
    cmd = [sys.executable, *args]
    print(f"\n=== {step}" + (f"\n    {note}" if note else "") + f"\n$ {shlex.join(['python', *args])}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: demo step '{step}' failed with exit code {proc.returncode}")
    print(f"--- {step}: done in {time.time() - t:.1f} s", flush=True)


def first_consultation() -> tuple[str, str, int]:
    """(first complaint, the assistant's follow-up question) of the consultation sample's first record, and
    the number of consultations in its training file."""
    from hai_medqa.conversations import conversation_for

    lines = [line for line in (CONSULTATIONS / "train.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    _, messages = conversation_for(json.loads(lines[0]), "train")
    return messages[0]["content"], messages[1]["content"], len(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole HAI MedQA pipeline on the bundled samples (CPU).")
    parser.add_argument("--workdir", default="outputs/demo", help="where every artefact is written")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if not work.is_absolute():
        work = REPO / work
    data, model, run, merged = work / "data", work / "tiny_exaone", work / "run", work / "merged"
    complaint, follow_up, n_train = first_consultation()
    t0 = time.time()
    print(INTRO.format(n=n_train), flush=True)

    _run("1/5 preprocess", ["preprocess_medical.py", "--input", str(SAMPLE / "TL.zip"),
                            "--output", str(data / "train.jsonl"), "--no-progress"],
         "the AI Hub sample -> single-turn {instruction, output} records: what a real run trains on")
    _run("1/5 preprocess (validation)", ["preprocess_medical.py", "--input", str(SAMPLE / "VL.zip"),
                                         "--output", str(data / "val.jsonl"), "--no-progress"])
    # always rebuilt (seconds): a stand-in left by an older checkout may have another tokenizer
    _run("2/5 tiny EXAONE-layout stand-in", ["-m", "hai_medqa.fixtures.tiny_model", str(model)])
    if run.exists():  # a finished demo run: train afresh so the demo always shows the whole path
        shutil.rmtree(run)
    _run("3/5 QLoRA fine-tuning", ["S_F2.py", "--config", CONFIG, "--model", str(model), "--output-dir", str(run)],
         f"the consultation sample ({CONSULTATIONS.relative_to(REPO)}), not step 1's data: a random model "
         "cannot learn real answers in a minute, but it can memorise these")
    # The demo memorises on purpose, so the validation loss on unseen consultations rises: merge the last
    # adapter, not the one with the best validation loss. NF4: the weights training saw, exactly.
    _run("4/5 merge + model card + dry-run upload",
         ["merge_and_upload.py", "--base", str(model), "--adapter", str(run / "adapter_last"), "--output", str(merged),
          "--merge-into", "nf4", "--repo-id", "your-hf-id/EXAONE-3.5-MedQA-demo", "--dry-run", "--overwrite"])
    question_file, answer_file = work / "question.jsonl", work / "answer.jsonl"
    question_file.write_text(json.dumps({"messages": [{"role": "user", "content": complaint}]},
                                        ensure_ascii=False) + "\n", encoding="utf-8")
    _run("5/5 the sample's first complaint, answered by the merged model (greedy)",
         ["chat.py", "--model", str(merged), "--input", str(question_file), "--output", str(answer_file),
          "--max-new-tokens", "40"])
    answer = json.loads(answer_file.read_text(encoding="utf-8").splitlines()[0])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {work}", flush=True)
    print(f"  training curve: {run / 'loss_curve.png'}\n  model card:     {merged / 'README.md'}", flush=True)
    if answer["model_answer"] == follow_up:
        print("\nThe tiny model answers the sample's first complaint with the sample's follow-up question, word for "
              "word:", flush=True)
        status = 0
    else:
        print("\nerror: the tiny model did not answer with the sample's follow-up question "
              f"{follow_up!r}: training did not take (another CPU can change the numbers; see {CONFIG})", flush=True)
        status = 1
    print(f"사용자> {complaint}\nAI> {answer['answer']}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
