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

`lora_kernel: fused_nf4` (opt-in) goes one step further for NF4 base layers: the base product and the
LoRA addition run inside one custom operator (`nf4_lora_linear`), which adds the LoRA term into the base
output in place. The `addmm` above cannot: it writes a new tensor, so it first copies the whole base output
into it, a device-to-device copy of tokens x out_features per projection. At the 7.8B shape with 8,192
tokens that is 43,008 output features x 8,192 x 2 bytes x 32 layers = 21 GiB per forward (computed), about
what the H200 profiles measured as device-to-device copies: 10.5 ms per step for `fast`, 20.8 ms for
`lean`, which runs the forward twice. torch.compile keeps that copy too (inductor calls addmm with a new
output buffer). Inside an operator the compiler treats as opaque, the addition accumulates into the tensor
bitsandbytes just made. The forward is the same arithmetic (bitwise, tested); the backward computes the
same products as bitsandbytes' and autograd's formulas, but the input gradient's contributions may be
summed in another order (tested to rounding).

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


def _plain_adapter(self: Any, kwargs: dict) -> str | None:
    """The one active adapter's name when the layer is plain LoRA (no per-sample adapters, no DoRA or other
    variant, no LoRA bias, not merged or disabled); None when PEFT's own forward must run."""
    active = self.active_adapters
    if (kwargs.get("adapter_names") is not None or self.disable_adapters or self.merged or len(active) != 1
            or active[0] not in self.lora_A or active[0] in getattr(self, "lora_variant", {})
            or getattr(self, "lora_bias", {}).get(active[0], False)):
        return None
    return active[0]


def _lora_input_and_b(self: Any, name: str, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``dropout(x) @ A^T`` and B, in `dtype`: the small weights are cast, not the activations."""
    lora_a = self.lora_A[name].weight.to(dtype)
    lora_b = self.lora_B[name].weight.to(dtype)
    return F.linear(self.lora_dropout[name](x).to(dtype), lora_a), lora_b


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain_adapter(self, kwargs)
    if name is None:
        return getattr(self, _ORIGINAL_FORWARD)(x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    hidden, lora_b = _lora_input_and_b(self, name, x, result.dtype)
    out_features = result.shape[-1]
    fused = torch.addmm(result.reshape(-1, out_features), hidden.reshape(-1, hidden.shape[-1]), lora_b.t(),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


@torch.library.custom_op("hai_medqa::nf4_lora_linear", mutates_args=())
def nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, shape: list[int], absmax: torch.Tensor, blocksize: int,
                    quant_type: str, dtype: torch.dtype, state2_absmax: torch.Tensor | None,
                    state2_code: torch.Tensor | None, state2_blocksize: int, offset: torch.Tensor | None,
                    hidden: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``base(x) + scale * hidden @ lora_b^T`` with the NF4 base product made by bitsandbytes' ``gemm_4bit``
    (exactly as its ``MatMul4Bit`` does) and the LoRA term added into that output in place (no copy).

    `packed`, `shape` ... `offset`: the frozen weight's 4-bit storage and its `QuantState` as tensors and
    numbers (`state2_*` and `offset` set when the absmax is itself quantised, else None); `hidden`: the
    LoRA input projection ``dropout(x) @ A^T`` in x's dtype; `lora_b`: B in x's dtype.
    Shapes: x (..., in), hidden (..., r), lora_b (out, r) -> (..., out).
    """
    if state2_absmax is None:
        y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, shape, absmax, blocksize, quant_type)
    else:
        y = torch.ops.bitsandbytes.gemm_4bit.default(x, packed, shape, state2_absmax, blocksize, quant_type,
                                                     absmax_8bit=absmax, absmax_code=state2_code,
                                                     absmax_offset=offset)
    y.view(-1, y.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), lora_b.t(), alpha=scale)
    return y


@nf4_lora_linear.register_fake
def _(x, packed, shape, absmax, blocksize, quant_type, dtype, state2_absmax, state2_code, state2_blocksize, offset,
      hidden, lora_b, scale):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _nf4_setup_context(ctx, inputs, output) -> None:
    (_, packed, shape, absmax, blocksize, quant_type, dtype, state2_absmax, state2_code, state2_blocksize, offset,
     hidden, lora_b, scale) = inputs
    ctx.save_for_backward(packed, absmax, state2_absmax, state2_code, offset, hidden, lora_b)
    ctx.shape, ctx.blocksize, ctx.quant_type, ctx.dtype = shape, blocksize, quant_type, dtype
    ctx.state2_blocksize, ctx.scale = state2_blocksize, scale


def _nf4_backward(ctx, grad: torch.Tensor):
    """The gradients bitsandbytes' MatMul4Bit (input) and aten's addmm (hidden, lora_b) compute."""
    import bitsandbytes.functional as bnbf

    packed, absmax, state2_absmax, state2_code, offset, hidden, lora_b = ctx.saved_tensors
    grad_x = grad_hidden = grad_b = None
    if ctx.needs_input_grad[0]:
        state2 = None if state2_absmax is None else bnbf.QuantState(
            absmax=state2_absmax, code=state2_code, blocksize=ctx.state2_blocksize, dtype=torch.float32)
        state = bnbf.QuantState(absmax=absmax, shape=torch.Size(ctx.shape), blocksize=ctx.blocksize,
                                quant_type=ctx.quant_type, dtype=ctx.dtype, offset=offset, state2=state2)
        grad_x = torch.matmul(grad, bnbf.dequantize_4bit(packed, state).to(grad.dtype))
    grad2d = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[11]:  # addmm's mat1: grad @ mat2^T, times alpha
        grad_hidden = (grad2d.mm(lora_b) * ctx.scale).view(hidden.shape)
    if ctx.needs_input_grad[12]:  # mat2 = lora_b^T is column-major: (grad^T @ mat1)^T, times alpha, transposed back
        grad_b = grad2d.t().mm(hidden.reshape(-1, hidden.shape[-1])) * ctx.scale
    return grad_x, None, None, None, None, None, None, None, None, None, None, grad_hidden, grad_b, None


nf4_lora_linear.register_autograd(_nf4_backward, setup_context=_nf4_setup_context)


def _nf4_operands(base: Any, x: torch.Tensor) -> tuple | None:
    """The 4-bit weight of a bitsandbytes Linear4bit as `nf4_lora_linear`'s operands, or None when the layer
    or input is anything else: a bias, a cached or FP8 weight, FSDP's float storage, no quant_state, a
    weight repacked for CPU inference, an input bitsandbytes would first cast to another compute dtype."""
    weight = getattr(base, "weight", None)
    state = getattr(weight, "quant_state", None)
    if (state is None or getattr(base, "bias", None) is not None or "Linear4bit" not in type(base).__name__
            or hasattr(base, "_hai_dequantized") or weight.dtype != torch.uint8 or len(state.shape) != 2
            or getattr(state, "packing_format_for_cpu", False) or x.shape[-1] != state.shape[1]
            or getattr(base, "compute_dtype", None) not in (None, x.dtype)):
        return None
    nested = state.state2 is not None
    return (weight.data.view(-1, 1), list(state.shape), state.absmax, state.blocksize, state.quant_type, state.dtype,
            state.state2.absmax if nested else None, state.state2.code if nested else None,
            state.state2.blocksize if nested else 0, state.offset if nested else None)


def _fused_nf4_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    operands = None if args or kwargs or not torch.is_grad_enabled() else _nf4_operands(self.get_base_layer(), x)
    name = None if operands is None else _plain_adapter(self, kwargs)
    if name is None:
        return _fused_forward(self, x, *args, **kwargs)  # inference and anything unusual: the addmm path
    hidden, lora_b = _lora_input_and_b(self, name, x, x.dtype)
    return nf4_lora_linear(x, *operands, hidden, lora_b, float(self.scaling[name]))


def fuse_lora_forward(model: torch.nn.Module, *, nf4_in_place: bool = False) -> int:
    """Give every PEFT LoRA linear layer in `model` the fused forward; return how many were changed.
    `nf4_in_place` (``lora_kernel: fused_nf4``): NF4 base layers compute through `nf4_lora_linear`."""
    from peft.tuners.lora.layer import LoraLayer

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A") and not hasattr(module, _ORIGINAL_FORWARD):
            if not isinstance(module.get_base_layer(), torch.nn.Linear) and "Linear4bit" not in type(
                    module.get_base_layer()).__name__:
                continue  # embeddings, convolutions: keep PEFT's forward
            setattr(module, _ORIGINAL_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_nf4_forward if nf4_in_place else _fused_forward, module)
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
