"""``chat.py``: talk to a merged model or base + adapter - interactive, one prompt, or a jsonl batch."""

from __future__ import annotations

import argparse
import json
import sys

from loguru import logger

from hai_medqa.guards import check_input_kinds, check_output_paths
from hai_medqa.inference.cli_common import (
    add_generation_args,
    add_model_args,
    add_system_prompt_arg,
    local_path,
    model_identity,
    settings_from_args,
)
from hai_medqa.inference.generation import InferenceError, load_for_inference, resolve_adapter
from hai_medqa.inference.repl import HELP, ChatSession, run_repl
from hai_medqa.inference.resume import GenerationJournal, journal_path
from hai_medqa.inference.safety import SafetyLayer
from hai_medqa.inference.system_prompt import choose_system_prompt
from hai_medqa.io_utils import sha256_file
from hai_medqa.logging_setup import setup_logging
from hai_medqa.run_folder import find_adapter_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chat.py",
        description="Chat with the fine-tuned model (EXAONE chat format, stops at [|endofturn|]). "
                    "Interactive by default; --prompt answers one question; --input/--output answers a jsonl file.",
    )
    add_model_args(p)
    mode = p.add_argument_group("mode")
    mode.add_argument("--prompt", help="answer this one question and exit")
    mode.add_argument("--input", help="jsonl of questions (instruction / prompt / question / messages)")
    mode.add_argument("--output", help="jsonl to write the answers to (with --input); answers are kept in "
                                       "<output>.partial until the end")
    mode.add_argument("--resume", action="store_true",
                      help="with --input/--output: continue an interrupted run from <output>.partial")
    add_system_prompt_arg(p, what="")
    p.add_argument("--no-safety", action="store_true",
                   help="turn off the 119/109 guidance and the disclaimer (for evaluation only)")
    p.add_argument("--safety-rules", help="alternative safety keyword file (default: the bundled one)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each exact rendered prompt to stderr as '[prompt] <json string>' (debugging)")
    p.add_argument("--log-level", default="INFO")
    add_generation_args(p)
    return p


def _check_paths(args: argparse.Namespace) -> None:
    """Every path argument of the right kind, and no output on top of an input: before any work."""
    model = local_path(args.model)
    check_input_kinds(files={"--input": args.input, "--safety-rules": args.safety_rules},
                      folders={"--model": model, "--adapter": args.adapter})
    if args.output is not None:
        # what is read of a run folder is its adapter (RUN/adapter_best): answers may go into RUN itself
        adapter = find_adapter_dir(args.adapter) if local_path(args.adapter) else None
        check_output_paths(
            {"--input": args.input, "--model": model, "--adapter": adapter, "--safety-rules": args.safety_rules},
            {"--output": args.output, "--output's journal": journal_path(args.output)},
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    if (args.input is None) != (args.output is None):
        raise InferenceError("--input and --output go together")
    if args.prompt is not None and args.input is not None:
        raise InferenceError("use either --prompt or --input/--output, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise InferenceError("--prompt is empty")
    if args.resume and args.input is None:
        raise InferenceError("--resume continues a batch run: it goes with --input/--output")
    settings = settings_from_args(args)
    _check_paths(args)
    adapter_dir = resolve_adapter(args.adapter)
    system = choose_system_prompt(args.system_prompt, args.model, adapter_dir, args.revision)
    safety = SafetyLayer(args.safety_rules, enabled=not args.no_safety)

    def show_prompt(prompt: str) -> None:
        print("[prompt] " + json.dumps(prompt, ensure_ascii=False), file=sys.stderr, flush=True)

    if args.input is not None:  # check the file and the journal before spending minutes on loading a model
        from hai_medqa.inference.batch import read_questions, run_batch

        read_questions(args.input, system.prompt)
        fingerprint = {
            "input_sha256": sha256_file(args.input), **model_identity(args, args.model, adapter_dir),
            "system_prompt": system.prompt, "generation": settings.to_dict(), "batch_size": args.batch_size,
        }
        journal = GenerationJournal(journal_path(args.output), fingerprint, resume=args.resume)
        logger.info(system.describe())
        try:
            lm = load_for_inference(args.model, args.adapter, revision=args.revision, quantize_4bit=args.load_4bit,
                                    dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation)
            summary = run_batch(lm, args.input, args.output, settings, system_prompt=system.prompt, safety=safety,
                                journal=journal, batch_size=args.batch_size,
                                show_prompt=show_prompt if args.show_prompt else None)
        except KeyboardInterrupt as e:
            e.add_note(journal.interrupted_note())
            raise
        finally:
            journal.close()
        resumed = f", {summary['resumed']} of them from the interrupted run" if summary["resumed"] else ""
        logger.info(f"answered {summary['answered']} question(s){resumed} ({summary['skipped']} skipped) "
                    f"-> {summary['output']}")
        return 0

    logger.info(system.describe())
    lm = load_for_inference(args.model, args.adapter, revision=args.revision, quantize_4bit=args.load_4bit,
                            dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation)
    session = ChatSession(lm, settings, system_prompt=system.prompt, safety=safety,
                          show_prompt=show_prompt if args.show_prompt else None)
    if args.prompt is not None:
        session.respond(args.prompt)
        return 0
    print(f"HAI MedQA chat ({'safety on' if safety.enabled else 'safety OFF'}). {HELP}", file=sys.stderr, flush=True)
    return run_repl(session)
