"""Choosing the compute path: attention implementation, Liger kernels, compute dtype, optimizer.

Every choice has a plain fallback that works everywhere (sdpa, no Liger, torch AdamW on CPU) and
every fallback is logged, so a run never silently differs from what the config asked for without
saying so.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from loguru import logger

from hai_medqa.config import ConfigError

# Attention implementations whose per-sample isolation under packed position_ids is proven by the
# test suite (tests/test_packing.py) on every device; others are checked at start-up.
PACKING_PROVEN = ("sdpa", "eager")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto -> bfloat16 on a GPU that supports it, float32 otherwise (CPU bf16 matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_quant_storage(setting: str, compute_dtype: torch.dtype, *, fsdp: bool) -> torch.dtype | None:
    """Storage dtype of the packed 4-bit weights: None (bitsandbytes' uint8) unless FSDP must shard them.

    auto: the compute dtype under FSDP (FSDP shards only floating-point tensors, and a wrapped layer's
    tensors must share one dtype), else None. Under FSDP an explicit storage must equal the compute dtype.
    """
    if setting == "auto":
        return compute_dtype if fsdp else None
    dtype = getattr(torch, setting)
    if fsdp and dtype != compute_dtype:
        raise ConfigError(f"quant_storage {setting} differs from the compute dtype {str(compute_dtype).replace('torch.', '')}; "
                          "under FSDP they must match (use quant_storage: auto)")
    return None if dtype == torch.uint8 else dtype


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """The attention implementation to load the model with.

    auto: flash_attention_2 when the flash-attn package is installed on a GPU (it turns packed
    position_ids into variable-length offsets), else sdpa. GPU-only choices fall back to sdpa on CPU.
    """
    has_fa2 = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if (device.type == "cuda" and has_fa2) else "sdpa"
    if requested in ("flash_attention_2", "flex_attention") and device.type != "cuda":
        logger.info(f"attn_implementation {requested} needs a CUDA GPU; using sdpa on {device.type}")
        return "sdpa"
    if requested == "flash_attention_2" and not has_fa2:
        raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package; "
                          "install it or use sdpa / flex_attention / auto")
    return requested


def packing_isolation_error(attn_implementation: str, device: torch.device, dtype: torch.dtype = torch.float32,
                            seed: int = 0) -> float:
    """Max |logit difference| between samples packed in one row and the same samples run alone.

    Uses a small random Llama with the EXAONE head_dim (128) and the project's packing convention
    (position_ids restarting per sample, no attention_mask, use_cache=False). ~0 means the
    implementation builds per-sample attention; a large value means samples see each other.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    gen = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=128, vocab_size=512)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(attn_implementation)
    lens = [37, 80, 13, 55]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(device) for n in lens]
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], position_ids=torch.cat([torch.arange(n) for n in lens])[None].to(device),
                       use_cache=False).logits[0].float()
        err, off = 0.0, 0
        for n, s in zip(lens, seqs, strict=True):
            alone = model(s[None], use_cache=False).logits[0].float()
            err = max(err, (packed[off:off + n] - alone).abs().max().item())
            off += n
    return err


def check_packing_isolation(attn_implementation: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse to train packed rows with an attention implementation that lets samples see each other."""
    if attn_implementation in PACKING_PROVEN:
        return
    try:
        err = packing_isolation_error(attn_implementation, device, dtype)
    except Exception as e:  # e.g. a kernel that cannot compile at the probe's shape
        logger.warning(f"could not verify packed attention isolation for {attn_implementation}: "
                       f"{type(e).__name__}: {str(e)[:200]}")
        return
    tol = 1e-3 if dtype == torch.float32 else 0.1  # bf16 kernels differ from the unpacked run by rounding
    if err > tol:
        raise ConfigError(
            f"attn_implementation {attn_implementation} does not isolate packed samples here (max logit "
            f"difference {err:.3g}); use batching: padded or attn_implementation: sdpa"
        )
    logger.info(f"packed attention isolation verified for {attn_implementation} (max logit difference {err:.2e})")


def keep_cpu_4bit_layout_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode without grad (an evaluation)
    rewrites its weight into a layout served by ``gemv_4bit``, which has no backward: training after
    that evaluation silently loses the gradient through every frozen layer. Returns the number of
    layers switched.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def maybe_apply_liger(model: Any, setting: bool | str, device: torch.device, *, layer_kernels: bool = True) -> bool:
    """Patch a Llama model with Liger kernels (RoPE, RMSNorm, SwiGLU, fused linear+cross-entropy).

    ``auto`` applies them when the liger-kernel package is installed and the model is on a GPU;
    ``true`` insists (ConfigError when impossible); ``false`` never. Returns whether they were applied.
    `layer_kernels` False keeps only the fused linear + cross-entropy (outside the decoder layers): with
    compiled layers inductor generates RoPE, RMSNorm and SwiGLU fused with their neighbours, which
    Liger's opaque autograd Functions would prevent (compile_regions.py).
    """
    if setting is False:
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        if setting is True:
            raise ConfigError("liger_kernel: true but the liger-kernel package is not installed")
        return False
    if device.type != "cuda":
        if setting is True:
            logger.warning("liger_kernel needs a CUDA GPU; training on the plain path")
        return False
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=layer_kernels, rms_norm=layer_kernels, swiglu=layer_kernels, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)
    logger.info("Liger kernels applied (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)" if layer_kernels else
                "Liger kernels applied (fused linear cross-entropy; RoPE, RMSNorm and SwiGLU are left to the "
                "compiled layers)")
    return True


def repage_loaded_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """After `optimizer.load_state_dict`: put the states bitsandbytes' paged optimizers keep in CUDA
    managed memory back there; return how many were moved (or unmarked, off CUDA).

    bitsandbytes marks such a state with a Python attribute (`is_paged`), and torch.save/torch.load
    keep a tensor's attributes, so a loaded state claims to be paged while it lives in ordinary device
    memory; the first step after --resume then prefetches it and fails ("Error invalid argument at line
    578 in file /src/csrc/pythonInterface.cpp", then a crash: H200, 2026-11-30). A no-op for any other
    optimizer. Example: a loaded PagedAdamW8bit state1 (plain CUDA tensor, is_paged=True) -> a managed
    copy (is_paged=True); on the CPU -> the same tensor without the mark.
    """
    moved = 0
    for state in optimizer.state.values():
        for key, value in list(state.items()):
            if not (isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)):
                continue
            if value.is_cuda:
                import bitsandbytes.functional as bnb_functional

                paged = bnb_functional.get_paged(*value.shape, dtype=value.dtype, device=value.device)
                paged.copy_(value)
                optimizer.page_mng.paged_tensors.append(paged)
                state[key] = paged
            else:  # paging exists only on CUDA; bitsandbytes treats an unmarked tensor as a plain state
                del value.is_paged
                value.__dict__.pop("page_deviceid", None)
            moved += 1
    return moved


def build_optimizer(params: list[torch.nn.Parameter], cfg: Any, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The configured optimizer and its actual name (after any CPU fallback)."""
    kwargs = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "weight_decay": cfg.weight_decay}
    if cfg.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if cfg.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            return cls(params, **kwargs), cfg.optimizer
        except Exception as e:
            if device.type == "cuda":
                raise
            logger.warning(f"{cfg.optimizer} is not available on {device.type} ({type(e).__name__}: {e}); "
                           "using torch AdamW")
    return torch.optim.AdamW(params, **kwargs), "adamw_torch"
