"""The model a run trains: the 4-bit base with LoRA on the chosen kernels, and its optimizer.

    built = build_model(cfg, model_path, runtime, resume_from=run_dir_or_None)
    optimizer, scheduler, name = build_optimizer(built.model, cfg, runtime, warmup_steps=w, total_steps=n)

`build_model` loads the Llama-layout folder quantised to NF4 (bitsandbytes), picks the compute path
(backends.py: dtype, attention, Liger), turns on activation checkpointing, adds LoRA to the configured
projections (the fused LoRA forward and the dequantised-weight cache of fast_lora.py if asked; with
``offload_activations`` the checkpointed layers' saved inputs go to host memory: activation_offload.py), with
``base_precision: fp8`` swaps the seven frozen projections for FP8 ones (fp8_base.py), loads
the adapter of the checkpoint being resumed, and lets accelerate wrap the result (DDP, or FSDP with
the LoRA modules replicated: fsdp_lora.py). The LoRA initialisation is seeded with ``cfg.seed``: the same on every process and every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from hai_medqa.train import (
    activation_offload,
    backends,
    checkpoint,
    compile_regions,
    fast_lora,
    fp8_base,
    fsdp_lora,
)
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.errors import TrainingError
from hai_medqa.train.flat_optimizer import FlatOptimizer


@dataclass(frozen=True)
class BuiltModel:
    """The trainable model as accelerate prepared it, and what was chosen on the way."""

    model: Any
    """The PEFT model, wrapped by accelerate under DDP/FSDP (`accelerator.unwrap_model` undoes it)."""
    compute_dtype: torch.dtype
    attn_implementation: str
    liger_applied: bool
    trainable_params: int
    total_params: int
    memory_bytes: int
    """GPU memory the loaded model took (CPU: its footprint)."""
    compiled_layers: int = 0
    """Decoder layers running as compiled regions while training (compile_layers; compile_regions.py)."""
    fsdp_units: int | None = None
    """Under FSDP: the FSDP units (decoder layers, an untied input embedding, the root); None otherwise."""
    offloaded_layers: int = 0
    """Checkpointed decoder layers whose saved input lives in host memory (offload_activations)."""


def build_model(cfg: TrainConfig, model_path: str | Path, runtime: Any, *, resume_from: str | Path | None = None,
                ) -> BuiltModel:
    """Load the 4-bit base, add LoRA, load `resume_from`'s newest checkpoint adapter, wrap for the runtime."""
    from peft import LoraConfig, get_peft_model

    from hai_medqa.model.load import load_causal_lm

    device = runtime.device
    fp8 = cfg.base_precision == "fp8"
    fp8_base.check_base_precision(cfg, device)  # before any weight is read
    compute_dtype = backends.resolve_compute_dtype(cfg.compute_dtype, device)
    attn_implementation = backends.resolve_attn_implementation(cfg.attn_implementation, device)
    if cfg.batching == "packed":
        backends.check_packing_isolation(attn_implementation, device, compute_dtype)
    torch.manual_seed(cfg.seed)  # LoRA init: identical on every rank and every run
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    # Every rank loads the whole 4-bit model onto its GPU (transformers has no rank-0-only path for
    # quantised weights); FSDP then keeps 1/N of it per GPU.
    quant_storage = backends.resolve_quant_storage(cfg.quant_storage, compute_dtype,
                                                   fsdp=runtime.fsdp_version is not None)
    if fp8:
        # The bf16 checkpoint is read into CPU memory and each projection quantised on the GPU one at a time
        # (convert_base_to_fp8, after LoRA is added): the GPU never holds the bf16 base, so nothing of it
        # stays reserved or fragmented there. LoRA, norms, embeddings and lm_head move over afterwards.
        model = load_causal_lm(model_path, quantize_4bit=False, dtype=compute_dtype, device_map={"": "cpu"},
                               attn_implementation=attn_implementation)
    else:
        model = load_causal_lm(model_path, quantize_4bit=cfg.quantize_4bit, dtype=compute_dtype,
                               device_map=device_map, attn_implementation=attn_implementation,
                               quant_storage=quant_storage)
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else model.get_memory_footprint()
    if device.type == "cpu" and not fp8:
        backends.keep_cpu_4bit_layout_trainable(model)
    liger_applied = backends.maybe_apply_liger(model, cfg.liger_kernel, device, layer_kernels=not cfg.compile_layers)
    model.config.use_cache = False  # a cache would silently turn packing off (samples would attend across)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=cfg.checkpoint_every_n_layers)
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
    offloaded = 0
    if cfg.offload_activations:  # before compile_regions, which takes each layer's (wrapped) checkpoint function
        activation_offload.enable(model)
        offloaded = len(activation_offload.checkpointed_layers(model))
    # No prepare_model_for_kbit_training: it up-casts every frozen non-quantised weight to fp32
    # (+5 GB and slower on 7.8B). Norms and embeddings stay in the compute dtype; peft keeps the
    # LoRA weights in fp32 (autocast_adapter_dtype).
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.lora_kernel in ("fused", "fused_nf4"):
        fast_lora.fuse_lora_forward(model, nf4_in_place=cfg.lora_kernel == "fused_nf4")
    if fp8:  # after LoRA (which takes its dtype from a bf16 base) and the fused forward (which wraps nn.Linear)
        fp8_base.convert_base_to_fp8(model, device, impl="emulate" if cfg.fp8_emulate else "scaled_mm")
        model.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the per-layer bf16/fp32 temporaries of the quantisation
            model_bytes = torch.cuda.memory_allocated(device)
    elif cfg.dequantize_cache and cfg.quantize_4bit:
        fast_lora.cache_dequantized_weights(model, compute_dtype)
    model.train()  # from_pretrained returns eval mode, where checkpointing and dropout do nothing
    trainable, total = model.get_nb_trainable_parameters()
    where = (f"GPU memory {model_bytes / 2**30:.2f} GiB" if device.type == "cuda"
             else f"memory {model_bytes / 2**20:.1f} MiB")
    logger.info(
        f"model loaded ({'FP8 e4m3 base' if fp8 else '4-bit NF4' if cfg.quantize_4bit else str(compute_dtype)}, compute "
        f"{str(compute_dtype).replace('torch.', '')}, attention {attn_implementation}, "
        f"liger {'on' if liger_applied else 'off'}): {where}; trainable parameters "
        f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    )
    if resume_from is not None:  # before any wrapping: FSDP would hold only a shard of each weight
        checkpoint.load_adapter_weights(model, resume_from, device)
    fsdp_units = None
    if runtime.fsdp_version is not None:  # decoder layers as units (frozen base sharded), LoRA replicated
        fsdp_units = fsdp_lora.configure(model, runtime.accelerator.state.fsdp_plugin)["units"]
    compiled = 0
    if cfg.compile_layers:  # in place, before DDP wraps the model (module names unchanged)
        fixed_rows = cfg.batching == "packed" and cfg.pad_to_fixed_length
        compiled = compile_regions.compile_decoder_layers(model, dynamic=False if fixed_rows else None)
    prepared = runtime.accelerator.prepare_model(model, device_placement=False)
    if fsdp_units is not None:
        got = fsdp_lora.fsdp_unit_count(prepared)
        if got != fsdp_units:  # e.g. a wrap policy from elsewhere: the replicated-LoRA path would not hold
            raise TrainingError(f"FSDP wrapped {got} units, expected {fsdp_units} (decoder layers, untied "
                                "embedding, root)")
        if torch.cuda.is_available():  # the whole model each process loaded before sharding: give it back
            torch.cuda.empty_cache()
        # ignored modules are not broadcast by FSDP: start every replica from rank 0's LoRA, as DDP does
        fsdp_lora.broadcast_from_rank0([p for p in prepared.parameters() if p.requires_grad])
    return BuiltModel(model=prepared, compute_dtype=compute_dtype, attn_implementation=attn_implementation,
                      liger_applied=liger_applied, trainable_params=int(trainable), total_params=int(total),
                      memory_bytes=int(model_bytes), compiled_layers=compiled, fsdp_units=fsdp_units,
                      offloaded_layers=offloaded)


def build_optimizer(model: Any, cfg: TrainConfig, runtime: Any, *, warmup_steps: int, total_steps: int,
                    ) -> tuple[torch.optim.Optimizer, Any, str]:
    """(optimizer over the trainable parameters, learning-rate schedule, the optimizer's actual name)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    built: dict[str, str] = {}

    def make(tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt, built["name"] = backends.build_optimizer(tensors, cfg, runtime.device)
        return opt

    if runtime.fsdp_version is None:  # one flat tensor, one launch (flat_optimizer.py); FSDP: memory comes first
        optimizer = FlatOptimizer(params, make)
        inner = optimizer.inner
    else:
        optimizer = inner = make(params)
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    scheduler = get_scheduler(schedule, inner, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler, built["name"]
