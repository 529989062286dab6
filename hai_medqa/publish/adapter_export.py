"""The adapter as others load it with plain transformers + peft: EXAONE's own module names and the
base's Hub id, with the Llama-named original beside it.

The trainer adapts the Llama-layout copy of EXAONE-3.5, so a run's adapter names Llama modules
(``model.layers.0.self_attn.o_proj``) and PEFT records the local conversion folder as its base.
Renaming through the one name table (`hai_medqa.model.exaone_layout`) gives the same adapter for
EXAONE's own modules::

    base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight
 -> base_model.model.transformer.h.0.attn.attention.out_proj.lora_A.weight
    target_modules [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
 -> [q_proj, k_proj, v_proj, out_proj, c_fc_0, c_fc_1, c_proj]

so ``PeftModel.from_pretrained(<LGAI-EXAONE/EXAONE-3.5-*-Instruct>, repo)`` finds every module. The
tensors are the same bytes under new names (no arithmetic), so the adapted model is the one trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hai_medqa.io_utils import write_json
from hai_medqa.merge.lora import PEFT_PREFIX, AdapterError
from hai_medqa.model.exaone_layout import (
    EXAONE_PROJECTIONS,
    LLAMA_PROJECTIONS,
    ModelLayoutError,
    llama_to_exaone_name,
)
from hai_medqa.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hai_medqa.run_folder import ADAPTER_LLAMA_SUBFOLDER as LLAMA_SUBFOLDER

_TO_EXAONE_PROJECTION = dict(zip(LLAMA_PROJECTIONS, EXAONE_PROJECTIONS, strict=True))


def exaone_module_name(module: str) -> str:
    """EXAONE name of a Llama module name or target: ``o_proj`` -> ``out_proj``,
    ``model.layers.3.mlp.gate_proj`` -> ``transformer.h.3.mlp.c_fc_0``; EXAONE names stay as they are."""
    if module in _TO_EXAONE_PROJECTION:
        return _TO_EXAONE_PROJECTION[module]
    if module in EXAONE_PROJECTIONS or module.startswith("transformer.") or module == "lm_head":
        return module
    try:
        return llama_to_exaone_name(module + ".weight").removesuffix(".weight")
    except ModelLayoutError:
        raise AdapterError(f"adapter module or target {module!r} has no EXAONE-3.5 name") from None


def exaone_adapter_config(config: dict[str, Any], *, base_model: str | None, revision: str | None) -> dict[str, Any]:
    """A Llama-layout adapter_config.json for EXAONE's module names and the base's Hub id."""
    out = dict(config)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{ADAPTER_CONFIG}: target_modules is a pattern ({targets!r}); only lists of names "
                           "can be renamed to EXAONE's modules")
    if targets is not None:
        out["target_modules"] = sorted({exaone_module_name(t) for t in targets})
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            out[key] = {exaone_module_name(k): v for k, v in config[key].items()}
    if config.get("exclude_modules"):
        raise AdapterError(f"{ADAPTER_CONFIG}: exclude_modules cannot be renamed to EXAONE's modules")
    if config.get("layers_pattern") in ("layers", ["layers"]):
        out["layers_pattern"] = "h"
    out.update(base_model_name_or_path=base_model, revision=revision)
    return out


def export_adapter(src: Path, dest: Path, *, base_model: str | None, revision: str | None) -> None:
    """Write `src`'s adapter into `dest` twice: at the top under EXAONE's module names (the official
    model), and in ``dest/llama/`` under the Llama names it was trained with; both name the base
    by Hub id (`base_model`, `revision`), never by a local folder."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    tensors: dict[str, Any] = {}
    with safe_open(str(src / ADAPTER_WEIGHTS), framework="pt") as f:
        metadata = f.metadata() or {"format": "pt"}
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            tensors[key] = f.get_tensor(key)
    renamed = {}
    for key, value in tensors.items():
        module, sep, rest = key[len(PEFT_PREFIX):].rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not sep:
            raise AdapterError(f"{src / ADAPTER_WEIGHTS}: unexpected tensor {key!r} (not a PEFT LoRA weight)")
        renamed[PEFT_PREFIX + exaone_module_name(module) + sep + rest] = value
    dest.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(dest / ADAPTER_WEIGHTS), metadata=metadata)
    write_json(dest / ADAPTER_CONFIG, exaone_adapter_config(config, base_model=base_model, revision=revision))
    if any(k.startswith(PEFT_PREFIX + "transformer.") for k in tensors):
        return  # trained on EXAONE's names already: there is no Llama-named original to offer
    llama = dest / LLAMA_SUBFOLDER
    llama.mkdir(exist_ok=True)
    (llama / ADAPTER_WEIGHTS).write_bytes((src / ADAPTER_WEIGHTS).read_bytes())
    write_json(llama / ADAPTER_CONFIG, {**config, "base_model_name_or_path": base_model, "revision": revision})
