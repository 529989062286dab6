"""``evaluate.py``: score one model, or compare two on the same samples (--compare A B)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from loguru import logger

from hai_medqa.evaluation.kormedmcqa import SUBSETS
from hai_medqa.evaluation.report import comparison_files, paired_differences, write_comparison
from hai_medqa.evaluation.runner import (
    EvalOptions,
    evaluate_model,
    prepare_inputs,
    result_files,
    write_results,
)
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
from hai_medqa.inference.resume import GenerationJournal, journal_path
from hai_medqa.inference.system_prompt import SystemPromptChoice, choose_system_prompt, trained_prompt
from hai_medqa.logging_setup import setup_logging
from hai_medqa.model.identity import eval_model_identity
from hai_medqa.run_folder import ADAPTER_DIRS, EVAL_RESULTS, find_adapter_dir


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
    add_system_prompt_arg(d, what="for generation and perplexity (with --compare: one for both models)")
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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from its eval_results.json.partial journal(s)")
    p.add_argument("--log-level", default="INFO")
    add_generation_args(p)
    return p


def _is_adapter(path: str) -> bool:
    return find_adapter_dir(path) is not None


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
    if name in ADAPTER_DIRS:
        name = Path(spec.rstrip("/")).parent.name
    return re.sub(r"[^\w.\-]+", "_", name) or "model"


def _options(args: argparse.Namespace, system: SystemPromptChoice) -> EvalOptions:
    subsets = tuple(s.strip() for s in args.kormedmcqa_subsets.split(",") if s.strip())
    return EvalOptions(
        data=args.data, samples=None if args.samples == 0 else args.samples, seed=args.seed,
        system_prompt=system.prompt, system_prompt_source=system.source, generation=settings_from_args(args),
        batch_size=args.batch_size,
        max_length=args.max_length, perplexity=not args.no_perplexity, kormedmcqa=args.kormedmcqa,
        kormedmcqa_subsets=subsets, kormedmcqa_split=args.kormedmcqa_split, kormedmcqa_limit=args.kormedmcqa_limit,
        kormedmcqa_fewshot=args.kormedmcqa_fewshot, kormedmcqa_format=args.kormedmcqa_format,
        kormedmcqa_max_new_tokens=args.kormedmcqa_max_new_tokens,
    )


def _system_prompt(args: argparse.Namespace, models: list[tuple[str, str | None, Path | None]]) -> SystemPromptChoice:
    """One system prompt for every evaluated model: --system-prompt, else the one training recorded
    (with --compare, the models must not record different ones), else the project's default."""
    if args.system_prompt is not None or len(models) == 1:
        _, model, adapter_dir = models[0]
        return choose_system_prompt(args.system_prompt, model, adapter_dir, args.revision)
    recorded = {}
    for label, model, adapter_dir in models:
        prompt, where = trained_prompt(model, adapter_dir, args.revision)
        if prompt is not None:
            recorded[label] = (prompt, where)
    if len({prompt for prompt, _ in recorded.values()}) > 1:
        raise InferenceError(f"{' and '.join(recorded)} were trained with different system prompts "
                             f"({', '.join(where for _, where in recorded.values())}); pass --system-prompt to "
                             "evaluate both with the same one")
    if not recorded:
        return choose_system_prompt(None, None, None)
    prompt, where = next(iter(recorded.values()))
    return SystemPromptChoice(prompt, f"training record in {where}")


def _check_paths(args: argparse.Namespace, specs: list[tuple[str, str | None, str | None]],
                 out_dirs: list[Path]) -> None:
    """Every path argument of the right kind, and no output on top of an input: before any work."""
    folders = {"--kormedmcqa": args.kormedmcqa, "--model": local_path(args.model)}
    adapters = {}
    if args.compare is None:
        adapters["--adapter"] = args.adapter
    else:
        for letter, spec, (_, model, adapter) in zip("AB", args.compare, specs, strict=True):
            if spec != "base":
                (adapters if adapter else folders)[f"--compare {letter}"] = local_path(adapter or model)
    check_input_kinds(files={"--data": args.data}, folders={**folders, **adapters})
    # what is read of a run folder is its adapter (RUN/adapter_best): results may go into RUN itself
    inputs = {"--data": args.data, **folders,
              **{k: find_adapter_dir(v) if local_path(v) else None for k, v in adapters.items() if v}}
    check_output_paths({}, {"--output-dir": args.output_dir}, folders={"--output-dir"})
    outputs: dict[str, Path] = {}
    for d in out_dirs:
        for f in [*result_files(d), journal_path(d / EVAL_RESULTS)]:
            outputs[f"--output-dir's {f.relative_to(args.output_dir)}"] = f
    if len(out_dirs) > 1:
        for f in comparison_files(args.output_dir):
            outputs[f"--output-dir's {f.name}"] = f
    check_output_paths(inputs, outputs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    if args.samples < 0:
        raise InferenceError(f"--samples must be >= 0 (0 = all), got {args.samples}")
    out_dir = Path(args.output_dir)
    if args.compare is None:
        if args.model is None and args.adapter is None:
            raise InferenceError("give --model and/or --adapter (or --compare A B)")
        labels = [args.labels[0] if args.labels else _label(args.adapter or args.model)]
        specs = [(labels[0], args.model, args.adapter)]
        out_dirs = [out_dir]
    else:
        if args.adapter:
            raise InferenceError("with --compare, name adapters inside A/B instead of --adapter")
        labels = list(args.labels) if args.labels else [_label(s) for s in args.compare]
        if labels[0] == labels[1]:
            labels = [f"A_{labels[0]}", f"B_{labels[1]}"]
        specs = [(label, *resolve_spec(s, args.model)) for label, s in zip(labels, args.compare, strict=True)]
        out_dirs = [out_dir / label for label in labels]
    _check_paths(args, specs, out_dirs)
    models = [(label, model, resolve_adapter(adapter)) for label, model, adapter in specs]  # fail before loading
    system = _system_prompt(args, models)
    opts = _options(args, system)
    inputs = prepare_inputs(opts)  # read and check every input before loading a model
    logger.info(system.describe())
    journals = [GenerationJournal(journal_path(d / EVAL_RESULTS), _fingerprint(args, opts, inputs, model, adapter_dir),
                                  resume=args.resume, require=False)
                for d, (_, model, adapter_dir) in zip(out_dirs, models, strict=True)]
    if args.resume and not any(j.path.exists() for j in journals):
        raise InferenceError(f"--resume: nothing to resume, no {journals[0].path.name} under {out_dir} (a finished "
                             "evaluation leaves none; run without --resume to start)")
    load = {"revision": args.revision, "quantize_4bit": args.load_4bit, "dtype": args.dtype, "device": args.device,
            "attn_implementation": args.attn_implementation}
    all_results, all_artefacts = [], []
    try:
        for label, (_, model, adapter_dir), d, journal in zip(labels, models, out_dirs, journals, strict=True):
            lm = load_for_inference(model, str(adapter_dir) if adapter_dir else None, **load)
            try:
                # whose numbers these are: the model and adapter as given (a release checks it)
                identity = eval_model_identity(model, adapter_dir, revision=args.revision,
                                               quantize_4bit=args.load_4bit)
                results, artefacts = evaluate_model(lm, opts, inputs, label=label, journal=journal,
                                                    evaluated_model=identity)
            finally:
                lm.close()  # free the first model before loading the second
                journal.close()
            path = write_results(d, results, artefacts)
            logger.info(f"results: {path}")
            _log_summary(results)
            all_results.append(results)
            all_artefacts.append(artefacts)
    except KeyboardInterrupt as e:
        kept = [j.interrupted_note() for j in journals if j.path.exists()]
        e.add_note("; ".join(kept) if kept else "no answer was finished; nothing was written")
        raise
    if args.compare is not None:
        arts_a, arts_b = all_artefacts
        paired = paired_differences(arts_a["predictions"], arts_b["predictions"], arts_a["kormedmcqa_items"],
                                    arts_b["kormedmcqa_items"])
        paths = write_comparison(out_dir, all_results[0], all_results[1], labels[0], labels[1], paired)
        logger.info(f"comparison: {paths['markdown']}, {paths['png']}")
        print(paths["markdown"].read_text(encoding="utf-8"))
    for journal in journals:  # only now: a resumed --compare reuses the first model's answers
        journal.remove()
    return 0


def _fingerprint(args: argparse.Namespace, opts: EvalOptions, inputs, model: str | None,
                 adapter_dir: Path | None) -> dict:
    """What a resumed evaluation must share with the interrupted one to give the same answers."""
    return {
        **model_identity(args, model, adapter_dir),
        "system_prompt": opts.system_prompt, "generation": opts.generation.to_dict(), "batch_size": opts.batch_size,
        "data_sha256": (inputs.data_info or {}).get("sha256"), "samples": opts.samples, "seed": opts.seed,
        "kormedmcqa": None if opts.kormedmcqa is None else {
            "subsets": list(opts.kormedmcqa_subsets), "split": opts.kormedmcqa_split, "limit": opts.kormedmcqa_limit,
            "fewshot": opts.kormedmcqa_fewshot, "format": opts.kormedmcqa_format,
            "max_new_tokens": opts.kormedmcqa_max_new_tokens},
    }


def _log_summary(results: dict) -> None:
    parts = [f"{k}={v:.4f}" for k, v in results.get("metrics", {}).items()]
    parts += [f"kormedmcqa.{k}={v:.4f}" for k, v in (results.get("kormedmcqa") or {}).items()]
    logger.info(f"[{results['model']}] " + ", ".join(parts))
