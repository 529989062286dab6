"""FSDP-QLoRA: the frozen 4-bit base sharded over the processes, the LoRA weights replicated on each.

    info = fsdp_lora.configure(model, accelerator.state.fsdp_plugin)   # before accelerator.prepare_model
    fsdp_lora.broadcast_from_rank0(trainable_params)                   # after it
    fsdp_lora.average_gradients(trainable_params, world_size)          # once per optimizer step

FSDP1 (the version bitsandbytes' 4-bit weights shard on) wraps each decoder layer as one unit, the input
embedding as another when it is not tied to the head, plus the root (final norm, head; the embedding too
when tied): only frozen weights are flattened and sharded. Every module
that holds a trained tensor (PEFT's lora_A / lora_B linears) is an FSDP *ignored module*: FSDP neither
flattens, shards, gathers nor reduces it, so the LoRA weights, their gradients and the optimizer state
are ordinary whole tensors on every process, as under DDP. Checkpoints and adapters then take the
one-process path (rank 0 writes what it holds; checkpoint.py), and the LoRA forward and the optimizer
are the one-GPU ones.

FSDP does not average the ignored gradients: the trainer does it once per optimizer step, after the
last micro-batch's backward and before clipping (`average_gradients`: one flattened all-reduce,
divided by the process count, DDP's mean), and nothing is synchronised on the other micro-batches.

Why not PEFT's ``fsdp_auto_wrap_policy`` (the earlier path): it makes every LoRA matrix its own FSDP
unit (2 x 7 projections x 32 layers = 448 at 7.8B, beside 32 decoder layers), each all-gathered in the
forward, again in the checkpointed recompute and in the backward, and reduce-scattered: about 2,000
small collectives per micro-batch, for parameters (~42M at r=16) whose sharding saves nothing
(issue 18: 0.42x DDP at 7.8B on two H200s).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from loguru import logger

from hai_medqa.train.errors import TrainingError


def decoder_layer_classes(model: torch.nn.Module, names: list[str] | None = None) -> set[type]:
    """The module classes FSDP wraps as units: `names` (the launch config's
    ``fsdp_transformer_layer_cls_to_wrap``) or else the model's ``_no_split_modules`` (its decoder
    layer), resolved to the classes present in `model`."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    if not names:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = list(getattr(base, "_no_split_modules", None) or [])
    classes = set()
    for name in names:
        cls = get_module_class_from_name(model, name)
        if cls is None:
            raise TrainingError(f"FSDP: no module of class {name} in the model (fsdp_transformer_layer_cls_to_wrap)")
        classes.add(cls)
    if not classes:
        raise TrainingError("FSDP: the model names no decoder-layer class to wrap (_no_split_modules is empty); "
                            "set fsdp_transformer_layer_cls_to_wrap in the accelerate config")
    return classes


def replicated_modules(model: torch.nn.Module, layer_classes: set[type]) -> list[torch.nn.Module]:
    """Every module that directly holds a trained tensor, in module order: FSDP's ignored modules.

    A module that also contains a decoder layer (a trained tensor held above the layers) cannot be
    ignored without leaving those layers unsharded: TrainingError."""
    out = []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if any(isinstance(m, tuple(layer_classes)) for m in module.modules()):
            raise TrainingError(f"FSDP: {name or 'the model'} holds a trained tensor and contains decoder layers; "
                                "only adapter modules below the layers can stay replicated")
        out.append(module)
    return out


def separate_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The input embedding module, when it can be an FSDP unit of its own: untied from the output head
    (EXAONE-3.5 7.8B and 32B; the 2.4B model ties them, and one weight cannot live in two units)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embedding is None or (head is not None and head.weight is embedding.weight):
        return None
    return embedding


def _wrap_policy(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int, *, classes: tuple[type, ...],
                 extra: tuple[torch.nn.Module, ...]) -> bool:
    """torch's auto-wrap policy protocol: descend everywhere; wrap the decoder layers and the `extra` modules."""
    if recurse:
        return True
    return isinstance(module, classes) or any(module is m for m in extra)


def configure(model: torch.nn.Module, plugin: Any) -> dict[str, int]:
    """Set accelerate's FSDP1 plugin to wrap the decoder layers (and an untied input embedding) as units and
    to ignore (replicate) every module holding a trained tensor; return {"decoder_layers",
    "embedding_unit", "units", "replicated_modules", "replicated_params"}. Call before
    ``accelerator.prepare_model``.

    Why the embedding gets its own unit: FSDP1 keeps the root unit's parameters gathered from the root's
    forward to the end of its backward (torch's ``_post_forward_reshard`` skips the root), so an embedding
    left in the root is held whole through the whole step; at 32B that is 102,400 x 5,120 bf16 = 0.98 GiB
    per GPU beside its shard. As its own unit it is gathered for the embedding lookup only (and once more at
    the very end of the backward). The head stays in the root: Liger's fused loss reads its weight directly,
    outside any forward FSDP could gather it for.
    """
    classes = decoder_layer_classes(model, getattr(plugin, "transformer_cls_names_to_wrap", None))
    ignored = replicated_modules(model, classes)
    # With fsdp_cpu_ram_efficient_loading (the shipped config) ranks > 0 load the model on `meta`, and PEFT
    # puts their LoRA weights there too. FSDP materialises only the modules it manages, so the replicas get
    # real (uninitialised) storage here; broadcast_from_rank0 then gives them rank 0's values.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for module in ignored:
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
    embedding = separate_embedding(model)
    extra = (embedding,) if embedding is not None else ()
    # A ready policy (a partial, not torch's bare function): accelerate's set_auto_wrap_policy leaves it as is.
    plugin.auto_wrap_policy = functools.partial(_wrap_policy, classes=tuple(classes), extra=extra)
    plugin.ignored_modules = ignored
    layers = sum(1 for m in model.modules() if isinstance(m, tuple(classes)))
    params = sum(p.numel() for m in ignored for p in m.parameters(recurse=False))
    info = {"decoder_layers": layers, "embedding_unit": len(extra), "units": layers + len(extra) + 1,
            "replicated_modules": len(ignored), "replicated_params": int(params)}
    logger.info(f"FSDP: {layers} decoder layers ({', '.join(sorted(c.__name__ for c in classes))})"
                f"{' + the input embedding' if extra else ''} + the root as units, the 4-bit base sharded; "
                f"{len(ignored)} LoRA modules ({params:,} parameters) replicated on every process, their gradients "
                "averaged once per step")
    return info


def fsdp_unit_count(model: torch.nn.Module) -> int:
    """Number of FSDP units in a wrapped model (root included)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return len(FSDP.fsdp_modules(model))


def _buckets(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by (dtype, device), in order: one flat buffer each."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def _flat_collective(tensors: list[torch.Tensor], op: Any) -> None:
    """Run `op(flat)` in place on each flattened (dtype, device) bucket of `tensors`, then copy back."""
    for idx in _buckets(tensors):
        group = [tensors[i] for i in idx]
        flat = torch.cat([t.reshape(-1) for t in group])
        op(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


def broadcast_from_rank0(params: list[torch.Tensor]) -> None:
    """Make the replicated tensors rank 0's on every process (what DDP does at construction): FSDP
    does not broadcast ignored modules, and the replicas must start equal whatever each process's
    loading did. One flattened broadcast per dtype; a collective (every process calls it)."""
    import torch.distributed as dist

    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        _flat_collective([p.data for p in params], lambda flat: dist.broadcast(flat, src=0))


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average the gradients of the replicated tensors over the processes: one flattened all-reduce
    (sum) per dtype, divided by `world_size` (DDP's mean). A parameter without a gradient counts as
    zeros. A collective: every process calls it, once per optimizer step, after its last backward."""
    import torch.distributed as dist

    if world_size == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)

    def reduce(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)

    _flat_collective([p.grad for p in params], reduce)
