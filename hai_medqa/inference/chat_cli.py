"""``chat.py``: talk to a merged model or base + adapter - interactive, one prompt, or a jsonl batch."""

from __future__ import annotations

import argparse
import json
import sys

from loguru import logger

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT
from hai_medqa.inference.cli_common import add_generation_args, add_model_args, run_main, settings_from_args
from hai_medqa.inference.generation import InferenceError, load_for_inference
from hai_medqa.inference.repl import HELP, ChatSession, run_repl
from hai_medqa.inference.safety import SafetyLayer
from hai_medqa.logging_setup import setup_logging


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
    mode.add_argument("--output", help="jsonl to write the answers to (with --input)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt ('' for none; default: the project's Korean medical prompt)")
    p.add_argument("--no-safety", action="store_true",
                   help="turn off the 119/109 guidance and the disclaimer (for evaluation only)")
    p.add_argument("--safety-rules", help="alternative safety keyword file (default: the bundled one)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each exact rendered prompt to stderr as '[prompt] <json string>' (debugging)")
    p.add_argument("--log-level", default="INFO")
    add_generation_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    if (args.input is None) != (args.output is None):
        raise InferenceError("--input and --output go together")
    if args.prompt is not None and args.input is not None:
        raise InferenceError("use either --prompt or --input/--output, not both")
    if args.prompt is not None and not args.prompt.strip():
        raise InferenceError("--prompt is empty")
    settings = settings_from_args(args)
    safety = SafetyLayer(args.safety_rules, enabled=not args.no_safety)
    if args.input is not None:  # check the file before spending minutes on loading a model
        from hai_medqa.inference.batch import read_questions

        read_questions(args.input, args.system_prompt)
    lm = load_for_inference(args.model, args.adapter, revision=args.revision, quantize_4bit=args.load_4bit,
                            dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation)
    if args.input is not None:
        from hai_medqa.inference.batch import run_batch

        summary = run_batch(lm, args.input, args.output, settings, system_prompt=args.system_prompt,
                            safety=safety, batch_size=args.batch_size)
        logger.info(f"answered {summary['answered']} question(s) ({summary['skipped']} skipped) -> {summary['output']}")
        return 0

    def show_prompt(prompt: str) -> None:
        print("[prompt] " + json.dumps(prompt, ensure_ascii=False), file=sys.stderr, flush=True)

    session = ChatSession(lm, settings, system_prompt=args.system_prompt, safety=safety,
                          show_prompt=show_prompt if args.show_prompt else None)
    if args.prompt is not None:
        session.respond(args.prompt)
        return 0
    print(f"HAI MedQA chat ({'safety on' if safety.enabled else 'safety OFF'}). {HELP}", file=sys.stderr, flush=True)
    return run_repl(session)


def cli() -> int:
    return run_main(main)
