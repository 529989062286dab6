"""The Hub model card (README.md) of a merged model or an adapter, built only from recorded facts.

Every statement in the card comes from a file in the release folder: merge_info.json,
release_info.json, the run's (shareable) records under training/, the trainer's record with the
training data's provenance, and the evaluation results the release bound to this model
(eval_binding). What is missing is said to be missing, never filled in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hai_medqa.chat_format import DEFAULT_SYSTEM_PROMPT
from hai_medqa.data.provenance import AIHUB_DATASET, AIHUB_DATASET_URL, CONSULTATION_SAMPLE, SYNTHETIC_SAMPLE
from hai_medqa.errors import HaiMedQAError
from hai_medqa.io_utils import atomic_write_text
from hai_medqa.publish.license import EXAONE_CITATION, EXAONE_LICENSE_NAME, EXAONE_LICENSE_URL
from hai_medqa.run_folder import (
    ADAPTER_CONFIG,
    ADAPTER_LLAMA_SUBFOLDER,
    EVAL_MODEL_KEY,
    EVAL_RESULTS,
    MERGE_INFO,
    MODEL_CARD,
    RELEASE_INFO,
    RELEASE_TRAINING_DIR,
    RESOLVED_CONFIG,
    RUN_INFO,
    SUMMARY,
    TRAINING_RECORD,
    TrainingRecord,
)
from hai_medqa.train.adapter_folder import describe_training_data, training_settings

CARD_TAGS = ["exaone", "korean", "medical", "healthcare", "qlora", "lora", "hai-medqa"]
EXAMPLE_QUESTION = "감기에 걸렸을 때 집에서 할 수 있는 관리 방법을 알려주세요."


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



def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...] = ("", "")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_card_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """Gather the recorded facts of a release folder: merge_info.json, release_info.json, training/*,
    the evaluations release_info.json lists (own and, for comparison, other models')."""
    folder = Path(folder)
    facts: dict[str, Any] = {}
    training = folder / RELEASE_TRAINING_DIR
    files = {"merge_info": folder / MERGE_INFO, "release_info": folder / RELEASE_INFO,
             "run_info": training / RUN_INFO, "summary": training / SUMMARY}
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
    # The settings the adapter was trained with: its Llama-named original when the release also
    # offers EXAONE names, else the folder's adapter, else what the merge recorded.
    for adapter_cfg in (folder / ADAPTER_LLAMA_SUBFOLDER / ADAPTER_CONFIG, folder / ADAPTER_CONFIG):
        if adapter_cfg.is_file():
            facts["adapter_config"] = _read_json(adapter_cfg)
            break
    else:
        if isinstance(facts.get("merge_info"), dict):
            facts["adapter_config"] = facts["merge_info"].get("adapter_config") or {}
    evaluations = (facts.get("release_info") or {}).get("evaluations")
    if evaluations is None and (folder / EVAL_RESULTS).is_file():  # a folder from before release_info listed them
        evaluations = [{"file": EVAL_RESULTS, "own": True, "measured": "this model"}]
    facts["evaluations"] = [{**e, "results": _read_json(folder / e["file"])} for e in evaluations or []
                            if isinstance(e, dict) and (folder / str(e.get("file"))).is_file()]
    return facts


def card_metadata(base_model: str, *, adapter_only: bool, model_name: str | None = None,
                  eval_results: list | None = None) -> dict[str, Any]:
    """The Hub metadata block (validated by huggingface_hub's ModelCardData); `eval_results`
    (huggingface_hub EvalResults of this model's own evaluation) become its ``model-index``."""
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
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    return data.to_dict()


def _chat_code(system_prompt: str | None) -> str:
    system = json.dumps(DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt, ensure_ascii=False)
    question = json.dumps(EXAMPLE_QUESTION, ensure_ascii=False)
    return f'''messages = [
    {{"role": "system", "content": {system}}},
    {{"role": "user", "content": {question}}},
]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
).to(model.device)
output = model.generate(**inputs, max_new_tokens=512, do_sample=False)  # stops at [|endofturn|]
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


def usage_snippet(repo_id: str, *, layout: str, adapter_only: bool, base_model: str,
                  system_prompt: str | None = None, base_revision: str | None = None) -> str:
    """Python that loads the published model with transformers (and peft for an adapter) only and
    answers one question with the saved chat template and the system prompt the model was trained with."""
    chat = _chat_code(system_prompt)
    if adapter_only:
        rev = f', revision="{base_revision}"' if base_revision else ""
        return f'''# transformers + peft only. The adapter's module names are EXAONE's own, so it loads onto the
# official model, which runs LG's modeling code (trust_remote_code=True; see the base model's card
# for the transformers versions it supports).
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained(
    "{base_model}"{rev}, dtype="auto", device_map="auto", trust_remote_code=True
)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # the tokenizer and chat template training used
model = PeftModel.from_pretrained(base, "{repo_id}")
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


def llama_copy_note(repo_id: str) -> str:
    """How to use an adapter release on a Llama-layout copy of the base (no remote code)."""
    return (
        f"### On a Llama-layout copy of the base (no remote code)\n\n"
        "EXAONE-3.5 is a Llama under other names. On a Llama-layout copy of the base (for example one made "
        "by HAI MedQA's converter, `python -m hai_medqa.model.convert`, which renames the tensors and config "
        f"only), load the adapter's Llama-named original from the `{ADAPTER_LLAMA_SUBFOLDER}/` folder:\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        'base = AutoModelForCausalLM.from_pretrained("path/to/llama-layout-copy", dtype="auto", device_map="auto")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{ADAPTER_LLAMA_SUBFOLDER}")\n```'
    )


def _stderr_of(results: Mapping[str, Any], key: str) -> Any:
    stderr = results.get("metrics_stderr")
    return stderr.get(key) if isinstance(stderr, Mapping) else None


def _results_tables(r: Mapping[str, Any]) -> str:
    """Metric tables of one eval_results.json: value, standard error and sample count for each."""
    data = r.get("data") if isinstance(r.get("data"), Mapping) else {}
    n = data.get("evaluated", r.get("samples"))
    parts = []
    rows = [(key, value, _stderr_of(r, key) if _stderr_of(r, key) is not None else "–", n)
            for key, value in (r.get("metrics") or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if rows:
        parts.append(_table(rows, ("metric", "value", "standard error", "samples")))
    detail = r.get("kormedmcqa_detail") if isinstance(r.get("kormedmcqa_detail"), Mapping) else {}
    subsets = detail.get("subsets") if isinstance(detail.get("subsets"), Mapping) else {}
    k_stderr = detail.get("stderr") if isinstance(detail.get("stderr"), Mapping) else {}
    k_rows = [(f"KorMedMCQA {sub}", value, k_stderr.get(sub, "–"),
               (subsets.get(sub) or {}).get("n", "–") if isinstance(subsets.get(sub), Mapping) else "–")
              for sub, value in (r.get("kormedmcqa") or {}).items()
              if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if k_rows:
        how = ", ".join(f"{k} {detail[k]}" for k in ("split", "fewshot", "format") if detail.get(k) is not None)
        parts.append(_table(k_rows, ("metric", "accuracy", "standard error", "questions"))
                     + (f"\n\nKorMedMCQA ({KORMEDMCQA_URL}): {how}." if how else ""))
    return "\n\n".join(parts) if parts else "The file holds no numeric metrics."


KORMEDMCQA_URL = "https://huggingface.co/datasets/sean0042/KorMedMCQA"


def _eval_context(r: Mapping[str, Any]) -> str:
    """Which data and settings a result was measured with, in one paragraph."""
    data = r.get("data") if isinstance(r.get("data"), Mapping) else {}
    bits = []
    if data:
        prov = data.get("provenance") if isinstance(data.get("provenance"), Mapping) else {}
        src = f"; source: {prov['source']}" if prov.get("source") else ""
        bits.append(f"validation data `{data.get('file', 'jsonl')}` (sha256 `{data.get('sha256')}`, "
                    f"{data.get('records')} records{src}), {data.get('evaluated', r.get('samples'))} samples evaluated")
    if r.get("seed") is not None:
        bits.append(f"seed {r['seed']}")
    gen = r.get("generation")
    if isinstance(gen, Mapping):
        bits.append("generation " + ", ".join(f"{k} {v}" for k, v in gen.items()))
    if isinstance(r.get("system_prompt"), str):
        bits.append("system prompt " + json.dumps(r["system_prompt"], ensure_ascii=False))
    identity = r.get(EVAL_MODEL_KEY) if isinstance(r.get(EVAL_MODEL_KEY), Mapping) else {}
    if identity.get("quantize_4bit"):
        bits.append("base loaded in 4-bit NF4")
    return "; ".join(bits) + "." if bits else ""


def _eval_section(evaluations: list[Mapping[str, Any]]) -> str:
    own = [e for e in evaluations if e.get("own")]
    other = [e for e in evaluations if not e.get("own")]
    parts = []
    if not own:
        parts.append("No evaluation of this model was recorded (no `eval_results.json` that measured it). "
                     "Run `evaluate.py` on the merged model or the adapter and re-run `merge_and_upload.py` to "
                     "add it.")
    for e in own:
        r = e["results"]
        parts.append(f"Measured on {e.get('measured', 'this model')}. {_eval_context(r)}\n\n{_results_tables(r)}")
    if other:
        parts.append("### Other models, for comparison\n\nThese numbers are **not this model's**; each table says "
                     "which model they measured.")
        for e in other:
            r = e["results"]
            parts.append(f"**Results of {e.get('measured', 'another model')}** (`{e['file']}`). {_eval_context(r)}"
                         f"\n\n{_results_tables(r)}")
    return "\n\n".join(parts)


def _training_section(facts: Mapping[str, Any]) -> str:
    cfg = facts.get("train_config")
    record = TrainingRecord.from_json(facts.get("training_record"))
    rows = training_settings(adapter_config=facts.get("adapter_config"),
                             config=cfg if isinstance(cfg, Mapping) else None,
                             run_info=facts.get("run_info"), summary=facts.get("summary"), record=record)
    if not rows:
        return "The training run's files were not available when this card was written; no settings are listed."
    text = "Recorded by the training run (`training/` in this repository holds the files):\n\n"
    text += _table(rows, ("setting", "value"))
    if facts.get("train_config_text"):
        text += ("\n\n<details><summary>Full training config (resolved_config.yaml)</summary>\n\n```yaml\n"
                 + facts["train_config_text"].rstrip() + "\n```\n\n</details>")
    return text


_RUN_DATA_LABELS = {"train_file": "train", "val_file": "validation"}


def _run_data(facts: Mapping[str, Any]) -> dict[str, Any]:
    run_info = facts.get("run_info") if isinstance(facts.get("run_info"), Mapping) else {}
    run_data = run_info.get("data") if isinstance(run_info.get("data"), Mapping) else {}
    return {_RUN_DATA_LABELS.get(k, k): v for k, v in run_data.items()}


def _training_data(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The training data's provenance: the trainer's record (TrainingRecord.data), else what the
    release found for run_info.json's data files; {} when neither is recorded."""
    record = facts.get("training_record") if isinstance(facts.get("training_record"), Mapping) else {}
    return record.get("data") or {
        k: {**v["provenance"], "file": v.get("file"), "sha256": v.get("sha256"),
            "records": v["provenance"].get("records", v.get("records"))}
        for k, v in _run_data(facts).items() if isinstance(v, Mapping) and isinstance(v.get("provenance"), Mapping)}


def _data_summary(facts: Mapping[str, Any]) -> str:
    """What the model was trained on, in a few words, for the card's first paragraph."""
    train = _training_data(facts).get("train") or {}
    if train.get("source") == SYNTHETIC_SAMPLE:
        return ("on the **bundled synthetic sample** of the HAI MedQA project (a few hundred generated records "
                "in AI Hub's layout: a pipeline demonstration, not a medical model)")
    if train.get("source") == CONSULTATION_SAMPLE:
        return ("on the **bundled consultation sample** of the HAI MedQA project (a few dozen hand-written "
                "multi-turn consultations: a pipeline demonstration, not a medical model)")
    if train.get("source") == AIHUB_DATASET:
        return f"on Korean healthcare question answering ([{AIHUB_DATASET}]({AIHUB_DATASET_URL}))"
    return "on Korean healthcare question answering data whose source was not recorded"


def _data_section(facts: Mapping[str, Any]) -> str:
    """From the recorded provenance (`_training_data`), else the data files' hashes and counts alone."""
    text = describe_training_data(_training_data(facts) or None, run_data=_run_data(facts))
    return text + "\n\nThe data is distributed by its owners under their own terms and is not redistributed here."


def _license_section(full_text: bool | None) -> str:
    text = (f"Derived from EXAONE 3.5 and distributed under the [EXAONE AI Model License Agreement 1.1 - NC]"
            f"({EXAONE_LICENSE_URL}) (see `LICENSE`): research and non-commercial use only; modified models must "
            "keep names starting with \"EXAONE\"; the agreement must accompany every copy; the model and its "
            "outputs may not be used to develop other models.")
    if full_text is False:
        text += ("\n\n**The full text of the agreement is missing from this repository**: `LICENSE` holds only a "
                 "notice, because the base model folder this release was built from had no license file. The "
                 f"agreement's text is at {EXAONE_LICENSE_URL}; it must accompany every copy.")
    return text


def render_model_card(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str,
    adapter_only: bool = False,
) -> str:
    """The README.md text for the release folder `folder` (merged model, or adapter when `adapter_only`)."""
    from hai_medqa.publish.eval_binding import BoundEval, model_index_results

    facts = load_card_facts(folder)
    merge = facts.get("merge_info") or {}
    release = facts.get("release_info") or {}
    layout = merge.get("layout", "llama")
    name = repo_id.rsplit("/", 1)[-1]
    evaluations = facts["evaluations"]
    index = model_index_results([BoundEval(Path(e["file"]), e["results"], bool(e.get("own")), "")
                                 for e in evaluations])
    meta = yaml.safe_dump(card_metadata(base_model, adapter_only=adapter_only, model_name=name, eval_results=index),
                          allow_unicode=True, sort_keys=False).strip()
    base_rev = release.get("base_model_revision") or merge.get("base_model_revision")
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if "/" in base_model else f"`{base_model}`"
    if adapter_only:
        what = f"a LoRA adapter for {base_link}, trained with QLoRA (4-bit NF4 base) {_data_summary(facts)}."
        form = ("LoRA adapter (PEFT format, safetensors) under EXAONE-3.5's own module names; the Llama-named "
                f"original is in `{ADAPTER_LLAMA_SUBFOLDER}/`.")
    else:
        into = {"original": "the original (unquantised) base weights",
                "nf4": "the NF4-quantised-then-dequantised base weights (the exact training-time forward)"}
        what = (f"{base_link} fine-tuned with QLoRA {_data_summary(facts)}, with the LoRA update merged into "
                f"{into.get(merge.get('merge_into'), 'the base weights')}.")
        form = (
            "Full merged weights in the Llama layout: loads with plain `transformers`, no remote code."
            if layout == "llama" else
            "Full merged weights in EXAONE-3.5's original layout (needs LG's modeling code)."
        )
    dtypes = ", ".join(merge.get("weight_dtypes", [])) or "as stored"
    details_rows: list[tuple[str, Any]] = [("base model", base_model)]
    if base_rev:
        details_rows.append(("base revision", base_rev))
    details_rows += [("method", "QLoRA (LoRA on a 4-bit NF4 base)"), ("format", form)]
    if not adapter_only:
        details_rows += [("merge", merge.get("merge_into", "unknown")), ("weight dtype", dtypes)]
    details_rows += [("language", "Korean"), ("license", "EXAONE AI Model License Agreement 1.1 - NC")]

    record = facts.get("training_record") or {}
    system_prompt = record.get("system_prompt") if isinstance(record.get("system_prompt"), str) else None
    snippet = usage_snippet(repo_id, layout=layout, adapter_only=adapter_only, base_model=base_model,
                            system_prompt=system_prompt, base_revision=base_rev)
    usage = "## Usage\n\n```python\n" + snippet + "\n```"
    if adapter_only:
        usage += "\n\n" + llama_copy_note(repo_id)
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
        "## Training data\n\n" + _data_section(facts),
        "## Training settings\n\n" + _training_section(facts),
        "## Evaluation\n\n" + _eval_section(evaluations),
        usage,
        "## Limitations\n\n"
        "- Trained on one Korean QA dataset: answers follow that data's style and coverage and can be wrong, "
        "incomplete or out of date; the model may state errors confidently.\n"
        "- Not evaluated for clinical safety; it must not be used for diagnosis, treatment or triage.\n"
        "- Korean only in practice; other languages were not trained or tested.\n"
        "- Inherits the base model's limitations and biases.",
        "## License\n\n" + _license_section(release.get("full_license_text")),
        "## Citation\n\n```bibtex\n" + EXAONE_CITATION + "\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(folder: str | os.PathLike, *, repo_id: str, base_model: str, adapter_only: bool = False) -> Path:
    """Render the card for `folder` and write it as `folder/README.md` (atomically)."""
    path = Path(folder) / MODEL_CARD
    atomic_write_text(path, render_model_card(folder, repo_id=repo_id, base_model=base_model,
                                              adapter_only=adapter_only))
    return path
