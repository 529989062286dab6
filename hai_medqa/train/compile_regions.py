"""Regional compilation: every decoder layer runs as one torch.compile region while training.

The profile of `fast` (issue 17) put ~13% of the GPU time in element-wise adds and copies and ~5% in
Liger's kernels: residual adds, RMSNorm, RoPE, SwiGLU and the LoRA glue, each its own kernel between
the projections. Compiling each decoder layer lets inductor fuse them into their neighbours (the
residual add into the next RMSNorm, RoPE into one kernel over q and k, silu x up into one kernel). The
mathematics is the layer's own; only the rounding of fused element-wise chains can differ.

    compile_decoder_layers(model, dynamic=False)    # once, after LoRA is added, before DDP wrapping
    compile_stats()                                 # graphs, graph breaks, recompiles so far

How it composes with the rest of the training path:

- One compiled function (`_run_layer`) serves every layer: the layer is an argument, its parameters
  graph inputs, so the 32 layers of the 7.8B share their graphs (two in practice: the first layer's
  input needs no gradient without checkpointing, the others' do). `compile_stats` counts this
  function's graphs, so "recompiles" means exactly this region's.
- Only training runs compiled. In evaluation and generation (eval mode) the layer runs eagerly: no
  graphs for no-grad, KV caches or token-by-token shapes, and no recompiles from them.
- Activation checkpointing stays outside the region: transformers' per-layer checkpointing
  (`GradientCheckpointingLayer`) is switched off inside and the same checkpoint function (non-reentrant,
  or offloading) wraps the compiled call, so the recomputation reruns the compiled kernels.
- bitsandbytes 0.50's NF4 matmul is a torch custom op (fake kernels registered), the fused LoRA forward
  of fast_lora.py is plain tensor code, and transformers calls flex attention uncompiled when already
  compiling, so all of them trace into the region (tested on the CPU for NF4 + fused LoRA + sdpa in
  training, and for flex attention's forward with its BlockMask as a region input; flex attention's
  backward runs only on a GPU).
- Liger's RoPE, RMSNorm and SwiGLU are hand-written autograd Functions around Triton kernels: opaque
  to inductor, they would cut the fusion they are meant to provide. With compiled layers the model
  keeps only Liger's fused linear + cross-entropy (outside the layers) and inductor generates the rest
  (backends.maybe_apply_liger(layer_kernels=False)).
- DDP: the layers are compiled in place before accelerate wraps the model, so DDP sees ordinary
  modules; its gradient hooks fire as the compiled backward produces each layer's LoRA gradients.
  torch's DDPOptimizer (graph splits at bucket boundaries) only concerns a compiled DDP module and is
  not involved. FSDP (version 1) swaps parameters under the layers and is refused by the config.
- Module names do not change (no ``_orig_mod`` segment: the layer's call is redirected, not wrapped),
  so checkpoints and adapters hold the same tensor names in the same format.

Shapes: the `fast` profile pads every row to one length (`dynamic=False`: one static graph); with
variable rows (`lean`) `dynamic=None` lets dynamo compile the first shape statically and, at the first
different length, once more with the sequence length symbolic (automatic dynamic shapes).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from loguru import logger

BACKEND_ENV = "HAI_MEDQA_COMPILE_BACKEND"
"""Environment variable overriding the compile backend (default inductor). ``aot_eager`` captures and
differentiates the same graphs (dynamo + AOTAutograd) but runs them with eager kernels: it tells a tracing
problem from a code-generation one, and keeps the CPU tests fast."""

MODE_ENV = "HAI_MEDQA_COMPILE_MODE"
"""Environment variable setting torch.compile's mode for the region (default: torch's default mode), e.g.
``max-autotune-no-cudagraphs`` - what transformers compiles flex attention with outside a region - to
autotune the flex-attention and matmul kernels at the price of a much longer first step."""

RECOMPILE_LIMIT = 8
"""Graphs the layer region may hold (torch's default limit): training needs 1-4 (see module docs);
more means shapes or guards change step after step, and dynamo then runs new cases eagerly."""

_REGION_ATTR = "_hai_compiled_region"
_REGION_BREAKS: Counter[str] = Counter()
"""Graph breaks dynamo counted while compiling the layer region (by reason), apart from any other
compiled code of the process (e.g. transformers' compiled flex-attention mask builder)."""


def _run_layer(layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The compiled region: one decoder layer's call (hooks included), as `nn.Module.__call__` makes it."""
    return layer._call_impl(*args, **kwargs)


@functools.cache
def _compiled_run_layer(backend: str, dynamic: bool | None, mode: str | None) -> Callable[..., Any]:
    """torch.compile(_run_layer), one per (backend, dynamic, mode) and process."""
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        kwargs["mode"] = mode
    if "recompile_limit" in inspect.signature(torch.compile).parameters:  # per region where torch has it
        kwargs["recompile_limit"] = RECOMPILE_LIMIT
    return torch.compile(_run_layer, **kwargs)


class _LayerCall:
    """Stands in as a layer's `_compiled_call_impl`: the compiled region in training (inside the
    layer's activation checkpoint when it has one), the eager layer otherwise."""

    def __init__(self, layer: torch.nn.Module, compiled: Callable[..., Any],
                 checkpoint_fn: Callable[..., Any] | None):
        self.layer = layer
        self.compiled = compiled
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer
        if not layer.training:
            return layer._call_impl(*args, **kwargs)
        if self.checkpoint_fn is not None:
            # as transformers' GradientCheckpointingLayer does: keyword arguments bound, tensors positional
            return self.checkpoint_fn(functools.partial(self._run, **kwargs), *args)
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled call; graph breaks dynamo counts during it are the region's (tracing happens here)."""
        from torch._dynamo.utils import counters

        before = sum(counters["graph_break"].values())
        before_reasons = counters["graph_break"].copy() if before else Counter()
        out = self.compiled(self.layer, *args, **kwargs)
        if sum(counters["graph_break"].values()) != before:
            _REGION_BREAKS.update(counters["graph_break"] - before_reasons)
        return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (PEFT-wrapped) causal LM: the modules of its ``layers`` ModuleList."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and all(
                type(layer).__name__.endswith("DecoderLayer") for layer in layers):
            return list(layers)
    raise ValueError(f"no decoder layers (a `layers` ModuleList of *DecoderLayer) found in {type(model).__name__}")


def compiler_available(device: torch.device | str) -> bool:
    """Whether the layer region can compile on `device`: on a CUDA GPU inductor needs a working Triton for it
    (torch's CUDA wheels for Linux bring one; Windows wheels and very old GPUs do not); a non-inductor
    backend ($HAI_MEDQA_COMPILE_BACKEND) and the CPU (inductor's C++ code) need none."""
    if torch.device(device).type != "cuda" or resolve_backend() != "inductor":
        return True
    from torch.utils._triton import has_triton

    return bool(has_triton())


def resolve_backend(backend: str | None = None) -> str:
    """The compile backend: `backend`, else $HAI_MEDQA_COMPILE_BACKEND, else inductor."""
    return backend or os.environ.get(BACKEND_ENV) or "inductor"


def compile_decoder_layers(model: torch.nn.Module, *, dynamic: bool | None, backend: str | None = None,
                           mode: str | None = None) -> int:
    """Make every decoder layer of `model` run as one compiled region while training; return how many.

    `dynamic`: False when every micro-batch has the same shape (fixed-length packed rows), None to let
    dynamo make the changing lengths symbolic after the first change. Call it after LoRA and the fused
    forward are in place and before DDP wrapping; compilation itself happens at the first training
    forward. Each layer's activation checkpointing (transformers' `gradient_checkpointing` flag and
    function) is moved outside the region. `backend` and `mode` default to $HAI_MEDQA_COMPILE_BACKEND
    (else inductor) and $HAI_MEDQA_COMPILE_MODE (else torch's default).
    """
    if not hasattr(torch.nn.Module, "_compiled_call_impl"):  # what nn.Module.compile sets; read by __call__
        raise RuntimeError(f"torch {torch.__version__} has no nn.Module._compiled_call_impl to redirect a layer's call")
    backend = resolve_backend(backend)
    mode = mode or os.environ.get(MODE_ENV) or None
    compiled = _compiled_run_layer(backend, dynamic, mode)
    layers = decoder_layers(model)
    for layer in layers:
        if getattr(layer, _REGION_ATTR, False):
            continue
        checkpoint_fn = None
        if getattr(layer, "gradient_checkpointing", False):
            checkpoint_fn = layer._gradient_checkpointing_func
            layer.gradient_checkpointing = False  # checkpointing moves outside the compiled region
        layer._compiled_call_impl = _LayerCall(layer, compiled, checkpoint_fn)
        setattr(layer, _REGION_ATTR, True)
    n_ckpt = sum(1 for layer in layers if layer._compiled_call_impl.checkpoint_fn is not None)
    logger.info(f"compiling {len(layers)} decoder layers as regions (torch.compile backend {backend}, "
                f"dynamic {dynamic}{', mode ' + mode if mode else ''}; {n_ckpt} checkpointed around the region); "
                "compilation happens in the first training steps")
    return len(layers)


def compile_stats() -> dict[str, Any]:
    """What dynamo did so far: the layer region's graphs, recompiles and graph breaks, and process-wide counts.

    ``region_graphs``: compiled graphs of the layer region (cache entries of `_run_layer`);
    ``region_recompiles``: graphs beyond the first; ``recompile_limit_reached``: the region holds as
    many graphs as allowed (later new shapes run eagerly); ``region_graph_breaks`` (with the most
    frequent ``region_graph_break_reasons``): breaks while tracing the region - each splits a layer
    into pieces and the code between them runs eagerly; ``process_graph_breaks``, ``frames_compiled``,
    ``graphs_compiled``: every compiled code of the process (flex attention's mask builder included).
    """
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    graphs = len(_debug_get_cache_entry_list(_run_layer.__code__))
    return {
        "region_graphs": graphs,
        "region_recompiles": max(0, graphs - 1),
        "recompile_limit_reached": graphs >= RECOMPILE_LIMIT,
        "region_graph_breaks": int(sum(_REGION_BREAKS.values())),
        "region_graph_break_reasons": {k[:200]: int(v) for k, v in _REGION_BREAKS.most_common(5)},
        "process_graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_compiled": int(counters["frames"]["ok"]),
        "graphs_compiled": int(counters["stats"]["unique_graphs"]),
    }


def reset_compile_stats() -> None:
    """Forget the region's graph-break count (the compiled graphs stay; `torch._dynamo.reset` drops those)."""
    _REGION_BREAKS.clear()


def log_compile_stats(stats: dict[str, Any], *, when: str) -> None:
    """One log line with `stats` (compile_stats); a warning when the region fell apart (graph breaks, or
    the recompile limit reached)."""
    line = (f"compiled layers {when}: {stats['region_graphs']} graph(s) for the layer region "
            f"({stats['region_recompiles']} recompile(s)), {stats['region_graph_breaks']} graph break(s) in it "
            f"({stats['process_graph_breaks']} in the whole process)")
    if stats["region_graph_breaks"] or stats["recompile_limit_reached"]:
        why = "; ".join(f"{n}x {reason}" for reason, n in stats["region_graph_break_reasons"].items())
        logger.warning(line + (" - recompile limit reached: new shapes now run eagerly" if
                               stats["recompile_limit_reached"] else "") + (f"; breaks: {why}" if why else ""))
    else:
        logger.info(line)
