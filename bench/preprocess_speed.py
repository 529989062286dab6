"""Benchmark: preprocess_medical (hai_medqa.data) against a naive seed-style reader on one tree.

Generates a synthetic AI Hub label tree (default 100,000 files) as two label roots, a small one
(20 % of the folders) and the rest, so memory can be compared at two sizes without generating twice.
After one untimed pass that reads every file (warm page cache), each reader runs in its own
subprocess, which times only the work; this process samples the RSS of it and its workers (summed,
every 20 ms) for the peak-memory column:

  naive       os.walk the question tree; json.load each question; for EACH question list its answer
              folder and json.load every answer there, pick one at random (what a first script does)
  project     run_preprocess (round_robin) with --workers 1 and with one worker per core
  project-zip the same tree read from a zip (deflated), --workers 1

Target (issue 2): project files/s >= 4 x naive files/s on the 2-core machine, warm cache.

    python bench/preprocess_speed.py                       # 100k files, 50 q + 50 a per folder
    python bench/preprocess_speed.py --files 20000 --questions-per-leaf 10 --answers-per-leaf 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def naive_seed_reader(label_roots: list[str], output: str) -> int:
    """The seed-style baseline; returns the number of records written."""
    random.seed(0)
    records = []
    for root in label_roots:
        for dirpath, _dirnames, filenames in os.walk(os.path.join(root, "1.질문")):
            for name in filenames:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    q = json.load(f)
                answer_dir = dirpath.replace("1.질문", "2.답변", 1)
                if not os.path.isdir(answer_dir):
                    continue
                answers = []
                for answer_name in os.listdir(answer_dir):
                    with open(os.path.join(answer_dir, answer_name), encoding="utf-8") as f:
                        answers.append(json.load(f))
                a = random.choice(answers)
                parts = a["answer"]
                records.append(
                    {
                        "instruction": q["question"],
                        "output": " ".join([parts["intro"], parts["body"], parts["conclusion"]]),
                        "category": q["disease_category"],
                        "disease": q["disease_name"]["kor"],
                        "intention": q["intention"],
                        "department": a["department"],
                        "question_id": q["fileName"],
                        "answer_id": a["fileName"],
                    }
                )
    with open(output, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def child(args: argparse.Namespace) -> None:
    """Run one reader and print {"seconds", "cpu_seconds", "records"} as JSON, timing the work only
    (not interpreter start-up or imports). cpu_seconds adds the pool workers' CPU time: it is what
    the work costs, and it moves less than wall time when other jobs share the machine."""
    if args.child == "naive":
        cpu0, start = time.process_time(), time.perf_counter()
        records = naive_seed_reader(args.roots, args.out)
        seconds = time.perf_counter() - start
    else:
        from hai_medqa.data import run_preprocess
        from hai_medqa.logging_setup import setup_logging

        setup_logging(level="WARNING")
        cpu0, start = time.process_time(), time.perf_counter()
        report = run_preprocess(args.roots, args.out, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        records = report["records"]["written"]
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0 + workers.ru_utime + workers.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "records": records}))


def run_child(kind: str, roots: list[Path], out: Path, workers: int = 1) -> dict:
    """Run one reader in a fresh process; sample the RSS of it and its workers every 20 ms from here
    (a sampling thread inside the child would change how its pool starts)."""
    import psutil

    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--roots",
        *map(str, roots),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = watched.memory_info().rss + sum(
                c.memory_info().rss for c in watched.children(recursive=True)
            )
            peak = max(peak, rss)
        except psutil.Error:
            pass  # a process ended between listing and reading it
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"error: {kind} run failed:\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result


def warm_cache(paths: list[Path]) -> int:
    """Read every file once so every reader meets the same warm page cache; return the file count."""
    n = 0
    for path in paths:
        if path.is_file():
            path.read_bytes()
            n += 1
            continue
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    f.read()
                n += 1
    return n


def zip_tree(roots: list[Path], zip_path: Path) -> None:
    """A TL.zip-style archive (top entries 1.질문/, 2.답변/) holding every root's files."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for root in roots:
            for dirpath, _dirs, files in os.walk(root):
                for name in sorted(files):
                    path = Path(dirpath, name)
                    zf.write(path, path.relative_to(root).as_posix())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--files", type=int, default=100_000, help="total question + answer files (default 100000)"
    )
    p.add_argument("--questions-per-leaf", type=int, default=50)
    p.add_argument("--answers-per-leaf", type=int, default=50)
    p.add_argument(
        "--workdir", default=None, help="where to generate the tree (default: a temp folder, removed after)"
    )
    p.add_argument("--no-zip", action="store_true", help="skip the zip measurement")
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per reader; the median is reported (default 1)"
    )
    p.add_argument("--child", choices=("naive", "project"), help=argparse.SUPPRESS)
    p.add_argument("--roots", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    from hai_medqa.fixtures.synthetic_trees import write_synthetic_tree

    per_leaf = args.questions_per_leaf + args.answers_per_leaf
    n_leaves = max(5, args.files // per_leaf)
    small_leaves = n_leaves // 5
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="preprocess_speed."))
    small, rest = workdir / "small" / "TL", workdir / "rest" / "TL"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        t = time.perf_counter()
        if not small.exists():  # the second root's folders are numbered after the first's: no shared keys
            write_synthetic_tree(
                small,
                n_leaves=small_leaves,
                questions_per_leaf=args.questions_per_leaf,
                answers_per_leaf=args.answers_per_leaf,
                seed=1,
            )
            write_synthetic_tree(
                rest,
                n_leaves=n_leaves - small_leaves,
                questions_per_leaf=args.questions_per_leaf,
                answers_per_leaf=args.answers_per_leaf,
                seed=2,
                first_leaf=small_leaves,
            )
        zip_path = workdir / "TL.zip"
        if not args.no_zip and not zip_path.exists():
            zip_tree([small, rest], zip_path)
        gen_s = time.perf_counter() - t
        n_files = warm_cache([small, rest] + ([] if args.no_zip else [zip_path]))
        n_small = small_leaves * per_leaf
        n_all = n_leaves * per_leaf
        print(
            f"tree: {n_leaves} folders x ({args.questions_per_leaf} q + {args.answers_per_leaf} a) = {n_all:,} files "
            f"(generated in {gen_s:.0f} s; {n_files:,} files warmed); {cores} CPU cores; python {platform.python_version()}",
            flush=True,
        )

        rows = []

        def measure(label: str, kind: str, roots: list[Path], files: int, workers: int = 1) -> dict:
            runs = [
                run_child(kind, roots, workdir / f"{label.replace(' ', '_')}.jsonl", workers)
                for _ in range(args.repeat)
            ]
            r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]  # the median run (by wall time)
            r.update(
                label=label,
                files=files,
                files_per_s=files / r["seconds"],
                peak_rss_mb=max(x["peak_rss_mb"] for x in runs),
            )
            rows.append(r)
            all_runs = ", ".join(f"{x['seconds']:.2f}" for x in runs)
            print(
                f"  {label:<28} {r['seconds']:8.2f} s  {r['files_per_s']:>10,.0f} files/s  cpu {r['cpu_seconds']:7.2f} s  "
                f"{r['records']:>8,} records  peak RSS {r['peak_rss_mb']:,.0f} MiB  (all runs: "
                f"{all_runs} s)",
                flush=True,
            )
            return r

        naive = measure("naive seed-style", "naive", [small, rest], n_all)
        fast1 = measure("project, 1 worker", "project", [small, rest], n_all, 1)
        fastn = measure(f"project, {cores} workers", "project", [small, rest], n_all, cores)
        measure("project, 1 worker, 20 %", "project", [small], n_small, 1)
        measure(f"project, {cores} workers, 20 %", "project", [small], n_small, cores)
        if not args.no_zip:
            measure("project, zip, 1 worker", "project", [zip_path], n_all, 1)

        print("\n| reader | files | wall s | files/s | × naive | CPU s | records | peak RSS (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['label']} | {r['files']:,} | {r['seconds']:.2f} | {r['files_per_s']:,.0f} | "
                f"{r['files_per_s'] / naive['files_per_s']:.1f} | {r['cpu_seconds']:.2f} | {r['records']:,} | "
                f"{r['peak_rss_mb']:,.0f} |"
            )
        best = max(fast1["files_per_s"], fastn["files_per_s"])
        ratio = best / naive["files_per_s"]
        print(f"\nspeed-up over naive: {ratio:.1f}x (target >= 4x): {'PASS' if ratio >= 4 else 'FAIL'}")
        if ratio < 4:
            sys.exit(1)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
