"""Read a PEFT LoRA adapter folder and describe the weight update it makes to each base weight.

Only what the streaming merge can reproduce exactly is accepted: plain LoRA on linear layers
(`W' = W + scaling * B @ A`). Every other PEFT feature is refused with a message naming it, before
anything is written, because silently dropping it would publish a model that is not the one trained.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hai_medqa.errors import HaiMedQAError
from hai_medqa.merge.safetensors_stream import SafetensorsFormatError, TensorInfo, read_header, read_tensor
from hai_medqa.model.exaone_layout import LLAMA_PROJECTIONS
from hai_medqa.run_folder import ADAPTER_CONFIG, ADAPTER_DIRS, ADAPTER_WEIGHTS, find_adapter_dir

PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# init methods that rewrite the base weights themselves (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA): the
# saved adapter is then relative to a modified base and cannot be added to the original one.
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# config options that change the forward beyond W + s*B@A; refused when set.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "lora_bias": "LoRA bias",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "megatron_config": "Megatron parallel layers",
}


class AdapterError(HaiMedQAError, ValueError):
    """The adapter folder cannot be merged (missing, malformed or using an unsupported feature)."""


@dataclass(frozen=True)
class LoraUpdate:
    """The update LoRA makes to one base weight: W' = W + scaling * (B @ A)."""

    module: str  # base-model module name in the Llama layout, e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo  # lora_A.weight, shape (r, in_features)
    b: TensorInfo  # lora_B.weight, shape (out_features, r)
    rank: int
    alpha: float
    scaling: float

    @property
    def weight_name(self) -> str:
        return self.module + ".weight"

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32 (the same product and order PEFT uses for merging)."""
        a = read_tensor(self.a).float()
        b = read_tensor(self.b).float()
        return (b @ a).mul_(self.scaling)


@dataclass
class LoraAdapter:
    """A parsed adapter folder: its config (as a dict), and one `LoraUpdate` per adapted module."""

    path: Path
    config: dict
    updates: dict[str, LoraUpdate]  # keyed by Llama-layout weight name ("...q_proj.weight")
    trained_on_exaone_names: bool = False  # module names in the file use EXAONE's layout
    _peft_config: object = field(default=None, repr=False)

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def targets_module(self, module: str) -> bool:
        """Whether the adapter config asks for a LoRA on `module` (PEFT's own matching rules)."""
        from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

        if self._peft_config is None:
            self._peft_config = _lora_config(self.config, self.path)
        hit = check_target_module_exists(self._peft_config, module)
        return bool(hit) and not isinstance(hit, _ExcludedModule)


def _lora_config(raw: dict, path: Path):
    """The adapter config as PEFT's LoraConfig (PEFT validates it); AdapterError if it refuses."""
    from peft import LoraConfig

    known = {k: v for k, v in raw.items()
             if k in LoraConfig.__dataclass_fields__ and k not in ("peft_type", "auto_mapping")}
    try:
        cfg = LoraConfig(**known)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: PEFT rejects this LoRA config ({e})") from None
    if cfg.target_modules == "all-linear":  # PEFT expands this when saving; kept for hand-made configs
        cfg.target_modules = set(LLAMA_PROJECTIONS)
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (a key matches a module-name suffix, regex allowed)."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


def resolve_adapter_dir(path: str | Path) -> Path:
    """Accept an adapter folder or a training run folder (then use adapter_best/, else adapter_last/)."""
    path = Path(path)
    found = find_adapter_dir(path)
    if found is not None:
        return found
    if not path.exists():
        raise AdapterError(f"adapter folder {path} does not exist")
    raise AdapterError(
        f"{path} holds no {ADAPTER_CONFIG} (and no {' or '.join(d + '/' for d in ADAPTER_DIRS)} run folder beneath it)"
    )


def load_adapter(path: str | Path, to_llama_name: Callable[[str], str | None] | None = None) -> LoraAdapter:
    """Parse and check an adapter folder without loading its weights (only the safetensors header).

    `to_llama_name` maps a module name the adapter was trained on to the Llama-layout weight name
    (identity for adapters trained on the Llama layout; the EXAONE->Llama rename otherwise); it gets
    a weight name ("...q_proj.weight") and returns the Llama weight name or None when unknown.
    """
    path = resolve_adapter_dir(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path / ADAPTER_CONFIG}: expected a JSON object")
    _check_config(config, path)

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise AdapterError(f"{path}: only adapter_model.bin (pickle) found; this project loads safetensors only")
        raise AdapterError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    try:
        infos, _ = read_header(weights)
    except SafetensorsFormatError as e:
        raise AdapterError(str(e)) from None

    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key in sorted(infos):
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: unexpected tensor {key!r} (not a PEFT LoRA weight)")
        m = _LORA_KEY.match(key[len(PEFT_PREFIX):])
        if m is None:
            what = "embedding LoRA" if ".lora_embedding_" in key else "a full-weight module (modules_to_save)"
            if "lora_magnitude_vector" in key:
                what = "DoRA"
            raise AdapterError(f"{weights}: tensor {key!r} belongs to {what}, which the merge does not support")
        pairs.setdefault(m["module"], {})[m["ab"]] = infos[key]

    default_r = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", 8))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    updates: dict[str, LoraUpdate] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: module {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{weights}: {module} has inconsistent LoRA shapes A{list(a.shape)} B{list(b.shape)}")
        rank = int(_pattern_value(rank_pattern, module, default_r))
        if a.shape[0] != rank:
            raise AdapterError(f"{weights}: {module} has rank {a.shape[0]} but the config says r={rank}")
        alpha = float(_pattern_value(alpha_pattern, module, default_alpha))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weight_name = module + ".weight"
        llama_name = to_llama_name(weight_name) if to_llama_name else weight_name
        if llama_name is None:
            raise AdapterError(f"{weights}: module {module} is not a weight of an EXAONE/Llama model")
        if llama_name in updates:
            raise AdapterError(f"{weights}: two adapter modules map to the same base weight {llama_name}")
        updates[llama_name] = LoraUpdate(llama_name.removesuffix(".weight"), a, b, rank, alpha, scaling)
    if not updates:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    exaone_names = any(k.startswith(PEFT_PREFIX + "transformer.") for k in infos)
    return LoraAdapter(path=path, config=config, updates=dict(sorted(updates.items())),
                       trained_on_exaone_names=exaone_names)


def _check_config(config: dict, path: Path) -> None:
    where = path / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for option, label in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{where}: {label} ({option}) is not supported by the merge")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save={config['modules_to_save']} (fully trained modules) is not supported"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{where}: fan_in_fan_out=true is for GPT-2 Conv1D layers, not EXAONE/Llama")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise AdapterError(
            f"{where}: init_lora_weights={init!r} changes the base weights themselves; convert the adapter to "
            "a plain LoRA first (PEFT: path_initial_model_for_weight_conversion)"
        )
