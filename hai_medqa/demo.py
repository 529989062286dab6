"""The whole pipeline on the bundled sample, on CPU, in a few minutes: `make demo`.

Runs the same top-level scripts a user runs, in order, printing each command first:
  1. preprocess_medical.py   bundled AI Hub sample (TL.zip / VL.zip) -> train/val jsonl
  2. hai_medqa.fixtures.tiny_model    tiny random-weight checkpoint in EXAONE-3.5's own layout (stands in for
                             LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct, which cannot be downloaded here)
  3. S_F2.py                 QLoRA fine-tuning (4-bit NF4 on CPU) with configs/tiny_cpu.yaml
  4. merge_and_upload.py     streaming merge into bf16-style full weights + model card, --dry-run upload
  5. chat.py                 one answer from the merged model, in EXAONE's chat format

The tiny model is random, so its answers are gibberish made of sample words; the demo shows that
every stage runs and hands the next one what it needs. With the real model, replace the model path
by the Hub id (see README).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "hai_medqa" / "resources" / "aihub_sample"
QUESTION = "요즘 두통이 자주 생기는데 생활 습관을 어떻게 바꾸면 좋을까요?"


def _run(step: str, args: list[str]) -> None:
    cmd = [sys.executable, *args]
    print(f"\n=== {step}\n$ {shlex.join(['python', *args])}", flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: demo step '{step}' failed with exit code {proc.returncode}")
    print(f"--- {step}: done in {time.time() - t:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the whole HAI MedQA pipeline on the bundled sample (CPU).")
    parser.add_argument("--workdir", default="outputs/demo", help="where every artefact is written")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if not work.is_absolute():
        work = REPO / work
    data, model, run, merged = work / "data", work / "tiny_exaone", work / "run", work / "merged"
    t0 = time.time()

    _run("1/5 preprocess", ["preprocess_medical.py", "--input", str(SAMPLE / "TL.zip"),
                            "--output", str(data / "train.jsonl"), "--no-progress"])
    _run("1/5 preprocess (validation)", ["preprocess_medical.py", "--input", str(SAMPLE / "VL.zip"),
                                         "--output", str(data / "val.jsonl"), "--no-progress"])
    if not (model / "config.json").exists():
        _run("2/5 tiny EXAONE-layout stand-in", ["-m", "hai_medqa.fixtures.tiny_model", str(model)])
    if run.exists():  # a finished demo run: train afresh so the demo always shows the whole path
        import shutil

        shutil.rmtree(run)
    _run("3/5 QLoRA fine-tuning", ["S_F2.py", "--config", "configs/tiny_cpu.yaml", "--model", str(model),
                                   "--train-file", str(data / "train.jsonl"), "--val-file", str(data / "val.jsonl"),
                                   "--output-dir", str(run)])
    _run("4/5 merge + model card + dry-run upload",
         ["merge_and_upload.py", "--base", str(model), "--adapter", str(run), "--output", str(merged),
          "--repo-id", "your-hf-id/EXAONE-3.5-MedQA-demo", "--dry-run", "--overwrite"])
    _run("5/5 one answer from the merged model", ["chat.py", "--model", str(merged), "--prompt", QUESTION,
                                                  "--max-new-tokens", "40"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; everything is under {work}", flush=True)
    print(f"  training curve: {run / 'loss_curve.png'}\n  model card:     {merged / 'README.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
