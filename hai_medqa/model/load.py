"""Loading tokenizers and models the same way in every stage, without remote code.

`load_causal_lm` always ends in transformers' own Llama classes: an EXAONE-layout folder is converted
first (cached; see `convert.ensure_llama_checkpoint`), so no downloaded Python ever runs and every
Llama fast path (SDPA/flash attention, fused kernels) applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from hai_medqa.model.convert import ensure_llama_checkpoint
from hai_medqa.model.exaone_layout import LLAMA_MODEL_TYPE, ModelLayoutError


def load_tokenizer(path: str | Path, **kwargs: Any):
    """Load the tokenizer of a checkpoint folder (EXAONE or Llama layout) without trust_remote_code.

    Two transformers-5 traps are avoided. AutoTokenizer reads config.json first and, on an EXAONE
    folder (model_type "exaone" + auto_map), demands remote code. And resolving ``tokenizer_class``
    (EXAONE names GPT2Tokenizer) rebuilds the pipeline from that class's recipe, silently replacing
    the pre-tokenizer stored in tokenizer.json. So when tokenizer.json exists it is loaded verbatim
    as a fast tokenizer (special tokens and chat template still come from tokenizer_config.json);
    only folders without it fall back to the class named in tokenizer_config.json.
    Warns when padding would reuse the EOS token.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    folder = Path(path).expanduser()
    cfg_path = folder / "tokenizer_config.json"
    if not folder.is_dir():
        raise ModelLayoutError(f"{folder}: not a folder")
    if not cfg_path.is_file() and not (folder / "tokenizer.json").is_file():
        raise ModelLayoutError(f"{folder}: no tokenizer files (tokenizer_config.json / tokenizer.json)")
    cls = PreTrainedTokenizerFast
    if not (folder / "tokenizer.json").is_file():
        try:
            class_name = json.loads(cfg_path.read_text(encoding="utf-8")).get("tokenizer_class")
        except json.JSONDecodeError as e:
            raise ModelLayoutError(f"{cfg_path}: not valid JSON ({e})") from None
        resolved = tokenizer_class_from_name(class_name) if class_name else None
        if resolved is None:
            raise ModelLayoutError(f"{folder}: no tokenizer.json and tokenizer_class {class_name!r} is unknown "
                                   "(custom tokenizer code is never run)")
        cls = resolved
    kwargs.setdefault("trust_remote_code", False)
    tokenizer = cls.from_pretrained(str(folder), **kwargs)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        logger.warning(f"{folder}: pad token is {tokenizer.pad_token!r} (eos {tokenizer.eos_token!r}); "
                       "training needs a pad token distinct from EOS")
    return tokenizer


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name such as "bfloat16" (or a dtype, returned as is)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ModelLayoutError(f"unknown dtype {dtype!r} (use e.g. bfloat16, float16, float32)")
    return value


def bnb_4bit_config(compute_dtype: str | torch.dtype = torch.bfloat16, quant_storage: str | torch.dtype | None = None):
    """The QLoRA quantisation used everywhere: NF4, double quantisation, given compute dtype.

    `quant_storage` is the dtype the packed 4-bit values are stored in (None: bitsandbytes' uint8).
    FSDP needs a floating-point storage equal to the model's dtype so it can shard the weights
    (FSDP-QLoRA); the bits and the maths are unchanged.
    """
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": as_dtype(quant_storage)} if quant_storage is not None else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=as_dtype(compute_dtype),
        **extra,
    )


def load_causal_lm(
    path: str | Path,
    *,
    quantize_4bit: bool = False,
    dtype: str | torch.dtype = torch.bfloat16,
    device_map: str | dict | None = None,
    attn_implementation: str | None = "sdpa",
    quant_storage: str | torch.dtype | None = None,
):
    """Load a causal LM from a local checkpoint folder as a native transformers Llama model.

    An EXAONE-layout folder is converted to Llama layout first (cached). `quantize_4bit` loads the
    linear layers in bitsandbytes NF4 (QLoRA); `dtype` is the compute/storage dtype of the rest.
    `quant_storage`: storage dtype of the packed 4-bit weights (see `bnb_4bit_config`).
    Only safetensors are read and remote code is never trusted.
    """
    from transformers import AutoModelForCausalLM

    folder = ensure_llama_checkpoint(path)
    torch_dtype = as_dtype(dtype)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": False,
        "use_safetensors": True,
    }
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(torch_dtype, quant_storage)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if model.config.model_type != LLAMA_MODEL_TYPE:
        logger.warning(f"{folder}: loaded model_type {model.config.model_type!r}, not 'llama'")
    return model
