"""One model's evaluation: generated answers scored with Korean-aware ROUGE, answer-token perplexity
of the references, and KorMedMCQA accuracy. Produces the ``eval_results.json`` dict (schema in
docs/evaluation.md; the model card reads ``metrics``, ``kormedmcqa``, ``samples``, ``seed`` and
``generation``)."""

from __future__ import annotations

import datetime as _dt
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from hai_medqa.chat_format import record_to_messages, render, resolve_system_prompt, split_prompt_answer
from hai_medqa.evaluation import kormedmcqa as kmq
from hai_medqa.evaluation.metrics import rouge_report, stderr_of_mean
from hai_medqa.evaluation.perplexity import answer_perplexity
from hai_medqa.inference.generation import GenerationSettings, InferenceError, LoadedModel, generate
from hai_medqa.inference.resume import GenerationJournal, generate_journaled
from hai_medqa.io_utils import sha256_file
from hai_medqa.run_folder import EVAL_MODEL_KEY, EVAL_RESULTS, package_versions

PREDICTIONS = "predictions.jsonl"
KORMEDMCQA_ITEMS = "kormedmcqa_items.jsonl"

METRIC_KEYS = ("rouge1", "rouge2", "rougeL", "char_rougeL", "answer_ppl")


@dataclass
class EvalOptions:
    """What to evaluate and how; every field is recorded in the results."""

    data: str | None = None
    samples: int | None = 200
    seed: int = 0
    system_prompt: str | None = None  # chat_format's rule: None = the default prompt, "" = none
    system_prompt_source: str | None = None  # where it came from (recorded in the results)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 8
    max_length: int = 2048
    perplexity: bool = True
    kormedmcqa: str | None = None
    kormedmcqa_subsets: tuple[str, ...] = kmq.SUBSETS
    kormedmcqa_split: str = "test"
    kormedmcqa_limit: int | None = None
    kormedmcqa_fewshot: int = 0
    kormedmcqa_format: str = "chat"
    kormedmcqa_max_new_tokens: int = 32

    def check(self) -> None:
        """Fail before any model is loaded when the options cannot work."""
        if self.data is None and self.kormedmcqa is None:
            raise InferenceError("nothing to evaluate: give --data (validation jsonl) and/or --kormedmcqa (folder)")
        if self.samples is not None and self.samples < 1:
            raise InferenceError(f"--samples must be >= 1, got {self.samples}")
        if not 0 <= self.kormedmcqa_fewshot <= 5:
            raise InferenceError(f"--kormedmcqa-fewshot must be 0-5 (the fewshot split has 5), got {self.kormedmcqa_fewshot}")
        if self.kormedmcqa_format not in ("chat", "raw"):
            raise InferenceError(f"--kormedmcqa-format must be chat or raw, got {self.kormedmcqa_format!r}")


@dataclass
class EvalInputs:
    """Everything read from disk before a model is loaded (so bad inputs fail fast, and both models
    of a comparison see exactly the same samples)."""

    conversations: list[list[dict]]  # validation samples (without system prompt), last turn = reference
    lines: list[int]
    data_info: dict[str, Any]
    mcq: dict[str, list[kmq.MCQItem]] | None
    mcq_fewshot: dict[str, list[kmq.MCQItem]] | None


def select_samples(n_available: int, samples: int | None, seed: int) -> list[int]:
    """Indices of the samples to evaluate: all, or `samples` chosen by a seeded RNG, in file order."""
    if samples is None or samples >= n_available:
        return list(range(n_available))
    return sorted(random.Random(seed).sample(range(n_available), samples))


def prepare_inputs(opts: EvalOptions) -> EvalInputs:
    """Read and check the validation jsonl and the KorMedMCQA files."""
    from hai_medqa.train.sft_data import read_sft_records

    opts.check()
    conversations: list[list[dict]] = []
    lines: list[int] = []
    data_info: dict[str, Any] = {}
    if opts.data is not None:
        records, stats = read_sft_records(opts.data, what="--data")
        keep = select_samples(len(records), opts.samples, opts.seed)
        lines = [records[i][0] for i in keep]
        conversations = [records[i][1] for i in keep]
        # "path" stays local (a release keeps "file", the hash and the counts: publish.shareable)
        data_info = {"file": Path(opts.data).name, "path": str(opts.data), "sha256": sha256_file(opts.data),
                     "records": stats["records"], "unusable_records": stats["unusable_records"],
                     "evaluated": len(keep)}
    mcq = fewshot = None
    if opts.kormedmcqa is not None:
        full = kmq.load_kormedmcqa(opts.kormedmcqa, opts.kormedmcqa_subsets, opts.kormedmcqa_split)
        mcq = {s: kmq.sample_items(items, opts.kormedmcqa_limit, opts.seed) for s, items in full.items()}
        if opts.kormedmcqa_fewshot:
            shots = kmq.load_kormedmcqa(opts.kormedmcqa, opts.kormedmcqa_subsets, "fewshot")
            fewshot = {s: items[: opts.kormedmcqa_fewshot] for s, items in shots.items()}  # harness: first_n
    return EvalInputs(conversations, lines, data_info, mcq, fewshot)


def mcq_prompt(prompt: str, fmt: str) -> str:
    """A KorMedMCQA prompt as the model sees it: inside one user turn (chat; empty system turn, as the
    harness's --apply_chat_template does without a system instruction) or as raw text."""
    if fmt == "raw":
        return prompt
    return render([{"role": "user", "content": prompt}], add_generation_prompt=True)


def evaluate_model(lm: LoadedModel, opts: EvalOptions, inputs: EvalInputs, *, label: str,
                   journal: GenerationJournal | None = None,
                   evaluated_model: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """Run the evaluation of one loaded model. Returns (eval_results dict, artefacts) where artefacts
    holds per-sample predictions and per-item KorMedMCQA answers for the jsonl files.

    `evaluated_model` (`hai_medqa.model.identity.eval_model_identity` of the model as it was given)
    is recorded under EVAL_MODEL_KEY: a release shows the results only for that model.

    With a `journal`, every generated answer is appended to it as it is made and answers already in
    it (an interrupted run's) are not generated again."""
    system_prompt = resolve_system_prompt(opts.system_prompt)

    def answers(prompts: list[str], keys: list[str], settings: GenerationSettings) -> list[str]:
        if journal is None:
            return generate(lm, prompts, settings, batch_size=opts.batch_size, progress=True)
        return generate_journaled(lm, prompts, keys, settings, journal, batch_size=opts.batch_size, progress=True)

    results: dict[str, Any] = {
        "model": label,
        **({EVAL_MODEL_KEY: evaluated_model} if evaluated_model is not None else {}),
        "model_info": lm.info,
        "samples": len(inputs.conversations),
        "seed": opts.seed,
        "system_prompt": system_prompt,
        "system_prompt_source": opts.system_prompt_source,
        "generation": {**opts.generation.to_dict(), "batch_size": opts.batch_size},
        "safety_layer": False,  # metrics score the model's own text, never the safety notices
        "data": inputs.data_info or None,
        "metrics": {},
    }
    artefacts: dict[str, list] = {"predictions": [], "kormedmcqa_items": []}
    if inputs.conversations:
        with_system = [record_to_messages({"messages": c}, system_prompt) for c in inputs.conversations]
        prompts = [split_prompt_answer(m)[0] for m in with_system]
        references = [m[-1]["content"] for m in with_system]
        logger.info(f"[{label}] generating {len(prompts)} answer(s)")
        predictions = answers(prompts, [f"val:{line}" for line in inputs.lines], opts.generation)
        means, per_sample = rouge_report(predictions, references)
        results["metrics"].update(means)
        results["metrics_stderr"] = {k: stderr_of_mean([s[k] for s in per_sample]) for k in means}
        results["metrics_detail"] = {
            "tokenization": "kiwipiepy morphemes (punctuation dropped); char_rougeL on non-space characters",
            "aggregation": "mean of per-sample F1",
            "empty_predictions": sum(1 for p in predictions if not p),
        }
        for line, conv, pred, ref, scores in zip(inputs.lines, inputs.conversations, predictions, references,
                                                 per_sample, strict=True):
            artefacts["predictions"].append({"line": line, "question": conv[-2]["content"] if len(conv) > 1 else "",
                                             "reference": ref, "prediction": pred, **scores})
        if opts.perplexity:
            logger.info(f"[{label}] answer-token perplexity of the references")
            ppl = answer_perplexity(lm.model, lm.tokenizer, inputs.conversations, system_prompt=system_prompt,
                                    max_length=opts.max_length, batch_size=opts.batch_size, progress=True)
            results["metrics"]["answer_ppl"] = ppl["answer_ppl"]
            results["metrics_detail"].update({k: ppl[k] for k in ("answer_nll", "answer_tokens", "truncated")},
                                             max_length=opts.max_length)
    if inputs.mcq is not None:
        mcq_settings = GenerationSettings(max_new_tokens=opts.kormedmcqa_max_new_tokens, temperature=0.0,
                                          repetition_penalty=opts.generation.repetition_penalty, seed=opts.seed)

        # score_kormedmcqa asks for the subsets' answers in this order, one call per non-empty subset
        subsets = iter([s for s, items in inputs.mcq.items() if items])

        def answer_fn(prompts: list[str]) -> list[str]:
            subset = next(subsets)
            wrapped = [mcq_prompt(p, opts.kormedmcqa_format) for p in prompts]
            return answers(wrapped, [f"mcq:{subset}:{i}" for i in range(len(wrapped))], mcq_settings)

        logger.info(f"[{label}] KorMedMCQA: {', '.join(f'{s} {len(v)}' for s, v in inputs.mcq.items())}")
        scored = kmq.score_kormedmcqa(answer_fn, inputs.mcq, inputs.mcq_fewshot)
        results["kormedmcqa"] = scored["accuracy"]
        results["kormedmcqa_detail"] = {
            "path": str(opts.kormedmcqa),
            "split": opts.kormedmcqa_split,
            "limit_per_subset": opts.kormedmcqa_limit,
            "fewshot": opts.kormedmcqa_fewshot,
            "format": opts.kormedmcqa_format,
            "max_new_tokens": opts.kormedmcqa_max_new_tokens,
            "decoding": "greedy",
            "subsets": scored["detail"],
            # binomial standard error of each accuracy: sqrt(p (1 - p) / n)
            "stderr": {sub: math.sqrt(acc * (1 - acc) / scored["detail"][sub]["n"])
                       for sub, acc in scored["accuracy"].items() if sub in scored["detail"]},
        }
        artefacts["kormedmcqa_items"] = scored["items"]
    results["versions"] = package_versions()
    results["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return results, artefacts


def result_files(out_dir: str | Path) -> list[Path]:
    """The files `write_results` may write into `out_dir` (for the guards that run before any work)."""
    out_dir = Path(out_dir)
    return [out_dir / EVAL_RESULTS, out_dir / PREDICTIONS, out_dir / KORMEDMCQA_ITEMS]


def write_results(out_dir: str | Path, results: dict, artefacts: dict) -> Path:
    """Write eval_results.json, predictions.jsonl and kormedmcqa_items.jsonl (atomically)."""
    from hai_medqa.io_utils import write_json, write_jsonl

    out_dir = Path(out_dir)
    if artefacts.get("predictions"):
        write_jsonl(out_dir / PREDICTIONS, artefacts["predictions"])
    if artefacts.get("kormedmcqa_items"):
        write_jsonl(out_dir / KORMEDMCQA_ITEMS, artefacts["kormedmcqa_items"])
    path = out_dir / EVAL_RESULTS
    write_json(path, results)
    return path
