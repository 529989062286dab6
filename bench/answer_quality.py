"""Answer quality of two training variants on the same data and seed, compared within noise (issue 17 item 4).

The FP8 base must show that `chat.py`'s answers from its adapter match the exact (NF4) path's quality on the
evaluation set within noise. This trains two adapters with S_F2.py (arm A: the reference; arm B: the same
plus `--arm-b`'s keys, by default ``base_precision=fp8``), on two GPUs at once where there are two, then
answers the same validation samples with each through evaluate.py on the same bf16 base (how a merged
release serves them) and compares them: every ROUGE row says whether its difference is within the paired
95% noise (hai_medqa/evaluation/report.py).

    python bench/answer_quality.py --shape 7.8b --steps 200 --out $OUT/answer_quality_fp8.json
    python bench/answer_quality.py --shape tiny --profile plain --arm-b lora_dropout=0.1 --steps 4   # CPU mechanics

On the random stand-in checkpoints here (no real weights) the data are the bench's synthetic records (a
learnable sentence cycle), so "quality" is how well each adapter learnt that pattern: a proxy for the real
check, which needs EXAONE's weights and the AI Hub validation set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from multi_gpu_e2e import launch, parse_keys, prepare_model_and_data, s_f2_command  # noqa: E402

from hai_medqa import run_folder  # noqa: E402
from hai_medqa.evaluation.report import COMPARE_JSON, COMPARE_MD  # noqa: E402
from hai_medqa.evaluation.runner import PREDICTIONS  # noqa: E402
from hai_medqa.io_utils import iter_jsonl  # noqa: E402

# Below this share of distinct answers (per arm) the answers are mostly the same few sentences: see `verdict`.
MIN_DISTINCT_SHARE = 0.5


def verdict(rows: list[dict], distinct: dict[str, int] | None = None, samples: int | None = None) -> dict:
    """Whether B's answers match A's within noise: every ROUGE row with a noise estimate is within it.

    Rows outside the noise are also split by direction (``better``: "B" or "A", from report.comparison_rows).
    `distinct` (distinct answers per arm) and `samples` (questions answered) judge whether the answers can
    carry the comparison at all: an adapter that answers most questions with the same few sentences (a
    stand-in model that learnt little) makes every ROUGE difference a matter of which sentence it picked, and
    the per-question noise assumes answers that vary with the question. ``judgeable`` is then false.

    >>> verdict([{"group": "metrics", "metric": "rougeL", "within_noise": False, "delta": 0.03, "better": "B"},
    ...          {"group": "metrics", "metric": "answer_ppl", "within_noise": None, "delta": 2.0, "better": "A"}],
    ...         distinct={"nf4": 30, "fp8": 4}, samples=35)  # doctest: +NORMALIZE_WHITESPACE
    {'rouge_rows': 1, 'within_noise': [], 'outside_noise': ['rougeL'], 'match_within_noise': False,
     'b_better_outside_noise': ['rougeL'], 'b_worse_outside_noise': [], 'distinct_answers': {'nf4': 30, 'fp8': 4},
     'samples': 35, 'judgeable': False}
    """
    rouge = [r for r in rows if r["group"] == "metrics" and r["metric"] != "answer_ppl" and r["within_noise"] is not None]
    inside = [r["metric"] for r in rouge if r["within_noise"]]
    outside = [r for r in rouge if not r["within_noise"]]
    out = {"rouge_rows": len(rouge), "within_noise": inside, "outside_noise": [r["metric"] for r in outside],
           "match_within_noise": bool(rouge) and not outside,
           "b_better_outside_noise": [r["metric"] for r in outside if r.get("better") == "B"],
           "b_worse_outside_noise": [r["metric"] for r in outside if r.get("better") == "A"]}
    if distinct is not None and samples:
        out.update(distinct_answers=distinct, samples=samples,
                   judgeable=all(n >= MIN_DISTINCT_SHARE * samples for n in distinct.values()))
    return out


def distinct_answers(predictions: Path) -> tuple[int, int]:
    """(distinct answers, answered questions) in one arm's evaluate.py predictions.jsonl."""
    answers = [row["prediction"] for _, row in iter_jsonl(predictions)]
    return len(set(answers)), len(answers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7.8b", choices=["tiny", "2.4b", "7.8b", "32b"])
    ap.add_argument("--storage-dtype", default=None, help="on-disk dtype of a random real-shape checkpoint")
    ap.add_argument("--profile", default="fast", help="both arms' training profile")
    ap.add_argument("--arm-b", default="base_precision=fp8", help="arm B's keys on top of arm A's (KEY=VALUE,...)")
    ap.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=64, help="validation samples both adapters answer")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="any other TrainConfig key for both arms")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/hai_quality"))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "answer_quality.json"))
    args = ap.parse_args(argv)
    try:
        arm_b = parse_keys([part.strip() for part in args.arm_b.split(",") if part.strip()])
        shared = parse_keys(args.overrides)
    except ValueError as e:
        ap.error(str(e))
    labels = args.labels or ["A", "B_" + "_".join(f"{k}-{v}" for k, v in arm_b.items())]

    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HAI_MEDQA_CACHE", str(work / "cache"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, train, val = prepare_model_and_data(args.shape, work, args.storage_dtype)
    gpus = torch.cuda.device_count()
    config = REPO / "configs" / ("tiny_cpu.yaml" if args.shape == "tiny" else "exaone35_7.8b_qlora.yaml")
    common = {"model": model, "train_file": train, "val_file": val, "max_steps": args.steps, "profile": args.profile,
              "eval_steps": args.steps, "save_steps": 10**6, "cache_dir": work / "tok_cache", "tensorboard": "false",
              "sample_questions": 0, **shared}
    runs = {labels[0]: work / "run_a", labels[1]: work / "run_b"}
    arms = {labels[0]: common, labels[1]: {**common, **arm_b}}
    report: dict = {"argv": sys.argv[1:] if argv is None else argv, "shape": args.shape, "gpus": gpus,
                    "device": torch.cuda.get_device_name(0) if gpus else "cpu", "date": time.strftime("%Y-%m-%d"),
                    "arms": {label: {k: str(v) for k, v in keys.items() if k not in ("model", "train_file", "val_file",
                                                                                   "cache_dir")}
                             for label, keys in arms.items()},
                    "runs": []}
    for path in runs.values():
        shutil.rmtree(path, ignore_errors=True)
    # Training: both arms at once on two GPUs (one each), else one after the other.
    def train_arm(k: int, label: str) -> dict:
        return launch(f"train {label}", s_f2_command(1, "ddp", config, {**arms[label], "output_dir": runs[label]}),
                      out.parent / f"answer_quality_train_{k}.log",
                      env={"CUDA_VISIBLE_DEVICES": str(k)} if gpus >= 2 else None)

    if gpus >= 2:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            report["runs"] += list(pool.map(train_arm, range(2), labels))
    else:
        report["runs"] += [train_arm(k, label) for k, label in enumerate(labels)]
    for label, run in runs.items():
        summary = run / run_folder.SUMMARY
        if summary.is_file():
            report.setdefault("summaries", {})[label] = json.loads(summary.read_text(encoding="utf-8"))
    if any(r["exit_code"] != 0 for r in report["runs"]):
        out.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        print(f"a training arm failed: see {out.parent}/answer_quality_train_*.log", file=sys.stderr)
        return 1
    # Answers: both adapters on the same bf16 base, greedy, the same samples; compared with the paired noise.
    cmp_dir = work / "compare"
    shutil.rmtree(cmp_dir, ignore_errors=True)
    evaluate = [sys.executable, str(REPO / "evaluate.py"), "--model", str(model), "--compare", str(runs[labels[0]]),
                str(runs[labels[1]]), "--labels", *labels, "--data", str(val), "--samples", str(args.samples),
                "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0", "--output-dir", str(cmp_dir)]
    if not gpus:
        evaluate += ["--device", "cpu", "--dtype", "float32"]
    report["runs"].append(launch("evaluate", evaluate, out.parent / "answer_quality_evaluate.log"))
    compare = cmp_dir / COMPARE_JSON
    if compare.is_file():
        cmp = json.loads(compare.read_text(encoding="utf-8"))
        report["comparison"] = cmp["rows"]
        counts = {label: distinct_answers(cmp_dir / label / PREDICTIONS) for label in labels}
        report["verdict"] = verdict(cmp["rows"], {label: n for label, (n, _) in counts.items()},
                                    max(total for _, total in counts.values()))
        report["compare_md"] = (cmp_dir / COMPARE_MD).read_text(encoding="utf-8")
        print(report["compare_md"])
        print(json.dumps(report["verdict"]))
        if not report["verdict"]["judgeable"]:
            print("the answers cannot carry this comparison: "
                  + ", ".join(f"{label} gave {n} distinct answer(s)" for label, n in
                              report["verdict"]["distinct_answers"].items())
                  + f" to {report['verdict']['samples']} questions (see verdict's docstring)", file=sys.stderr)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    print(f"report: {out}")
    return 0 if report["runs"][-1]["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
