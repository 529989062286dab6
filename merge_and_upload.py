#!/usr/bin/env python
"""Merge a trained LoRA adapter into its base model, write the model card, and upload to the Hub.

    python merge_and_upload.py --base LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct \\
        --adapter runs/medqa/adapter_best --output outputs/merged --push

The merge streams the base checkpoint tensor by tensor (about one weight of RAM, exact fp32 math);
see docs/model_merge.md for the merge modes, layouts, the card and the EXAONE license rules.

Runs through hai_medqa.cli.run_cli: a user error is one line (also in --log-file), exit 1; SIGINT,
SIGTERM and SIGHUP exit 128 + the signal number. Before any work the paths are checked
(hai_medqa.guards): no output may be, contain or lie inside the base, the adapter or an
--eval-results file, or be or contain the training run folder (RUN/merged is fine); a file where a
folder is expected is one line. The output folder appears only when complete (io_utils.atomic_dir):
an interrupt leaves no partial folder and an existing one byte-identical.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from loguru import logger

from hai_medqa.cli import run_cli
from hai_medqa.errors import HaiMedQAError
from hai_medqa.guards import PathError, check_input_kinds, check_output_paths, same_path
from hai_medqa.io_utils import fault_point
from hai_medqa.logging_setup import FILE_ONLY, setup_logging
from hai_medqa.publish.release import make_release

USER_ERRORS = (HaiMedQAError, OSError)  # every stage's error (merge, adapter, card, publish, model) and file errors


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = (m[2] or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m[1]) * factor)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model: local folder (EXAONE or Llama layout) or Hub id")
    p.add_argument("--adapter", required=True, help="adapter folder, or a training run folder (uses adapter_best/)")
    p.add_argument("--output", required=True, help="folder to write (appears only when complete)")
    p.add_argument("--merge-into", choices=("original", "nf4"), default="original",
                   help="add the LoRA deltas to the original bf16 weights (default) or to the NF4-dequantised "
                        "weights training saw (reproduces the training-time forward)")
    p.add_argument("--layout", choices=("llama", "exaone"), default="llama",
                   help="llama (default): loads with plain transformers; exaone: EXAONE-3.5's own layout")
    p.add_argument("--repo-id", help="Hub repo, OWNER/NAME or NAME (default: <you>/EXAONE-…-HAI-MedQA)")
    p.add_argument("--push", action="store_true", help="upload to the Hub after writing the folder")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=True, help="private repo (default)")
    vis.add_argument("--public", dest="private", action="store_false", help="public repo")
    p.add_argument("--adapter-only", action="store_true", help="publish only the adapter (no merge)")
    p.add_argument("--dry-run", action="store_true",
                   help="do everything except the network: print repo id, visibility and every file with its size")
    p.add_argument("--allow-noncompliant-name", action="store_true",
                   help="allow a repo name not starting with 'EXAONE' (the EXAONE license requires it)")
    p.add_argument("--base-model-id", help="Hub id of the base for the card (default: inferred)")
    p.add_argument("--run-dir", help="training run folder for the card (default: the adapter's parent)")
    p.add_argument("--eval-results", action="append",
                   help="eval_results.json to show in the card (default: RUN_DIR/eval_results.json); repeat it to "
                        "add other models' results with --include-foreign-eval")
    p.add_argument("--include-foreign-eval", action="store_true",
                   help="show evaluation results of other models (e.g. the base model) in a comparison table, "
                        "labelled as theirs, instead of stopping")
    p.add_argument("--allow-missing-license", action="store_true",
                   help="upload even though the base folder has no full EXAONE license text (the card says so)")
    p.add_argument("--gguf", metavar="TYPES",
                   help="also export GGUF files of the merged model (llama.cpp type names, comma-separated, e.g. "
                        "f16,q8_0,q4_k_m) with an Ollama Modelfile into <output>-GGUF; with --push they go to "
                        "<repo>-GGUF (docs/model_merge.md, 'Use it elsewhere')")
    p.add_argument("--gguf-output", help="folder for the GGUF release (default: <output>-GGUF)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (after success)")
    p.add_argument("--log-file", help="also write the log to this file")
    return p


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the path, before any work: a base, adapter or run folder that is a
    file, an --eval-results that is a folder, and an output (--output, --gguf-output, --log-file)
    that is, contains or lies inside the base, the adapter folder or an evaluation file, or that is or
    contains the run folder (an output inside it, RUN/merged, is where releases usually go)."""
    from hai_medqa.merge.lora import resolve_adapter_dir
    from hai_medqa.run_folder import find_run_dir

    base = Path(args.base).expanduser()
    local_base = base if base.exists() else None  # else a Hub id, downloaded into the cache
    evals = {f"--eval-results {p}": p for p in args.eval_results or []}
    check_input_kinds(files=evals, folders={"--base": local_base, "--adapter": args.adapter, "--run-dir": args.run_dir})
    adapter_dir = resolve_adapter_dir(args.adapter)
    run = Path(args.run_dir) if args.run_dir else find_run_dir(adapter_dir)
    outputs = {"--output": args.output, "--gguf-output": args.gguf_output, "--log-file": args.log_file}
    check_output_paths({"--base": local_base, "--adapter": adapter_dir, **evals}, outputs,
                       folders={"--output", "--gguf-output"})
    if run is not None and run.is_dir():
        for label, out in outputs.items():
            if out is not None and (same_path(out, run) or any(same_path(out, a) for a in Path(run).resolve().parents)):
                raise PathError(f"{label} {out} {'is' if same_path(out, run) else 'contains'} the training run "
                                f"folder {run}; write it elsewhere (e.g. {Path(run) / 'merged'})")


def main(argv: list[str] | None = None) -> int:
    """The command line (exit codes and messages of hai_medqa.cli.run_cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_paths(args)
    except USER_ERRORS as e:  # the line reaches the log file too, unless the log file is what is wrong
        if args.log_file and "--log-file" not in str(e):
            _log_error(args.log_file, e)
        raise
    setup_logging(args.log_file)
    try:
        fault_point("merge:start")  # fault-injection tests stop here (tests/merge/test_merge_faults.py)
        gguf_types = None
        if args.gguf is not None:  # checked before the merge: a typo costs nothing
            from hai_medqa.publish.gguf_export import parse_gguf_types
            from hai_medqa.publish.gguf_release import make_gguf_release

            if args.adapter_only:
                raise HaiMedQAError("--gguf needs the merged model; it cannot be combined with --adapter-only")
            gguf_types = parse_gguf_types(args.gguf)
        result = make_release(
            args.base, args.adapter, args.output, merge_into=args.merge_into, layout=args.layout,
            repo_id=args.repo_id, push=args.push, private=args.private, adapter_only=args.adapter_only,
            dry_run=args.dry_run, allow_noncompliant_name=args.allow_noncompliant_name,
            base_model=args.base_model_id, run_dir=args.run_dir, eval_results=args.eval_results,
            include_foreign_eval=args.include_foreign_eval, allow_missing_license=args.allow_missing_license,
            max_shard_bytes=args.max_shard_size, overwrite=args.overwrite,
        )
        if gguf_types:
            make_gguf_release(result.folder, gguf_types, repo_id=result.repo_id, out_dir=args.gguf_output,
                              push=args.push, dry_run=args.dry_run, private=args.private,
                              allow_noncompliant_name=args.allow_noncompliant_name, overwrite=args.overwrite)
    except USER_ERRORS as e:  # run_cli prints the line (and puts the traceback in the log file)
        _log_error(None, e)
        raise
    except KeyboardInterrupt as e:
        e.add_note(f"{args.output} appears only when complete: no partial folder was left, and an existing one "
                   "is replaced only by a finished merge")
        raise
    return 0


def _log_error(log_file: str | None, e: BaseException) -> None:
    """The console's ``error: ...`` line in the log file too (`log_file`: set logging up first)."""
    if log_file:
        setup_logging(log_file)
    text = str(e).strip()
    logger.bind(**{FILE_ONLY: True}).error(f"error: {text.splitlines()[0] if text else type(e).__name__}")


if __name__ == "__main__":
    sys.exit(main())
