"""What a merged folder needs so that engines other than transformers 5 read it right.

transformers 5 keeps RoPE settings in ``rope_parameters`` only. transformers 4.x (the version
llama.cpp's converter pins), mistral.rs and other readers of a Hugging Face folder look for the
top-level ``rope_theta`` and ``rope_scaling`` keys instead: without them transformers 4.57 silently
runs rope_theta 10000 with no llama3 scaling (logits off by whole units) and mistral.rs refuses the
folder. The legacy keys are derived here from ``rope_parameters`` itself (never hard-coded), so both
generations read the same RoPE; transformers 5 reads ``rope_parameters`` first and is unchanged.

transformers 5 ``save_pretrained`` names the tokenizer class ``TokenizersBackend``, which 4.x does
not have; ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both (in 5.x it is the same
class under its old name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hai_medqa.io_utils import write_json

PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Keys transformers 5 writes into tokenizer_config.json that describe the machine it was saved on,
# not the tokenizer (a published folder should not say it was loaded from a local path).
_LOCAL_ONLY_TOKENIZER_KEYS = ("is_local", "local_files_only")


def legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``{"rope_theta": ..., "rope_scaling": ...}`` as transformers 4.x spells the RoPE settings of
    `config`, taken from its ``rope_parameters`` (transformers 5) or from existing legacy keys.

    ``rope_scaling`` is None for plain RoPE (``rope_type`` "default"), else every entry of
    ``rope_parameters`` but ``rope_theta`` (``rope_type`` and the type's factors). {} when the config
    states no RoPE at all (nothing to derive; readers use their defaults).
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        return {"rope_theta": params["rope_theta"], "rope_scaling": None if rope_type == "default" else scaling}
    if "rope_theta" in config:
        return {"rope_theta": config["rope_theta"], "rope_scaling": config.get("rope_scaling")}
    return {}


def with_legacy_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Llama `config` with ``rope_theta``/``rope_scaling`` written beside
    ``rope_parameters`` (same values), so transformers 4.x and 5.x, mistral.rs and llama.cpp's
    converter all read the same RoPE."""
    out = dict(config)
    out.update(legacy_rope_keys(config))
    return out


def make_tokenizer_config_portable(folder: str | Path) -> Path:
    """Rewrite `folder`/tokenizer_config.json so transformers 4.x loads it too: the tokenizer class
    ``PreTrainedTokenizerFast`` (reads tokenizer.json as it is in both 4.x and 5.x), explicit
    ``add_bos_token``/``add_eos_token`` false (EXAONE's template adds neither; llama.cpp and other
    converters read these flags), without transformers 5's machine-local keys. Returns the path."""
    path = Path(folder) / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in _LOCAL_ONLY_TOKENIZER_KEYS:
        data.pop(key, None)
    data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    data.setdefault("add_bos_token", False)
    data.setdefault("add_eos_token", False)
    write_json(path, data)
    return path
