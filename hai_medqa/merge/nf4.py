"""The NF4 round trip QLoRA training applies to a base weight, reproduced outside the model.

During QLoRA training every linear layer except lm_head holds its weight as bitsandbytes NF4 and
the forward uses `dequantize_4bit(W_nf4)`. Merging into that dequantised weight (instead of the
original bf16 one) gives a model whose forward equals the training-time forward up to float
rounding. The settings must be those the trainer loaded the model with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hai_medqa.model.exaone_layout import LLAMA_PROJECTION_WEIGHTS

# Module names transformers quantises when loading Llama in 4-bit: every nn.Linear except the output
# embedding (transformers.quantizers.base.get_keys_to_not_convert keeps lm_head in full precision).
QUANTIZED_LINEAR_SUFFIXES = LLAMA_PROJECTION_WEIGHTS


@dataclass(frozen=True)
class NF4Settings:
    """bitsandbytes 4-bit settings (use `from_project()` for the ones training used)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    # dtype the trainer loaded the weights in before quantising them (None: as stored)
    weight_dtype: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_project(cls) -> NF4Settings:
        """The settings the project's trainer loads the base with (`hai_medqa.model.load.bnb_4bit_config`,
        the one place they are defined); blocksize is bitsandbytes' default for Params4bit."""
        from hai_medqa.model.load import bnb_4bit_config

        cfg = bnb_4bit_config()
        return cls(quant_type=cfg.bnb_4bit_quant_type, double_quant=bool(cfg.bnb_4bit_use_double_quant))


def is_quantized_in_training(llama_weight_name: str) -> bool:
    """True for the weights transformers stores in 4-bit during QLoRA (the seven decoder projections)."""
    return llama_weight_name.startswith("model.layers.") and llama_weight_name.endswith(QUANTIZED_LINEAR_SUFFIXES)


def nf4_roundtrip(weight: torch.Tensor, settings: NF4Settings = NF4Settings()) -> torch.Tensor:
    """Quantise `weight` exactly as bitsandbytes' Params4bit does on load, then dequantise it.

    Returns a tensor of the input's dtype; bitwise equal to `dequantize_4bit` of the weight a
    4-bit-loaded model holds (checked by tests/test_merge.py against a real 4-bit load).
    """
    import bitsandbytes.functional as bnbf

    source = weight.to(getattr(torch, settings.weight_dtype)) if settings.weight_dtype else weight
    packed, state = bnbf.quantize_4bit(
        source.contiguous(),
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.quant_type,
    )
    out = bnbf.dequantize_4bit(packed, state)
    return out.to(weight.dtype).reshape(weight.shape)
