"""Activation offloading (``offload_activations``): checkpointed decoder layers keep their input in host memory.

Under gradient checkpointing (non-reentrant, transformers' per-layer ``GradientCheckpointingLayer``) what a
checkpointed decoder layer keeps between its forward and its backward is its input: the hidden states
(tokens x hidden in the compute dtype). torch.utils.checkpoint stores it as a saved tensor
(``_CheckpointFrame.save_inputs``) *outside* its own saved-tensor hooks, so a
``torch.autograd.graph.saved_tensors_hooks`` context entered around the checkpoint call sees exactly
that tensor and nothing inside the layer (everything inside is the checkpoint's own business and is
recomputed). `enable` wraps each checkpointed layer's ``_gradient_checkpointing_func`` in such a context.
The first layer's input is left alone: it is the embedding output that ``enable_input_require_grads``
made a leaf requiring grad, which the autograd graph holds (AccumulateGrad) whatever the hooks do.


- forward (pack hook): a pinned host buffer is allocated (PyTorch's caching host allocator) and the GPU
  tensor is copied into it with a non-blocking copy on a dedicated CUDA stream, after that stream has
  waited for the compute stream (which produced the tensor). ``Tensor.record_stream`` on the GPU tensor
  tells the caching allocator that the copy stream still reads it, so when autograd drops it the memory
  is not handed out again before the copy has finished. The compute stream never waits in the forward.
- backward (unpack hook, called when the checkpoint starts recomputing layer k): layer k's input is taken
  from the host - already on its way if it was prefetched - the compute stream waits on that copy's
  event, and the copy of the *next* layer to be recomputed (layer k-1, the one packed before it) is
  started on the copy stream, so it overlaps layer k's recomputation and backward. The destination is
  allocated on the compute stream and the copy stream first waits for the compute stream (the block may
  be memory that queued compute kernels still use); ``record_stream`` covers a prefetched tensor that is
  dropped unused. The host copy stays until autograd frees the saved tensor (after that layer's backward).

On a CPU (or any device without CUDA streams) the same hooks run with plain synchronous copies: the
saved input becomes a separate host copy and the prefetch copies it back one layer ahead, so the
mechanism - which tensor is offloaded, the prefetch order, the numerics - is testable there
(tests/train/test_activation_offload.py). Copies are exact, so losses and gradients are bitwise the
ones without offloading.

Cost and saving: the GPU no longer holds the checkpointed inputs - tokens x hidden x 2 bytes per
checkpointed layer but the first (8,192 tokens at the 32B shape: 80 MiB x 63 layers = 4.9 GiB; 7.8B:
64 MiB x 31 = 1.9 GiB) - except two at a time in the backward (the one being recomputed and the one
prefetched). In exchange every
step copies them to the host and back over PCIe (about 1.5 ms per 80 MiB each way at ~50 GB/s, against
~10 ms of a 32B layer's forward at these shapes, so it can hide behind compute), and the host holds them
in pinned memory (up to 2x the bytes: the pinned allocator rounds blocks up to powers of two). The speed
cost has not been measured on GPUs yet. Non-checkpointed layers (``checkpoint_every_n_layers`` > 1) keep
their activations on the GPU as before. Evaluation and generation run without checkpointing: nothing
is offloaded there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger


@dataclass
class OffloadStats:
    """What the hooks did since the offloader was made (process-local)."""

    packed: int = 0
    """Tensors moved to the host in forwards."""
    packed_bytes: int = 0
    """Their bytes."""
    kept: int = 0
    """Saved leaves needing a gradient, left where they were (the graph holds them anyway)."""
    empty: int = 0
    """Saved empty tensors, left as they are (torch 2.11's checkpoint saves an empty placeholder per call,
    2.13's does not: counted apart so the other counts mean the same on both)."""
    unpacked: int = 0
    """Tensors brought back for a recomputation."""
    prefetched: int = 0
    """Of those, how many had been prefetched (their copy started one layer earlier)."""


class _Offloaded:
    """One saved tensor living in host memory, and its way back."""

    __slots__ = ("host", "device", "fetched", "fetch_done", "unpacked", "prev", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: weakref.ref | None):
        self.host = host
        self.device = device
        self.fetched: torch.Tensor | None = None  # the device copy, once a fetch was started
        self.fetch_done: Any = None  # CUDA event recorded after the host-to-device copy
        self.unpacked = False
        self.prev = prev  # the tensor packed just before this one: the next one the backward needs


class ActivationOffloader:
    """The saved-tensor hooks and the copy streams shared by every offloading layer of one model."""

    def __init__(self) -> None:
        self.stats = OffloadStats()
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._last: weakref.ref | None = None

    # ----------------------------------------------------------------- streams
    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    # ----------------------------------------------------------------- hooks
    def pack(self, tensor: torch.Tensor) -> Any:
        """Forward: copy `tensor` to host memory (asynchronously on CUDA) and return the handle."""
        if tensor.numel() == 0:
            self.stats.empty += 1
            return tensor
        if tensor.is_leaf and tensor.requires_grad:
            # A leaf that needs a gradient is held by its AccumulateGrad node as long as the graph lives (the
            # first layer's input: the embedding output made to require grad): a copy would free nothing.
            self.stats.kept += 1
            return tensor
        with torch.no_grad():
            if tensor.is_cuda:
                host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
                compute = torch.cuda.current_stream(tensor.device)
                copy = self._copy_stream(tensor.device)
                copy.wait_stream(compute)  # the tensor is produced on the compute stream
                with torch.cuda.stream(copy):
                    host.copy_(tensor, non_blocking=True)
                tensor.record_stream(copy)  # not reused before the copy has read it
            else:  # CPU or a device without streams: a plain copy, the same bookkeeping
                host = tensor.detach().to("cpu", copy=True)
        self.stats.packed += 1
        self.stats.packed_bytes += tensor.numel() * tensor.element_size()
        handle = _Offloaded(host, tensor.device, self._last)
        self._last = weakref.ref(handle)
        return handle

    def unpack(self, handle: Any) -> torch.Tensor:
        """Backward: the saved tensor back on its device; start bringing back the one needed next."""
        if isinstance(handle, torch.Tensor):
            return handle
        if handle.fetched is not None:
            self.stats.prefetched += 1
        else:
            self._fetch(handle)
        tensor, done = handle.fetched, handle.fetch_done
        if done is not None:
            torch.cuda.current_stream(handle.device).wait_event(done)
        # Keep no reference: the recomputation owns the tensor, which is freed after the layer's backward.
        # The host copy stays until autograd frees the handle (a retained graph may unpack again).
        handle.fetched, handle.fetch_done, handle.unpacked = None, None, True
        self.stats.unpacked += 1
        prev = handle.prev() if handle.prev is not None else None
        if prev is not None and prev.fetched is None and not prev.unpacked:
            self._fetch(prev)
        return tensor

    def _fetch(self, handle: _Offloaded) -> None:
        """Start the host-to-device copy of `handle` (on CUDA: on the copy stream, with an event)."""
        device = handle.device
        if device.type == "cuda":
            compute = torch.cuda.current_stream(device)
            copy = self._copy_stream(device)
            # Allocated on the compute stream (its memory pool): the copy stream must wait for the kernels
            # queued there, which may still use this block's previous tenant.
            out = torch.empty(handle.host.size(), dtype=handle.host.dtype, device=device)
            copy.wait_stream(compute)
            with torch.cuda.stream(copy):
                out.copy_(handle.host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(copy)
            out.record_stream(copy)  # dropped before use (an error in the backward): not reused mid-copy
            handle.fetched, handle.fetch_done = out, done
        else:
            handle.fetched = handle.host.to(device, copy=True)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context under which a checkpoint call's saved inputs go to the host."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class OffloadingCheckpoint:
    """A layer's ``_gradient_checkpointing_func``: the original checkpoint call, its saved inputs offloaded."""

    def __init__(self, checkpoint_fn: Callable[..., Any], offloader: ActivationOffloader):
        self.checkpoint_fn = checkpoint_fn
        self.offloader = offloader

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.offloader.hooks():
            return self.checkpoint_fn(function, *args, **kwargs)


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of `model` whose activation checkpointing is on (transformers' per-layer flag)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and getattr(m, "gradient_checkpointing", False)]


def enable(model: torch.nn.Module) -> ActivationOffloader:
    """Offload the saved input of every checkpointed decoder layer of `model` to host memory.

    Call it after ``activation_checkpointing_enable`` (it wraps the checkpoint function each layer got)
    and before compile_regions moves checkpointing outside compiled layers (it takes the wrapped one).
    Raises ValueError when no layer is checkpointed. Calling it again returns the same offloader.
    """
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError("offload_activations needs activation checkpointing: no decoder layer is checkpointed")
    existing = [layer._gradient_checkpointing_func for layer in layers
                if isinstance(layer._gradient_checkpointing_func, OffloadingCheckpoint)]
    offloader = existing[0].offloader if existing else ActivationOffloader()
    for layer in layers:
        if not isinstance(layer._gradient_checkpointing_func, OffloadingCheckpoint):
            layer._gradient_checkpointing_func = OffloadingCheckpoint(layer._gradient_checkpointing_func, offloader)
    logger.info(f"activation offloading: the saved inputs of {len(layers)} checkpointed decoder layers go to "
                "host memory in the forward and come back one layer ahead in the backward")
    return offloader


def offloader_of(model: torch.nn.Module) -> ActivationOffloader | None:
    """The offloader `enable` attached to `model`'s layers, or None (also after compile_regions took the
    checkpoint function outside a compiled layer: it keeps the wrapped one)."""
    for module in model.modules():
        for fn in (getattr(module, "_gradient_checkpointing_func", None),
                   getattr(getattr(module, "_compiled_call_impl", None), "checkpoint_fn", None)):
            if isinstance(fn, OffloadingCheckpoint):
                return fn.offloader
    return None
