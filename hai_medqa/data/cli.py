"""Command line of preprocess_medical.py: AI Hub label trees -> instruction jsonl + report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loguru import logger

from ..cli import run_cli
from ..guards import check_output_paths
from ..logging_setup import setup_logging
from .pair import PAIRING_MODES
from .preprocess import default_report_path, format_summary, input_labels, run_preprocess
from .read import SPLIT_MARKERS


def _file_state(path: str | os.PathLike) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_medical.py",
        description=(
            "Pair AI Hub healthcare QA questions with answers of the same folder and write an "
            "instruction jsonl (instruction, output, category, disease, intention, department, "
            "question_id, answer_id) plus <output>.report.json."
        ),
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="folder holding 1.질문/ and 2.답변/, a TL/VL or 02.라벨링데이터 folder or dataset root "
        "(searched), or TL.zip/VL.zip (read without extracting); repeat to combine",
    )
    p.add_argument(
        "--output", required=True, metavar="OUT.jsonl", help="jsonl to write (replaced atomically)"
    )
    p.add_argument(
        "--pairing",
        choices=PAIRING_MODES,
        default="round_robin",
        help="round_robin: one record per question, answers used evenly (default); cover: every "
        "question and every answer at least once; cross: Q x A product capped by --max-pairs-per-folder",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument(
        "--drop-intro",
        action="store_true",
        help="leave the answer intro out (it often restates the question)",
    )
    p.add_argument(
        "--max-pairs-per-folder",
        type=int,
        default=None,
        metavar="N",
        help="keep a seeded sample of at most N records per folder (required for cross)",
    )
    p.add_argument(
        "--split",
        choices=tuple(SPLIT_MARKERS),
        default=None,
        help="when a searched folder holds both Training and Validation, read only this one",
    )
    p.add_argument(
        "--allow-mixed-splits",
        action="store_true",
        help="allow Training and Validation data in one output (refused by default)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes reading folders (default: 1 for small inputs, else one per core, max 8)",
    )
    p.add_argument(
        "--report", default=None, metavar="PATH", help="report JSON (default: <output>.report.json)"
    )
    p.add_argument("--log-file", default=None, metavar="PATH", help="also write a DEBUG log here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run(argv: list[str] | None = None) -> int:
    """The preprocessing command; user errors and interrupts propagate (see `main`)."""
    args = build_parser().parse_args(argv)
    report_path = Path(args.report) if args.report else default_report_path(args.output)
    # before the log file is opened (loguru appends: a log file that is an input would be damaged)
    check_output_paths(
        input_labels(args.input),
        {"--output": args.output, "--report": report_path, "--log-file": args.log_file},
    )
    setup_logging(args.log_file)
    before = _file_state(args.output)
    try:
        report = run_preprocess(
            args.input,
            args.output,
            pairing=args.pairing,
            seed=args.seed,
            drop_intro=args.drop_intro,
            max_pairs_per_folder=args.max_pairs_per_folder,
            split=args.split,
            allow_mixed_splits=args.allow_mixed_splits,
            workers=args.workers,
            report_path=report_path,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP through run_cli: say what was kept
        if _file_state(args.output) == before:
            e.add_note(f"{args.output} was not changed")
        else:
            e.add_note(f"{args.output} was completely written, {report_path} was not")
        raise
    print(format_summary(report))
    logger.info(
        "wrote {:,} records to {} in {:.1f} s", report["records"]["written"], args.output, report["seconds"]
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing CLI through hai_medqa.cli.run_cli; return the exit status: 0 ok, 1 a
    user error (``error: <one line>``), 128 + signal number when stopped by SIGINT (130), SIGTERM
    (143) or SIGHUP (129) (``interrupted by <signal>: <what was kept>``)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
