"""THE mapping between EXAONE-3.5's checkpoint layout and transformers' Llama layout, both ways.

EXAONE-3.5 is a Llama under other names: the same RMSNorm / rotate-half RoPE (llama3 scaling) / GQA
attention / SiLU-gated MLP, stored with GPT-2-style tensor names and config keys. This module is the
only place that knows the names; `convert.py` streams weights through it and every other stage only
ever sees the Llama layout.

Weight names (pure rename, no permutation, no reshaping)::

    transformer.wte                              <-> model.embed_tokens
    transformer.h.{i}.ln_1                       <-> model.layers.{i}.input_layernorm
    transformer.h.{i}.attn.attention.{q,k,v}_proj <-> model.layers.{i}.self_attn.{q,k,v}_proj
    transformer.h.{i}.attn.attention.out_proj    <-> model.layers.{i}.self_attn.o_proj
    transformer.h.{i}.ln_2                       <-> model.layers.{i}.post_attention_layernorm
    transformer.h.{i}.mlp.c_fc_0 (gate)          <-> model.layers.{i}.mlp.gate_proj
    transformer.h.{i}.mlp.c_fc_1 (up)            <-> model.layers.{i}.mlp.up_proj
    transformer.h.{i}.mlp.c_proj (down)          <-> model.layers.{i}.mlp.down_proj
    transformer.ln_f                             <-> model.norm
    lm_head                                      <-> lm_head (absent when embeddings are tied)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from hai_medqa.errors import HaiMedQAError

EXAONE_MODEL_TYPE = "exaone"
LLAMA_MODEL_TYPE = "llama"
EXAONE_ARCHITECTURE = "ExaoneForCausalLM"
LLAMA_ARCHITECTURE = "LlamaForCausalLM"

# Where an exported EXAONE-layout folder finds its modeling code when loaded with trust_remote_code
# (transformers resolves "repo--module.Class" from the Hub); we never download or run that code.
DEFAULT_EXAONE_CODE_REPO = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"


class ModelLayoutError(HaiMedQAError, ValueError):
    """A checkpoint or config that is not the EXAONE or Llama layout this project expects."""


# ---------------------------------------------------------------------------------------------
# Weight names
# ---------------------------------------------------------------------------------------------

# One table, EXAONE name -> Llama name, with `{}` for the layer index; both directions and every list
# of names below derive from it.
EXAONE_TO_LLAMA: dict[str, str] = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.h.{}.ln_1.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.h.{}.attn.attention.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "transformer.h.{}.attn.attention.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "transformer.h.{}.attn.attention.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "transformer.h.{}.attn.attention.out_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.h.{}.ln_2.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.h.{}.mlp.c_fc_0.weight": "model.layers.{}.mlp.gate_proj.weight",
    "transformer.h.{}.mlp.c_fc_1.weight": "model.layers.{}.mlp.up_proj.weight",
    "transformer.h.{}.mlp.c_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_TO_EXAONE: dict[str, str] = {v: k for k, v in EXAONE_TO_LLAMA.items()}

_LINEAR_SUFFIXES = ("_proj.weight", ".c_fc_0.weight", ".c_fc_1.weight", ".c_proj.weight")
LLAMA_PROJECTION_WEIGHTS: tuple[str, ...] = tuple(
    llama.removeprefix("model.layers.{}.") for exaone, llama in EXAONE_TO_LLAMA.items()
    if "{}" in llama and exaone.endswith(_LINEAR_SUFFIXES))
"""The seven per-layer linear weights, e.g. ``self_attn.q_proj.weight``, ``mlp.down_proj.weight``."""
LLAMA_PROJECTIONS: tuple[str, ...] = tuple(w.removesuffix(".weight").rsplit(".", 1)[-1]
                                           for w in LLAMA_PROJECTION_WEIGHTS)
"""The seven projection module names LoRA targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."""
EXAONE_PROJECTIONS: tuple[str, ...] = tuple(
    LLAMA_TO_EXAONE["model.layers.{}." + w].removesuffix(".weight").rsplit(".", 1)[-1]
    for w in LLAMA_PROJECTION_WEIGHTS)
"""The same seven in EXAONE's own module names: q_proj, k_proj, v_proj, out_proj, c_fc_0, c_fc_1, c_proj."""

_LAYER_INDEX_RE = re.compile(r"\.(\d+)\.")


def _map_name(name: str, table: Mapping[str, str]) -> str | None:
    """Map one tensor name through a slot table: ``"transformer.h.3.ln_1.weight"`` ->
    ``"model.layers.3.input_layernorm.weight"`` (first number in the name fills the slot)."""
    if name in table:
        return table[name]
    m = _LAYER_INDEX_RE.search(name)
    if m is None:
        return None
    target = table.get(name[:m.start()] + ".{}." + name[m.end():])
    return None if target is None else target.format(m.group(1))


# Non-persistent buffers some exporters still write; they are recomputed from the config.
_DERIVED_BUFFER_RE = re.compile(r"(^|\.)(rotary|rotary_emb)\.inv_freq$")


def is_derived_buffer(name: str) -> bool:
    """True for tensors that are recomputed from the config (RoPE inv_freq) and need not be copied."""
    return bool(_DERIVED_BUFFER_RE.search(name))


def exaone_to_llama_name(name: str) -> str:
    """Llama name of an EXAONE tensor name; ModelLayoutError for a name EXAONE-3.5 does not have."""
    mapped = _map_name(name, EXAONE_TO_LLAMA)
    if mapped is None:
        raise ModelLayoutError(f"unexpected tensor {name!r}: not part of the EXAONE-3.5 layout")
    return mapped


def llama_to_exaone_name(name: str) -> str:
    """EXAONE name of a Llama tensor name; ModelLayoutError for a name with no EXAONE equivalent
    (e.g. attention/MLP biases, which EXAONE-3.5 does not have)."""
    mapped = _map_name(name, LLAMA_TO_EXAONE)
    if mapped is None:
        raise ModelLayoutError(f"unexpected tensor {name!r}: not part of the Llama layout EXAONE-3.5 maps to")
    return mapped


def expected_llama_shapes(llama_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint with this config.json must hold, with its shape.

    ``lm_head.weight`` is listed only for untied embeddings (a tied checkpoint may still carry it).
    """
    c = llama_config
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

# EXAONE config key -> Llama config key (keys not listed keep their name: hidden_size, head_dim, ...).
_CONFIG_RENAMES = {
    "num_layers": "num_hidden_layers",
    "activation_function": "hidden_act",
    "layer_norm_epsilon": "rms_norm_eps",
    "torch_dtype": "dtype",
}
_CONFIG_RENAMES_BACK = {v: k for k, v in _CONFIG_RENAMES.items()}
# Handled explicitly (identity, rope) or meaningless in the other layout.
_EXAONE_ONLY_KEYS = {"auto_map", "embed_dropout", "architectures", "model_type", "transformers_version",
                     "rope_scaling", "rope_theta", "rope_parameters"}
_LLAMA_ONLY_KEYS = {"architectures", "model_type", "transformers_version", "rope_parameters", "rope_scaling",
                    "rope_theta", "attention_bias", "mlp_bias", "pretraining_tp"}
_REQUIRED_EXAONE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def detect_layout(config: Mapping[str, Any], where: str = "config.json") -> str:
    """Return "exaone" or "llama" for a config.json dict; ModelLayoutError naming what was expected."""
    model_type = config.get("model_type")
    if model_type in (EXAONE_MODEL_TYPE, LLAMA_MODEL_TYPE):
        return model_type
    raise ModelLayoutError(
        f"{where}: model_type is {model_type!r}; expected 'exaone' (EXAONE-3.5 layout) or 'llama' (Llama layout)"
    )


def _rope_parameters_from_exaone(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """transformers-5 `rope_parameters` (rope_type + factors + rope_theta) from an EXAONE config that
    uses either the old `rope_scaling` + `rope_theta` pair or the new `rope_parameters` form."""
    if isinstance(cfg.get("rope_parameters"), Mapping):
        rope = dict(cfg["rope_parameters"])
        if "rope_theta" not in rope and "rope_theta" in cfg:
            rope["rope_theta"] = cfg["rope_theta"]
    else:
        scaling = cfg.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, Mapping):
            raise ModelLayoutError(f"{where}: rope_scaling must be an object or null, got {scaling!r}")
        rope = dict(scaling) if scaling else {"rope_type": "default"}
        if "rope_theta" in cfg:
            rope["rope_theta"] = cfg["rope_theta"]
    if "type" in rope and "rope_type" not in rope:  # legacy spelling
        rope["rope_type"] = rope.pop("type")
    if "rope_theta" not in rope:
        raise ModelLayoutError(f"{where}: no rope_theta (neither top-level nor in rope_parameters)")
    rope.setdefault("rope_type", "default")
    return rope


def exaone_config_to_llama(exaone_config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Map an EXAONE-3.5 config.json dict to a Llama config.json dict.

    Every value is read from the source (rope settings end up in transformers 5's
    `rope_parameters`); EXAONE-only keys (auto_map, embed_dropout) are dropped and unknown keys are
    carried over unchanged. The result is validated by building a `LlamaConfig` from it.
    """
    cfg = dict(exaone_config)
    if detect_layout(cfg, where) != EXAONE_MODEL_TYPE:
        raise ModelLayoutError(f"{where}: expected an EXAONE config (model_type 'exaone'), got model_type 'llama'")
    missing = [k for k in _REQUIRED_EXAONE_KEYS if k not in cfg]
    if "num_layers" not in cfg and "num_hidden_layers" not in cfg:
        missing.append("num_layers")
    if missing:
        raise ModelLayoutError(f"{where}: missing required key(s) {', '.join(missing)}")
    if cfg.get("embed_dropout"):
        # Llama has no embedding dropout; it only matters for training from scratch.
        from loguru import logger

        logger.warning(f"{where}: embed_dropout={cfg['embed_dropout']} has no Llama equivalent and is dropped")

    out: dict[str, Any] = {"architectures": [LLAMA_ARCHITECTURE], "model_type": LLAMA_MODEL_TYPE}
    for key, value in cfg.items():
        if key in _EXAONE_ONLY_KEYS:
            continue
        new_key = _CONFIG_RENAMES.get(key, key)
        if new_key in out and out[new_key] != value:
            raise ModelLayoutError(f"{where}: both {key!r} and {new_key!r} are set, with different values")
        out[new_key] = copy.deepcopy(value)
    out["rope_parameters"] = _rope_parameters_from_exaone(cfg, where)
    # EXAONE-3.5 projections carry no bias; say so explicitly rather than rely on Llama's defaults.
    out["attention_bias"] = False
    out["mlp_bias"] = False
    validate_llama_config(out, where)
    return out


def validate_llama_config(llama_config: Mapping[str, Any], where: str = "config.json") -> None:
    """Build a `LlamaConfig` from the dict and check transformers keeps the rope settings intact
    (dropping llama3 factors or rope_theta would silently change every logit)."""
    from transformers import LlamaConfig

    kwargs = {k: v for k, v in llama_config.items() if k not in ("architectures", "model_type", "transformers_version")}
    try:
        cfg = LlamaConfig(**kwargs)
    except Exception as e:  # transformers' strict validation: one line naming the problem
        raise ModelLayoutError(f"{where}: not a valid Llama config ({type(e).__name__}: {e})") from None
    want = dict(llama_config.get("rope_parameters") or {})
    got = dict(cfg.rope_parameters or {})
    lost = {k: v for k, v in want.items() if got.get(k) != v}
    if lost:
        raise ModelLayoutError(f"{where}: LlamaConfig did not keep rope settings {lost} (kept {got})")


def llama_config_to_exaone(
    llama_config: Mapping[str, Any],
    reference: Mapping[str, Any] | None = None,
    where: str = "config.json",
    code_repo: str = DEFAULT_EXAONE_CODE_REPO,
) -> dict[str, Any]:
    """Map a Llama config.json dict back to EXAONE-3.5's layout.

    `reference` is the original EXAONE config (recorded by the forward conversion): its key order and
    EXAONE-only values (auto_map, embed_dropout) are kept and every shared value is taken from
    `llama_config`. auto_map entries are qualified as ``<code_repo>--module.Class`` because the
    modeling code itself is never downloaded: `trust_remote_code` users then fetch it from that repo.
    """
    cfg = dict(llama_config)
    if detect_layout(cfg, where) != LLAMA_MODEL_TYPE:
        raise ModelLayoutError(f"{where}: expected a Llama config (model_type 'llama'), got model_type 'exaone'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ModelLayoutError(f"{where}: {flag} is true, but EXAONE-3.5 has no biases; cannot export")
    if cfg.get("pretraining_tp", 1) not in (None, 1):
        raise ModelLayoutError(f"{where}: pretraining_tp={cfg['pretraining_tp']} has no EXAONE equivalent")
    if reference is not None:
        out: dict[str, Any] = copy.deepcopy(dict(reference))
    else:
        out = {
            "architectures": [EXAONE_ARCHITECTURE],
            "auto_map": {
                "AutoConfig": "configuration_exaone.ExaoneConfig",
                "AutoModelForCausalLM": "modeling_exaone.ExaoneForCausalLM",
            },
            "embed_dropout": 0.0,
        }
    if isinstance(out.get("auto_map"), Mapping):
        out["auto_map"] = {k: v if not isinstance(v, str) or "--" in v else f"{code_repo}--{v}"
                           for k, v in out["auto_map"].items()}
    out["model_type"] = EXAONE_MODEL_TYPE
    out.setdefault("architectures", [EXAONE_ARCHITECTURE])
    # A transformers-5 era EXAONE config may spell torch_dtype as dtype; keep the reference's spelling.
    keep_dtype = reference is not None and "dtype" in reference and "torch_dtype" not in reference
    for key, value in cfg.items():
        if key in _LLAMA_ONLY_KEYS:
            continue
        exaone_key = "dtype" if (key == "dtype" and keep_dtype) else _CONFIG_RENAMES_BACK.get(key, key)
        out[exaone_key] = copy.deepcopy(value)

    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        if "rope_theta" not in cfg:
            raise ModelLayoutError(f"{where}: no rope_parameters and no rope_theta")
        rope = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
        rope["rope_theta"] = cfg["rope_theta"]
    if reference is not None and isinstance(reference.get("rope_parameters"), Mapping):
        out["rope_parameters"] = rope  # the source used the new form; keep it
    else:
        out["rope_theta"] = rope.pop("rope_theta")
        out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return out
