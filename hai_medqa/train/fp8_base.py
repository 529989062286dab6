"""An opt-in FP8 base for LoRA training (`base_precision: fp8`): the seven frozen projections of every
decoder layer in float8 e4m3 with row-wise scales, multiplied by `torch._scaled_mm` (H100/H200 and other
GPUs of compute capability >= 8.9).

What changes against the NF4 base (QLoRA):
- **Weights.** Each projection's bf16 weight W (out x in) is read from the original checkpoint (not from
  its NF4 round trip) and stored as W_q (float8 e4m3) with one float32 scale per output channel:
  ``W ~= s_w[:, None] * W_q``, ``s_w = rowmax|W| / 448``. 1 byte per parameter (NF4: ~0.56), so the 7.8B
  base takes ~7 GiB instead of ~4.4; there is no second (transposed) copy.
- **Forward** ``Y = X W^T``: every row (token) of X is quantised to e4m3 with its own scale
  (``X ~= s_x[:, None] * X_q``) and ``Y = _scaled_mm(X_q, W_q^T, scale_a=s_x, scale_b=s_w)`` in bf16.
- **Backward.** The base is frozen, so only ``dX = dY W`` is needed. With the weight's per-output-channel
  scale folded into the gradient first, ``dX = (dY * s_w[None, :]) W_q``: the folded gradient is quantised
  row-wise (e4m3 with its own per-row scale) and multiplied by the *same* W_q as the forward, so the
  backward is the gradient of the function the forward computed (up to dY's rounding), and no second FP8
  copy with per-input-channel scales is kept. `_scaled_mm` wants its second operand column-major, which for
  ``W_q`` (out x in) means the transpose: it is made per backward call (one byte per parameter read and
  written, ~1% of a 7.8B step by bandwidth) and freed at once, instead of keeping +7 GiB for it.
- **LoRA** is untouched: the fused LoRA forward (fast_lora.py) or PEFT's adds ``scale * B A x`` in bf16 from
  the fp32 master weights on top of this layer's output. Embeddings, norms and lm_head stay bf16.

The FP8 tensors are frozen `Parameter`s whose dtype is hidden from generic code: the weight is stored as
uint8 bits and the scales as int32 bits, viewed as float8/float32 only inside the matmul, so a
``model.to(dtype)``, PEFT's dtype handling or DDP's broadcast can never cast or round them.

Inside a compiled region (torch.compile of a decoder layer, say) the layer traces as one graph: the
quantiser is plain tensor code there and `_scaled_mm` is traceable (checked by hand with
``torch.compile(layer, backend="aot_eager", fullgraph=True)`` on CPU: forward and dX bit-equal to eager).
Outside one, the quantiser alone is compiled on CUDA, so each quantisation is one fused pass.

`impl` selects how the matmul runs: ``"scaled_mm"`` (torch._scaled_mm; the training path) or ``"emulate"``
(dequantise both FP8 operands to float32 and multiply: the identical quantisation math, on any device).
The trainer runs ``"emulate"`` only when asked (``fp8_emulate: true``, to check the numerics on a machine
without FP8); otherwise on a CPU or a GPU without FP8 it refuses (`check_base_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from loguru import logger

from hai_medqa.config import ConfigError
from hai_medqa.model.exaone_layout import LLAMA_PROJECTIONS

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores
_SCALE_FLOOR = 1e-12  # an all-zero row gets a tiny scale, not 0 (0 / 0 would give NaN)

Fp8Impl = Literal["scaled_mm", "emulate"]


# ------------------------------------------------------------------------------------- quantisation
def _quantize_rows_eager(t: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t32 = t.float()
    if col_scale is not None:
        t32 = t32 * col_scale
    amax = t32.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(amax, min=_SCALE_FLOOR) / FP8_MAX
    # e4m3fn has no infinity: a value past 448 would become NaN, so clamp before the cast
    q = torch.clamp(t32 / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


_COMPILED: dict[str, Any] = {}


def quantize_rows(t: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D tensor to float8 e4m3 with one float32 scale per row: ``t ~= scale * q``.

    `col_scale` (one value per column) multiplies ``t`` first (the backward folds the weight's scales into
    dY this way). Returns (q of t's shape, scale of shape (rows, 1)). On CUDA the function is compiled once
    (one fused read of ``t``; dynamic shapes, so packed rows of any length reuse it); elsewhere eager.
    """
    if torch.compiler.is_compiling():  # inside a compiled region (e.g. a compiled decoder layer): trace it there
        return _quantize_rows_eager(t, col_scale)
    if t.is_cuda:
        t = t.detach()  # no autograd here (the callers are an autograd.Function): one guard less
        fn = _COMPILED.get("quantize")
        if fn is None:
            fn = _COMPILED["quantize"] = torch.compile(_quantize_rows_eager, dynamic=True, fullgraph=True)
        if fn is not _quantize_rows_eager:
            try:
                return fn(t, col_scale)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not stop training
                logger.warning(f"FP8 quantisation could not be compiled ({type(e).__name__}: {str(e)[:200]}); "
                               "using the eager version (slower)")
                _COMPILED["quantize"] = _quantize_rows_eager
    return _quantize_rows_eager(t, col_scale)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``scale * q`` (the inverse of `quantize_rows`, exact up to e4m3's rounding)."""
    return q.float() * scale


# --------------------------------------------------------------------------------------- the matmul
def _mm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q_t: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype,
        impl: str) -> torch.Tensor:
    """``(a_scale * a_q) @ (b_q_t * b_scale)``: a_q (M x K) row-major, b_q_t (K x N) column-major,
    a_scale (M x 1), b_scale (1 x N), float32 scales."""
    if impl == "scaled_mm":
        return torch._scaled_mm(a_q, b_q_t, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)
    if impl == "emulate":
        return ((a_q.float() * a_scale) @ (b_q_t.float() * b_scale)).to(out_dtype)
    raise ValueError(f"unknown FP8 matmul implementation {impl!r}")


class _Fp8LinearFn(torch.autograd.Function):
    """Y = X W^T with X quantised per row and W per output channel; dX = (dY * s_w) W_q, also in FP8."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_bits: torch.Tensor, scale_bits: torch.Tensor, impl: str) -> torch.Tensor:
        w_q = w_bits.view(FP8_DTYPE)
        w_scale = scale_bits.view(torch.float32)
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_rows(x2)
        y = _mm(x_q, x_scale, w_q.t(), w_scale.view(1, -1), x.dtype, impl)
        ctx.save_for_backward(w_bits, scale_bits)  # references to the frozen weight: no copy
        ctx.impl = impl
        return y.view(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w_bits, scale_bits = ctx.saved_tensors
        w_q = w_bits.view(FP8_DTYPE)
        w_scale = scale_bits.view(torch.float32)
        dy2 = dy.reshape(-1, dy.shape[-1])
        g_q, g_scale = quantize_rows(dy2, col_scale=w_scale)
        w_q_t = w_bits.t().contiguous().view(FP8_DTYPE)  # (in x out) row-major: W_q as a column-major operand
        ones = torch.ones(1, w_q.shape[1], dtype=torch.float32, device=dy.device)
        dx = _mm(g_q, g_scale, w_q_t.t(), ones, dy.dtype, ctx.impl)
        return dx.view(*dy.shape[:-1], w_q.shape[1]), None, None, None


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, float32 per-output-channel scale of shape (out,)) of a (out x in) weight."""
    q, scale = _quantize_rows_eager(weight)
    return q, scale.view(-1)


class Fp8BaseLinear(torch.nn.Module):
    """A frozen linear layer y = x W^T (+ bias) with W in float8 e4m3 and per-output-channel scales.

    The weight is a frozen uint8 Parameter (the float8 bits) and the scale a frozen int32 Parameter (the
    float32 bits): no generic dtype cast can touch them, DDP treats them as ordinary frozen parameters.
    """

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 impl: Fp8Impl = "scaled_mm"):
        super().__init__()
        if weight_q.dtype != FP8_DTYPE or scale.dtype != torch.float32 or scale.shape != (weight_q.shape[0],):
            raise ValueError("Fp8BaseLinear needs a float8_e4m3fn (out x in) weight and a float32 (out,) scale")
        self.out_features, self.in_features = weight_q.shape
        self.weight_fp8 = torch.nn.Parameter(weight_q.contiguous().view(torch.uint8), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale.contiguous().view(torch.int32), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, device: torch.device | str | None = None,
                    impl: Fp8Impl = "scaled_mm") -> Fp8BaseLinear:
        """Quantise `linear`'s weight on `device` (default: where it is)."""
        w = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        q, scale = quantize_weight(w)
        bias = None if linear.bias is None else linear.bias.detach().to(w.device)
        return cls(q, scale, bias, impl)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``s_w[:, None] * W_q`` (what the forward multiplies by)."""
        return dequantize_rows(self.weight_fp8.view(FP8_DTYPE), self.weight_scale.view(torch.float32).view(-1, 1))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = _Fp8LinearFn.apply(x, self.weight_fp8, self.weight_scale, self.impl)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn, impl={self.impl}"


# ------------------------------------------------------------------------------- the whole model
@dataclass(frozen=True)
class Fp8Conversion:
    """What `convert_base_to_fp8` did."""

    layers: int
    """Projections replaced."""
    weight_bytes: int
    """Bytes of FP8 weights and scales."""
    param_names: tuple[str, ...]
    """Names (from the converted model) of the FP8 parameters: frozen, identical on every process."""


def _is_projection(parent_name: str, child_name: str) -> bool:
    if child_name in LLAMA_PROJECTIONS:
        return True
    # PEFT keeps the original layer as `base_layer` inside the LoRA layer named after the projection
    return child_name == "base_layer" and parent_name.rsplit(".", 1)[-1] in LLAMA_PROJECTIONS


def convert_base_to_fp8(model: torch.nn.Module, device: torch.device | str, *, impl: Fp8Impl = "scaled_mm",
                        ) -> Fp8Conversion:
    """Replace every decoder projection's plain `nn.Linear` (bare, or PEFT's `base_layer`) by an
    `Fp8BaseLinear` on `device`, quantised from its current weight; lm_head, embeddings and LoRA's own
    layers are left alone. Weights are quantised one at a time on `device`, so a model held on the CPU in
    bf16 never needs its bf16 copy on the GPU. Run it after `get_peft_model` (LoRA's weights then take
    their device and dtype from a bf16 base, never from an FP8 one) and after `fuse_lora_forward`."""
    replaced: list[tuple[str, Fp8BaseLinear]] = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and _is_projection(parent_name, child_name):
                fp8 = Fp8BaseLinear.from_linear(child, device, impl)
                setattr(parent, child_name, fp8)
                child.weight = None  # free the bf16 copy now (the model may sit on the CPU in bf16)
                replaced.append((f"{parent_name}.{child_name}" if parent_name else child_name, fp8))
    if not replaced:
        raise ConfigError("base_precision fp8: the model has no Llama projection (q/k/v/o/gate/up/down_proj) to convert")
    if torch.device(device).type == "cuda":
        # compile both quantiser variants here, on the main thread, not first inside autograd's backward thread
        probe = torch.randn(16, 32, device=device, dtype=torch.bfloat16)
        quantize_rows(probe)
        quantize_rows(probe, col_scale=torch.ones(32, device=device))
    names = tuple(f"{prefix}.{p}" for prefix, m in replaced for p, _ in m.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for _, m in replaced for p in m.parameters())
    # DDP would broadcast these 7+ GB from rank 0 at wrapping; every rank quantised the same checkpoint
    # with the same code, so they are equal already (DDP reads this attribute of the module it wraps).
    ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(ignore | set(names))
    logger.info(f"FP8 base: {len(replaced)} projections in float8 e4m3 with per-output-channel scales "
                f"({nbytes / 2**30:.2f} GiB, matmuls: {impl})")
    return Fp8Conversion(layers=len(replaced), weight_bytes=int(nbytes), param_names=names)


# ------------------------------------------------------------------------------------- refusal
def fp8_support_problem(device_type: str, device_name: str | None, capability: tuple[int, int] | None,
                        rowwise_error: str | None = None) -> str | None:
    """Why `base_precision: fp8` cannot train on this device (one line), or None when it can.

    Pure: the caller supplies the facts (`device_facts`), so every refusal is testable without a GPU.
    `rowwise_error` is the error of a tiny row-wise-scaled `torch._scaled_mm` on the device (None = it ran).
    """
    if device_type != "cuda":
        return (f"base_precision fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: H100, H200, L40S, RTX 4090); this run is on "
                f"{device_type}. Use base_precision: nf4")
    cap = "unknown" if capability is None else f"{capability[0]}.{capability[1]}"
    if capability is None or tuple(capability) < MIN_CAPABILITY:
        return (f"base_precision fp8 needs FP8 tensor cores (compute capability >= {MIN_CAPABILITY[0]}."
                f"{MIN_CAPABILITY[1]}); {device_name or 'this GPU'} has compute capability {cap}. "
                "Use base_precision: nf4")
    if rowwise_error is not None:
        return (f"base_precision fp8: torch {torch.__version__} cannot run a row-wise scaled FP8 matmul "
                f"(torch._scaled_mm) on {device_name or 'this GPU'} (compute capability {cap}): "
                f"{rowwise_error.splitlines()[0][:200] if rowwise_error else 'unknown error'}. Use base_precision: nf4")
    return None


def probe_rowwise_scaled_mm(device: torch.device) -> str | None:
    """Run one tiny row-wise-scaled `torch._scaled_mm` on `device`; its error message, or None."""
    if not hasattr(torch, "_scaled_mm"):
        return "torch has no _scaled_mm"
    try:
        x = torch.randn(16, 32, device=device)
        w = torch.randn(16, 32, device=device)
        xq, xs = _quantize_rows_eager(x)
        wq, ws = quantize_weight(w)
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)
        ref = x @ w.t()
        err = float((y.float() - ref).norm() / ref.norm())
        if not err < 0.1:
            return f"row-wise scaled result off by {err:.3g} (relative)"
    except Exception as e:  # noqa: BLE001 - any failure means: not available here
        return f"{type(e).__name__}: {e}"
    return None


def device_facts(device: torch.device) -> dict[str, Any]:
    """(device_type, device_name, capability, rowwise_error) of `device`, for `fp8_support_problem`."""
    if device.type != "cuda":
        return {"device_type": device.type, "device_name": None, "capability": None, "rowwise_error": None}
    capability = tuple(torch.cuda.get_device_capability(device))
    facts = {"device_type": "cuda", "device_name": torch.cuda.get_device_name(device), "capability": capability,
             "rowwise_error": None}
    if capability >= MIN_CAPABILITY:
        facts["rowwise_error"] = probe_rowwise_scaled_mm(device)
    return facts


def check_base_precision(cfg: Any, device: torch.device) -> None:
    """ConfigError (one line naming the GPU and its compute capability) when `cfg.base_precision` is fp8
    and this device cannot run it; nothing for nf4 or an emulated FP8 base (`fp8_emulate`, any device).
    Called before any weight is loaded."""
    if getattr(cfg, "base_precision", "nf4") != "fp8" or getattr(cfg, "fp8_emulate", False):
        return
    problem = fp8_support_problem(**device_facts(device))
    if problem:
        raise ConfigError(problem)
