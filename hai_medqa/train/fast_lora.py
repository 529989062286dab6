"""Faster LoRA layers for training: the same mathematics as PEFT's, fewer and cheaper kernels.

Profiling a QLoRA step of the EXAONE-3.5-7.8B shape on an H100 (bench/profile_qlora_step.py,
docs/performance.md) showed a quarter of the GPU time outside the model's own matrix products, all of it
in PEFT's LoRA wrapper: per projection it clones the base output, casts the activations to the fp32 LoRA
weights (a full-width copy, kept for backward), runs the two small GEMMs in fp32, multiplies the
full-width output by the scale, casts it back and adds it.

`fuse_lora_forward` rebinds the forward of every plain LoRA layer (no DoRA or other variant, one active
adapter) to

    y = base(x) + scale * (dropout(x) @ A^T) @ B^T

computed in the activations' dtype (bf16 on the GPU) from the fp32 master weights - what autocast does -
with the scale and the addition folded into one `addmm`. The adapter's parameters, names, state dict and
saved format are untouched, so checkpoints, resume and `PeftModel.from_pretrained` work as before.
Anything unusual (merged weights, disabled adapters, several adapters, mixed-batch inference, DoRA,
LoRA bias) falls back to PEFT's own forward.

`cache_dequantized_weights` is the second, memory-for-speed option: every frozen NF4 weight is
dequantised once to the compute dtype and kept, so forward, recomputation and backward stop
dequantising it again each micro-step. bitsandbytes' own training forward multiplies by exactly this
dequantised matrix, so the result is the QLoRA forward, bit for bit; it costs about 2 bytes per base
parameter of GPU memory (about 14 GiB for the 7.8B), so only profiles for large GPUs use it.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger

_ORIGINAL_FORWARD = "_hai_peft_forward"


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if (kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in getattr(self, "lora_variant", {})
            or getattr(self, "lora_bias", {}).get(active[0], False)):
        return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    lora_a = self.lora_A[name].weight.to(dtype)  # small (r x in): casting the weight, not the activations
    lora_b = self.lora_B[name].weight.to(dtype)
    hidden = F.linear(self.lora_dropout[name](x).to(dtype), lora_a)
    out_features = result.shape[-1]
    fused = torch.addmm(result.reshape(-1, out_features), hidden.reshape(-1, hidden.shape[-1]), lora_b.t(),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


def fuse_lora_forward(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA linear layer in `model` the fused forward; return how many were changed."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and not hasattr(module, _ORIGINAL_FORWARD):
            if not isinstance(module.get_base_layer(), torch.nn.Linear) and "Linear4bit" not in type(
                    module.get_base_layer()).__name__:
                continue  # embeddings, convolutions: keep PEFT's forward
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def unfuse_lora_forward(model: torch.nn.Module) -> int:
    """Undo `fuse_lora_forward` (e.g. before handing the model to other code)."""
    n = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL_FORWARD):
            module.forward = getattr(module, _ORIGINAL_FORWARD)
            delattr(module, _ORIGINAL_FORWARD)
            n += 1
    return n


class _DequantizedLinear(torch.nn.Module):
    """Stands in for a frozen bitsandbytes Linear4bit with its weight dequantised once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def cache_dequantized_weights(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Dequantise every bitsandbytes 4-bit linear once and compute with the cached matrix from now on.

    The 4-bit module stays in the model (its state, `quant_state` and PEFT's wrapper are unchanged);
    only its forward is rebound. Returns the number of layers cached.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    n, nbytes = 0, 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not hasattr(module, "_hai_dequantized"):
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
            bias = None if module.bias is None else module.bias.data.to(dtype)
            cached = _DequantizedLinear(weight, bias)
            module._hai_dequantized = cached  # registered as a child: moves with .to()
            module.forward = cached.forward
            n += 1
            nbytes += weight.numel() * weight.element_size()
    if n:
        logger.info(f"cached {n} dequantised NF4 weights in {str(dtype).replace('torch.', '')} "
                    f"({nbytes / 2**30:.2f} GiB): no per-step dequantisation")
    return n
