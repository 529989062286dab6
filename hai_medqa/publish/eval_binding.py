"""Evaluation results bound to the model they measured.

An eval_results.json says which model it measured (``evaluated_model``: the weights loaded, their
fingerprint, the base's Hub id; format in `hai_medqa.run_folder.EVAL_MODEL_KEY`). A release shows
results as its own only when that identity is the released model:

- ``weights: "adapter"`` and the fingerprint of the adapter being released (base + this adapter);
- ``weights: "merged"`` made from this adapter the same way (``adapter_fingerprint``, ``merge_into``),
  or whose fingerprint equals the merged weights being released;

and, when both name a base Hub id, the same base. Anything else (the base model alone, another
adapter, a file without an identity) is another model's: the release stops with one line saying
whose results they are, unless the caller asks to show them labelled as another model's
(``--include-foreign-eval``: a comparison table, never in the Hub's ``model-index``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hai_medqa.errors import HaiMedQAError
from hai_medqa.model.identity import hub_reference
from hai_medqa.run_folder import EVAL_MODEL_KEY


class EvalMismatchError(HaiMedQAError, ValueError):
    """Evaluation results given for a release measured another model."""


@dataclass
class ReleasedModel:
    """What a release publishes, as evaluation identities name it."""

    adapter_fingerprint: str
    base_model: str | None  # Hub id, None when only a local folder is known
    merge_into: str | None = None  # None for an adapter-only release
    merged_fingerprint: Callable[[], str] | None = None  # computed only when a result needs it

    def describe(self) -> str:
        what = (f"this adapter (sha256 {self.adapter_fingerprint[:12]}…)" if self.merge_into is None
                else f"this adapter (sha256 {self.adapter_fingerprint[:12]}…) merged into the {self.merge_into} weights")
        return what + (f" on {self.base_model}" if self.base_model else "")


@dataclass
class BoundEval:
    """One eval_results.json and whether it measured the released model."""

    path: Path  # local, never published
    results: dict[str, Any]
    own: bool
    whose: str  # "this model (...)" or whose results they are
    identity: dict[str, Any] = field(default_factory=dict)


def read_eval(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalMismatchError(f"evaluation results {path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise EvalMismatchError(f"evaluation results {path}: expected a JSON object")
    return data


def _short(fp: Any) -> str:
    return f"sha256 {str(fp)[:12]}…" if fp else "no fingerprint"


def whose(identity: dict[str, Any], label: Any = None) -> str:
    """Who the results of `identity` belong to, in words."""
    base = identity.get("base_model") or "a local base model"
    name = f" (label {label!r})" if label else ""
    kind = identity.get("weights")
    if kind == "base":
        return f"the base model {identity.get('base_model') or '(a local folder)'} without any adapter{name}"
    if kind == "adapter":
        return f"the adapter with weights {_short(identity.get('fingerprint'))} on {base}{name}"
    if kind == "merged":
        src = f", made from adapter {_short(identity.get('adapter_fingerprint'))}" if identity.get(
            "adapter_fingerprint") else ""
        return f"merged weights {_short(identity.get('fingerprint'))}{src} ({base}){name}"
    return f"an unidentified model{name} (no {EVAL_MODEL_KEY!r} record in the file)"


def bind(path: str | Path, released: ReleasedModel) -> BoundEval:
    """Read one eval_results.json and decide whether it measured `released`."""
    results = read_eval(path)
    identity = dict(results[EVAL_MODEL_KEY]) if isinstance(results.get(EVAL_MODEL_KEY), dict) else {}
    if identity.get("base_model"):  # a record that names the base by a local folder: by Hub id, if it has one
        identity["base_model"] = hub_reference(identity["base_model"])[0]
    label = results.get("model")
    same_base = not (identity.get("base_model") and released.base_model
                     and identity["base_model"] != released.base_model)
    kind = identity.get("weights")
    own = False
    if same_base and kind == "adapter":
        own = identity.get("fingerprint") == released.adapter_fingerprint
    elif same_base and kind == "merged":
        own = (identity.get("adapter_fingerprint") == released.adapter_fingerprint
               and (released.merge_into is None or identity.get("merge_into") == released.merge_into))
        if not own and released.merged_fingerprint is not None and identity.get("fingerprint"):
            own = identity["fingerprint"] == released.merged_fingerprint()
    text = f"this model: {whose(identity)}" if own else whose(identity, label)
    return BoundEval(Path(path), results, own, text, identity)


def bind_all(paths: list[Path], released: ReleasedModel, *, include_foreign: bool) -> list[BoundEval]:
    """Bind every results file; stop at the first that is another model's unless `include_foreign`."""
    bound = []
    for path in paths:
        b = bind(path, released)
        if not b.own and not include_foreign:
            raise EvalMismatchError(
                f"{path} holds results of {b.whose}, not of the model being released ({released.describe()}); "
                "evaluate the released model, or pass --include-foreign-eval to show them labelled as another "
                "model's")
        bound.append(b)
    return bound


# ---------------------------------------------------------------- the Hub's model-index
_METRIC_TYPES = {"rouge1": "rouge", "rouge2": "rouge", "rougeL": "rouge", "char_rougeL": "rouge",
                 "answer_ppl": "perplexity"}
KORMEDMCQA_HUB_ID = "sean0042/KorMedMCQA"


def model_index_results(bound: list[BoundEval]) -> list:
    """huggingface_hub ``EvalResult``s of the model's own results (the card's ``model-index``): each
    metric with its dataset (name, sha256, counts) and standard error."""
    from huggingface_hub import EvalResult

    out = []
    for b in bound:
        if not b.own:
            continue
        r = b.results
        data = r.get("data") if isinstance(r.get("data"), dict) else {}
        stderr = r.get("metrics_stderr") if isinstance(r.get("metrics_stderr"), dict) else {}
        n = data.get("evaluated", r.get("samples"))
        for key, value in (r.get("metrics") or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            se = stderr.get(key)
            out.append(EvalResult(
                task_type="text-generation", task_name="Korean healthcare question answering",
                dataset_type="hai-medqa-validation",
                dataset_name=f"HAI MedQA validation ({data.get('file') or 'jsonl'})",
                dataset_split="validation",
                dataset_args={k: data[k] for k in ("sha256", "records", "evaluated") if data.get(k) is not None},
                metric_type=_METRIC_TYPES.get(key, key), metric_value=value,
                metric_name=key + (f" (n={n}, s.e. {se:.4f})" if isinstance(se, (int, float)) else f" (n={n})")))
        detail = r.get("kormedmcqa_detail") if isinstance(r.get("kormedmcqa_detail"), dict) else {}
        subsets = detail.get("subsets") if isinstance(detail.get("subsets"), dict) else {}
        k_stderr = detail.get("stderr") if isinstance(detail.get("stderr"), dict) else {}
        for subset, value in (r.get("kormedmcqa") or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            n = (subsets.get(subset) or {}).get("n") if isinstance(subsets.get(subset), dict) else None
            se = k_stderr.get(subset)
            out.append(EvalResult(
                task_type="multiple-choice", task_name="KorMedMCQA", dataset_type=KORMEDMCQA_HUB_ID,
                dataset_name="KorMedMCQA", dataset_config=subset if subset in subsets else None,
                dataset_split=detail.get("split"), metric_type="accuracy", metric_value=value,
                metric_name=f"accuracy {subset}" + (f" (n={n}" if n else " (") + (
                    f", s.e. {se:.4f})" if isinstance(se, (int, float)) else ")")))
    return out
