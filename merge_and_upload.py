#!/usr/bin/env python
"""Merge a trained LoRA adapter into its base model, write the model card, and upload to the Hub.

    python merge_and_upload.py --base LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct \\
        --adapter runs/medqa/adapter_best --output outputs/merged --push

The merge streams the base checkpoint tensor by tensor (about one weight of RAM, exact fp32 math);
see docs/model_merge.md for the merge modes, layouts, the card and the EXAONE license rules.
"""

from __future__ import annotations

import argparse
import re
import sys

from loguru import logger

from hai_medqa.errors import HaiMedQAError
from hai_medqa.logging_setup import setup_logging
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


def _to_log_file(log_file: str | None, message: str, *, traceback: bool = False) -> None:
    """`message` (with the current traceback) in the log file only: the console has its own line."""
    if log_file:
        logger.remove()
        logger.add(log_file, level="DEBUG", encoding="utf-8")
        (logger.opt(exception=True) if traceback else logger).error(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    try:
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
    except USER_ERRORS as e:
        line = f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        print(line, file=sys.stderr, flush=True)
        _to_log_file(args.log_file, line)
        return 1
    except Exception as e:  # a bug: its traceback on the console and in the log file
        _to_log_file(args.log_file, f"unexpected {type(e).__name__}: {e}", traceback=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
