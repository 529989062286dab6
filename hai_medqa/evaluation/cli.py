"""``evaluate.py``: score one model, or compare two on the same samples (--compare A B)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from loguru import logger

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT
from hai_medqa.evaluation.kormedmcqa import SUBSETS
from hai_medqa.evaluation.report import write_comparison
from hai_medqa.evaluation.runner import EvalOptions, evaluate_model, prepare_inputs, write_results
from hai_medqa.inference.cli_common import add_generation_args, add_model_args, run_main, settings_from_args
from hai_medqa.inference.generation import InferenceError, load_for_inference
from hai_medqa.logging_setup import setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Evaluate a model on the validation jsonl (morpheme ROUGE, character ROUGE-L, answer "
                    "perplexity) and/or KorMedMCQA; --compare A B evaluates two models on the same samples.",
    )
    add_model_args(p)
    d = p.add_argument_group("validation data")
    d.add_argument("--data", help="validation jsonl from preprocess (instruction/output records)")
    d.add_argument("--samples", type=int, default=200, help="samples drawn with --seed (default 200; 0 = all)")
    d.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT,
                   help="system prompt, as in training ('' for none; default: the project's prompt)")
    d.add_argument("--max-length", type=int, default=2048, help="token limit for perplexity (as in training)")
    d.add_argument("--no-perplexity", action="store_true", help="skip answer-token perplexity")
    k = p.add_argument_group("KorMedMCQA (local download of sean0042/KorMedMCQA)")
    k.add_argument("--kormedmcqa", help="folder holding the downloaded files (parquet, csv or jsonl)")
    k.add_argument("--kormedmcqa-subsets", default=",".join(SUBSETS), help="comma-separated subsets")
    k.add_argument("--kormedmcqa-split", default="test")
    k.add_argument("--kormedmcqa-limit", type=int, help="at most this many questions per subset (seeded)")
    k.add_argument("--kormedmcqa-fewshot", type=int, default=0, help="examples from the fewshot split (0-5)")
    k.add_argument("--kormedmcqa-format", default="chat", choices=["chat", "raw"],
                   help="chat: prompt inside one user turn of the chat format; raw: plain text as the harness")
    k.add_argument("--kormedmcqa-max-new-tokens", type=int, default=32)
    c = p.add_argument_group("comparison")
    c.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two models: each a model folder / Hub id, an adapter or run folder (on top of --model "
                        "or its recorded base), or 'base' (= --model alone)")
    c.add_argument("--labels", nargs=2, metavar=("LABEL_A", "LABEL_B"), help="names for A and B in the report")
    p.add_argument("--output-dir", default="outputs/eval", help="where results go (default outputs/eval)")
    p.add_argument("--log-level", default="INFO")
    add_generation_args(p)
    return p


def _is_adapter(path: str) -> bool:
    folder = Path(path)
    return any((folder / sub / "adapter_config.json").is_file() for sub in ("", "adapter_best", "adapter_last"))


def resolve_spec(spec: str, base_model: str | None) -> tuple[str | None, str | None]:
    """(model, adapter) for one --compare entry."""
    if spec == "base":
        if base_model is None:
            raise InferenceError("--compare 'base' needs --model")
        return base_model, None
    if _is_adapter(spec):
        return base_model, spec
    return spec, None


def _label(spec: str) -> str:
    name = Path(spec.rstrip("/")).name if spec != "base" else "base"
    if name in ("adapter_best", "adapter_last"):
        name = Path(spec.rstrip("/")).parent.name
    return re.sub(r"[^\w.\-]+", "_", name) or "model"


def _options(args: argparse.Namespace) -> EvalOptions:
    subsets = tuple(s.strip() for s in args.kormedmcqa_subsets.split(",") if s.strip())
    return EvalOptions(
        data=args.data, samples=None if args.samples == 0 else args.samples, seed=args.seed,
        system_prompt=args.system_prompt, generation=settings_from_args(args), batch_size=args.batch_size,
        max_length=args.max_length, perplexity=not args.no_perplexity, kormedmcqa=args.kormedmcqa,
        kormedmcqa_subsets=subsets, kormedmcqa_split=args.kormedmcqa_split, kormedmcqa_limit=args.kormedmcqa_limit,
        kormedmcqa_fewshot=args.kormedmcqa_fewshot, kormedmcqa_format=args.kormedmcqa_format,
        kormedmcqa_max_new_tokens=args.kormedmcqa_max_new_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    if args.samples < 0:
        raise InferenceError(f"--samples must be >= 0 (0 = all), got {args.samples}")
    opts = _options(args)
    inputs = prepare_inputs(opts)  # read and check every input before loading a model
    out_dir = Path(args.output_dir)
    load = {"revision": args.revision, "quantize_4bit": args.load_4bit, "dtype": args.dtype, "device": args.device,
            "attn_implementation": args.attn_implementation}

    if args.compare is None:
        if args.model is None and args.adapter is None:
            raise InferenceError("give --model and/or --adapter (or --compare A B)")
        lm = load_for_inference(args.model, args.adapter, **load)
        label = args.labels[0] if args.labels else _label(args.adapter or args.model)
        results, artefacts = evaluate_model(lm, opts, inputs, label=label)
        path = write_results(out_dir, results, artefacts)
        logger.info(f"results: {path}")
        _log_summary(results)
        return 0

    if args.adapter:
        raise InferenceError("with --compare, name adapters inside A/B instead of --adapter")
    labels = list(args.labels) if args.labels else [_label(s) for s in args.compare]
    if labels[0] == labels[1]:
        labels = [f"A_{labels[0]}", f"B_{labels[1]}"]
    specs = [resolve_spec(s, args.model) for s in args.compare]  # fail on a bad spec before loading
    all_results = []
    for label, (model, adapter) in zip(labels, specs, strict=True):
        lm = load_for_inference(model, adapter, **load)
        try:
            results, artefacts = evaluate_model(lm, opts, inputs, label=label)
        finally:
            lm.close()  # free the first model before loading the second
        write_results(out_dir / label, results, artefacts)
        _log_summary(results)
        all_results.append(results)
    paths = write_comparison(out_dir, all_results[0], all_results[1], labels[0], labels[1])
    logger.info(f"comparison: {paths['markdown']}, {paths['png']}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    return 0


def _log_summary(results: dict) -> None:
    parts = [f"{k}={v:.4f}" for k, v in results.get("metrics", {}).items()]
    parts += [f"kormedmcqa.{k}={v:.4f}" for k, v in (results.get("kormedmcqa") or {}).items()]
    logger.info(f"[{results['model']}] " + ", ".join(parts))


def cli() -> int:
    return run_main(main)
