"""The Hub model card (README.md) of a merged model or an adapter, built only from recorded facts.

Every number in the card comes from a file the pipeline wrote: the training run's
resolved_config.yaml / run_info.json / summary.json, merge_info.json and, when it exists,
eval_results.json. What is missing is said to be missing, never filled in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT
from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import atomic_write_text
from hai_medqa.publish.license import EXAONE_CITATION, EXAONE_LICENSE_NAME, EXAONE_LICENSE_URL
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    EVAL_RESULTS,
    MERGE_INFO,
    MODEL_CARD,
    RELEASE_TRAINING_DIR,
    RESOLVED_CONFIG,
    RUN_INFO,
    SUMMARY,
    TRAINING_RECORD,
)

CARD_TAGS = ["exaone", "korean", "medical", "healthcare", "qlora", "lora", "hai-medqa"]
DATASET_NAME = "AI Hub 초거대AI 헬스케어 질의응답 데이터 (Korean healthcare QA)"
DATASET_URL = "https://www.aihub.or.kr/aihubdata/data/view.do?dataSetSn=71762"
EXAMPLE_QUESTION = "감기에 걸렸을 때 집에서 할 수 있는 관리 방법을 알려주세요."
# Keys of the training config worth a row in the summary table, matched as suffixes of dotted paths.
_SETTING_KEYS = (
    "model", "max_seq_len", "max_length", "packing", "seed", "epochs", "num_epochs", "max_steps",
    "learning_rate", "lr", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay",
    "batch_size", "micro_batch_size", "per_device_batch_size", "grad_accum", "gradient_accumulation_steps",
    "tokens_per_step", "r", "rank", "lora_r", "alpha", "lora_alpha", "dropout", "lora_dropout",
    "target_modules", "quantize_4bit", "load_in_4bit", "dtype", "gradient_checkpointing", "optimizer",
    "pairing", "batching", "tokens_per_micro_batch", "compute_dtype", "max_grad_norm", "overlong",
    "early_stopping_patience", "profile", "attn_implementation",
)


class ModelCardError(HaiMedQAError, ValueError):
    """A file the card is built from is unreadable."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelCardError(f"{path}: not valid JSON ({e})") from None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ModelCardError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return "\n".join(lines)


def load_card_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """Gather the recorded facts of a release folder: merge_info.json, training/*, eval_results.json."""
    folder = Path(folder)
    facts: dict[str, Any] = {}
    training = folder / RELEASE_TRAINING_DIR
    files = {
        "merge_info": folder / MERGE_INFO,
        "run_info": training / RUN_INFO,
        "summary": training / SUMMARY,
        "eval": folder / EVAL_RESULTS,
    }
    for key, path in files.items():
        if path.is_file():
            facts[key] = _read_json(path)
    cfg = training / RESOLVED_CONFIG
    if cfg.is_file():
        facts["train_config"] = _read_yaml(cfg)
        facts["train_config_text"] = cfg.read_text(encoding="utf-8")
    for record in (folder / TRAINING_RECORD, training / TRAINING_RECORD):
        if record.is_file():
            facts["training_record"] = _read_json(record)
            break
    adapter_cfg = folder / ADAPTER_CONFIG
    if adapter_cfg.is_file():
        facts["adapter_config"] = _read_json(adapter_cfg)
    elif isinstance(facts.get("merge_info"), dict):
        facts["adapter_config"] = facts["merge_info"].get("adapter_config") or {}
    return facts


def card_metadata(base_model: str, *, adapter_only: bool) -> dict[str, Any]:
    """The Hub metadata block (validated by huggingface_hub's ModelCardData)."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if adapter_only else "finetune",
        license="other",
        license_name=EXAONE_LICENSE_NAME,
        license_link="LICENSE",
        language=["ko"],
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag="text-generation",
        tags=CARD_TAGS + (["peft"] if adapter_only else ["merged"]),
    )
    return data.to_dict()


def usage_snippet(repo_id: str, *, layout: str, adapter_only: bool, base_model: str,
                  system_prompt: str | None = None) -> str:
    """Python that loads the published model and answers one question with the saved chat template
    and the system prompt the model was trained with."""
    system = json.dumps(DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt, ensure_ascii=False)
    question = json.dumps(EXAMPLE_QUESTION, ensure_ascii=False)
    chat = f'''messages = [
    {{"role": "system", "content": {system}}},
    {{"role": "user", "content": {question}}},
]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
output = model.generate(**inputs, max_new_tokens=512, do_sample=False)  # stops at [|endofturn|]
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''
    if adapter_only:
        return f'''# The adapter was trained on the Llama-layout conversion of the base model (no remote code).
# Load it with the HAI MedQA project's loader, which converts the base once and caches it.
from peft import PeftModel
from hai_medqa.model.acquire import resolve_model
from hai_medqa.model.load import load_causal_lm, load_tokenizer

base = resolve_model("{base_model}")  # downloads and converts once, cached
tokenizer = load_tokenizer(base)
model = PeftModel.from_pretrained(load_causal_lm(base, dtype="bfloat16", device_map="auto"), "{repo_id}")
{chat}'''
    remote = ", trust_remote_code=True" if layout == "exaone" else ""
    note = (
        "# EXAONE layout: needs LG's modeling code (trust_remote_code=True), as the base model does.\n"
        if layout == "exaone" else "# Plain transformers: no remote code needed (Llama layout).\n"
    )
    return f'''{note}from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "{repo_id}"
tokenizer = AutoTokenizer.from_pretrained(model_id{remote})
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto"{remote})
{chat}'''


def _eval_section(ev: Mapping[str, Any] | None) -> str:
    if not ev:
        return (
            "No evaluation results were recorded for this model (no `eval_results.json` beside it). "
            "Run `evaluate.py` on the merged model and re-run `merge_and_upload.py` to add them."
        )
    rows: list[tuple[str, Any]] = []
    for group in ("metrics", "kormedmcqa"):
        for key, value in _flatten(ev.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{group}/{key}" if group != "metrics" else key, value))
    parts = []
    if rows:
        parts.append(_table(rows, ("metric", "value")))
    else:
        parts.append("`eval_results.json` holds no numeric metrics.")
    details = [(k, ev[k]) for k in ("samples", "seed") if k in ev]
    gen = ev.get("generation")
    if isinstance(gen, Mapping):
        details += [(f"generation.{k}", v) for k, v in gen.items()]
    if details:
        parts.append("Evaluation settings:\n\n" + _table(details, ("setting", "value")))
    return "\n\n".join(parts)


def _training_section(facts: Mapping[str, Any]) -> str:
    cfg = facts.get("train_config")
    adapter_cfg = facts.get("adapter_config") or {}
    rows: list[tuple[str, Any]] = []
    labels = {"r": "LoRA rank r", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
              "use_rslora": "rank-stabilised scaling (rsLoRA)", "target_modules": "LoRA target modules"}
    for key, label in labels.items():
        value = adapter_cfg.get(key)
        if value is not None:
            rows.append((label, sorted(value) if isinstance(value, (list, tuple, set)) else value))
    if isinstance(cfg, Mapping):
        for path, value in _flatten(cfg).items():
            leaf = path.rsplit(".", 1)[-1]
            if leaf in _SETTING_KEYS and leaf != "system_prompt" and not isinstance(value, dict):
                rows.append((path, value))
    summary = facts.get("summary")
    if isinstance(summary, Mapping):
        rows += [(f"result: {k}", v) for k, v in _flatten(summary).items()
                 if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    run_info = facts.get("run_info")
    if isinstance(run_info, Mapping):
        rows += [(f"run: {k}", v) for k, v in _flatten(run_info).items()
                 if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                 and not k.startswith(("env", "argv")) and "path" not in k]
    if not rows:
        return "The training run's files were not available when this card was written; no settings are listed."
    text = "Recorded by the training run (`training/` in this repository holds the files):\n\n"
    text += _table(rows, ("setting", "value"))
    if facts.get("train_config_text"):
        text += ("\n\n<details><summary>Full training config (resolved_config.yaml)</summary>\n\n```yaml\n"
                 + facts["train_config_text"].rstrip() + "\n```\n\n</details>")
    return text


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str,
    adapter_only: bool = False,
) -> str:
    """The README.md text for the release folder `folder` (merged model, or adapter when `adapter_only`)."""
    facts = load_card_facts(folder)
    merge = facts.get("merge_info") or {}
    layout = merge.get("layout", "llama")
    meta = yaml.safe_dump(card_metadata(base_model, adapter_only=adapter_only), allow_unicode=True,
                          sort_keys=False).strip()
    name = repo_id.rsplit("/", 1)[-1]
    if adapter_only:
        what = (f"a LoRA adapter for [{base_model}](https://huggingface.co/{base_model}), trained with QLoRA "
                "(4-bit NF4 base) on Korean healthcare question answering.")
        form = "LoRA adapter (PEFT format, safetensors)."
    else:
        into = {"original": "the original (unquantised) base weights",
                "nf4": "the NF4-quantised-then-dequantised base weights (the exact training-time forward)"}
        what = (f"[{base_model}](https://huggingface.co/{base_model}) fine-tuned with QLoRA on Korean healthcare "
                "question answering, with the LoRA update merged into "
                f"{into.get(merge.get('merge_into'), 'the base weights')}.")
        form = (
            "Full merged weights in the Llama layout: loads with plain `transformers`, no remote code."
            if layout == "llama" else
            "Full merged weights in EXAONE-3.5's original layout (needs LG's modeling code)."
        )
    dtypes = ", ".join(merge.get("weight_dtypes", [])) or "as stored"
    details_rows: list[tuple[str, Any]] = [("base model", base_model), ("method", "QLoRA (LoRA on a 4-bit NF4 base)"),
                                           ("format", form)]
    if not adapter_only:
        details_rows += [("merge", merge.get("merge_into", "unknown")), ("weight dtype", dtypes)]
    details_rows += [("language", "Korean"), ("license", "EXAONE AI Model License Agreement 1.1 - NC")]

    record = facts.get("training_record") or {}
    system_prompt = record.get("system_prompt") if isinstance(record.get("system_prompt"), str) else None
    snippet = usage_snippet(repo_id, layout=layout, adapter_only=adapter_only, base_model=base_model,
                            system_prompt=system_prompt)
    sections = [
        f"---\n{meta}\n---",
        f"# {name}\n\n{name} is {what}\nIt was built with the HAI MedQA pipeline. The chat format is EXAONE-3.5's "
        "own (`[|system|]…[|endofturn|]\\n[|user|]…\\n[|assistant|]…[|endofturn|]`), saved with the tokenizer as its "
        "chat template.",
        "## 의료 면책 고지 / Medical disclaimer\n\n"
        "이 모델은 연구용이며 의료 조언, 진단 또는 치료를 대신하지 않습니다. 모델의 답변은 틀리거나 오래되었거나 "
        "위험할 수 있습니다. 건강 문제는 반드시 의사 등 의료 전문가와 상담하고, 응급 상황에서는 즉시 119에 "
        "연락하십시오.\n\n"
        "This model is for research only and does not replace medical advice, diagnosis or treatment. Its answers can "
        "be wrong, outdated or harmful. Consult a doctor or other qualified professional about any health question, "
        "and call emergency services (119 in Korea) in an emergency.",
        "## Model details\n\n" + _table(details_rows, ("", "")),
        "## Training data\n\n"
        f"[{DATASET_NAME}]({DATASET_URL}): Korean health questions and expert-written answers, organised by disease "
        "category, disease and intention (정의, 원인, 증상, 진단, 치료, 예방, …). Question and answer files are paired "
        "within each disease/intention folder into instruction–answer records; the pairing and filtering used are in "
        "the training config below. The data is distributed by AI Hub under its own terms and is not redistributed "
        "here.",
        "## Training settings\n\n" + _training_section(facts),
        "## Evaluation\n\n" + _eval_section(facts.get("eval")),
        "## Usage\n\n```python\n" + snippet + "\n```",
        "## Limitations\n\n"
        "- Trained on one Korean QA dataset: answers follow that data's style and coverage and can be wrong, "
        "incomplete or out of date; the model may state errors confidently.\n"
        "- Not evaluated for clinical safety; it must not be used for diagnosis, treatment or triage.\n"
        "- Korean only in practice; other languages were not trained or tested.\n"
        "- Inherits the base model's limitations and biases.",
        "## License\n\n"
        f"Derived from EXAONE 3.5 and distributed under the [EXAONE AI Model License Agreement 1.1 - NC]"
        f"({EXAONE_LICENSE_URL}) (see `LICENSE`): research and non-commercial use only; modified models must keep "
        "names starting with \"EXAONE\"; the agreement must accompany every copy; the model and its outputs may not be "
        "used to develop other models.",
        "## Citation\n\n```bibtex\n" + EXAONE_CITATION + "\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(folder: str | os.PathLike, *, repo_id: str, base_model: str, adapter_only: bool = False) -> Path:
    """Render the card for `folder` and write it as `folder/README.md` (atomically)."""
    path = Path(folder) / MODEL_CARD
    atomic_write_text(path, render_model_card(folder, repo_id=repo_id, base_model=base_model,
                                              adapter_only=adapter_only))
    return path
