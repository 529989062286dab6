"""Loading a model for inference (merged folder, or base + LoRA adapter); generation itself is in
`hai_medqa.model.generate` (re-exported here).

The generation rules (left padding, stop at [|endofturn|], greedy by default) are listed there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from hai_medqa.model.generate import (  # noqa: F401 - generation is the model stage's; re-exported here
    GenerationSettings,
    InferenceError,
    LoadedModel,
    TextSink,
    batch_plan,
    chat_token_ids,
    decode_answer,
    generate,
    generate_ids,
    iter_generate_ids,
)
from hai_medqa.run_folder import ADAPTER_CONFIG, RUN_INFO, run_base_model

TOKENIZER_CONFIG = "tokenizer_config.json"  # transformers' name; an adapter folder carries one when training saved it


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def recorded_base(adapter_dir: Path) -> tuple[str, str | None]:
    """(model, revision) to load under an adapter when no --model is given.

    The adapter's config names its base by Hub id (with the revision trained on); an adapter trained on
    a local folder records null there (no local path is shared), and then the training run's
    run_info.json (``model.requested``, else the Llama copy it trained on, ``model.local_path``) names
    it, when the adapter is still inside its run folder and that model is still here. Otherwise an
    InferenceError asking for --model."""
    from hai_medqa.model.acquire import is_hub_id

    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InferenceError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read ({e})") from None
    if cfg.get("base_model_name_or_path"):
        logger.info(f"base model from the adapter's config: {cfg['base_model_name_or_path']}")
        return cfg["base_model_name_or_path"], cfg.get("revision") or None
    run = run_base_model(adapter_dir) or {}
    where = f"{adapter_dir.parent / RUN_INFO}"
    for key in ("requested", "local_path"):
        value = run.get(key)
        if isinstance(value, str) and value and (Path(value).expanduser().exists()
                                                 or (key == "requested" and is_hub_id(value))):
            logger.info(f"base model from the training run's {where} (model.{key}): {value}")
            return value, run.get("revision") if key == "requested" else None
    recorded = f"; the run recorded {run.get('requested')!r}, which is not here" if run.get("requested") else ""
    raise InferenceError(f"{adapter_dir}: the adapter records no base model (it was trained on a local folder"
                         f"{recorded}); pass --model")


def resolve_adapter(adapter: str | Path | None) -> Path | None:
    """The adapter folder of an ``--adapter`` argument: the folder itself, or a run folder's
    adapter_best/ (else adapter_last/); an AdapterError naming the path when there is none."""
    if adapter is None:
        return None
    from hai_medqa.merge.lora import resolve_adapter_dir

    return resolve_adapter_dir(adapter)


def load_for_inference(
    model: str | None,
    adapter: str | None = None,
    *,
    revision: str | None = None,
    quantize_4bit: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load a merged model folder / Hub id, optionally with a LoRA adapter on top, ready to generate.

    `model` follows the project's ``--model`` convention (Hub id or local folder, EXAONE or Llama
    layout; see `hai_medqa.model.acquire.resolve_model`). `adapter` is a PEFT folder or a training run
    folder (its adapter_best/, else adapter_last/). Without `model`, the adapter's recorded base is
    used (`recorded_base`: its config's Hub id, else its run's run_info.json). The tokenizer comes from the adapter folder when it carries one (that is what training
    used), else from the model.
    """
    from hai_medqa.model.acquire import resolve_model
    from hai_medqa.model.load import load_causal_lm, load_tokenizer

    adapter_dir = resolve_adapter(adapter)
    if model is None:
        if adapter_dir is None:
            raise InferenceError("give --model (a merged folder or Hub id) and/or --adapter")
        model, recorded_revision = recorded_base(adapter_dir)
        revision = revision or recorded_revision
    device = device or _default_device()
    dtype = _resolve_dtype(dtype, device)
    folder = resolve_model(model, revision)
    tok_source = adapter_dir if adapter_dir is not None and (adapter_dir / TOKENIZER_CONFIG).is_file() else folder
    tokenizer = load_tokenizer(tok_source)
    tokenizer.padding_side = "left"
    token_ids = chat_token_ids(tokenizer, source=str(tok_source))
    device_map = {"": device} if (quantize_4bit or device != "cpu") else None
    lm = load_causal_lm(folder, quantize_4bit=quantize_4bit, dtype=dtype, device_map=device_map,
                        attn_implementation=attn_implementation)
    if adapter_dir is not None:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(adapter_dir), is_trainable=False)
    lm.eval()
    info = {
        "model": model,
        "revision": revision,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "resolved_model_dir": str(folder),
        "quantize_4bit": quantize_4bit,
        "dtype": dtype,
        "device": device,
        "attn_implementation": attn_implementation,
    }
    logger.info(f"loaded {model}" + (f" + adapter {adapter_dir}" if adapter_dir else "") +
                f" ({'4-bit NF4, ' if quantize_4bit else ''}{dtype}, {device})")
    return LoadedModel(lm, tokenizer, info, token_ids)


