"""Where a run executes: one CPU, one GPU, or one of several processes under ``accelerate launch``.

Every process trains on its own share of each step's micro-batches (packing.group_into_steps); only
rank 0 (`is_main`) logs and writes files. FSDP comes from ``accelerate launch --config_file
configs/accelerate/fsdp_qlora.yaml``.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger


@dataclass(frozen=True)
class Runtime:
    """The process's place in the run and its device."""

    accelerator: Any
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    fsdp_version: int | None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """After a run's last collective, on every process: wait for all, then let accelerate destroy the
        process group (`end_training`), as torch asks before exit. Left to the interpreter's exit, gloo's
        group was once torn down with its threads running: a rank of the 2-process FSDP CPU launch ended
        "terminate called without an active exception" after training had completed and saved."""
        self.wait_for_everyone()
        self.accelerator.end_training()

    def any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (a collective: all processes call it)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor(1.0 if flag else 0.0, device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum") > 0)


def detect_runtime() -> Runtime:
    """The Runtime of this process (accelerate's state: a plain process is rank 0 of 1)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # cpu=True when there is no GPU: accelerate only forms a multi-process (gloo) group on CPU if told
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    fsdp_version = (accelerator.state.fsdp_plugin.fsdp_version
                    if accelerator.distributed_type == DistributedType.FSDP else None)
    device = accelerator.device
    if device.type == "cuda" and device.index is None:  # one GPU: accelerate says plain "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "cpu":  # gloo ranks get "cpu:N", which torch.load and safetensors reject
        device = torch.device("cpu")
    return Runtime(accelerator=accelerator, device=device, rank=accelerator.process_index,
                   world_size=accelerator.num_processes, is_main=accelerator.is_main_process,
                   fsdp_version=fsdp_version)


def freeze_python_heap(when: str) -> int:
    """Collect garbage once, then move every object alive now out of the garbage collector's reach
    (``gc.freeze``); return how many objects are frozen. `thaw_python_heap` undoes it.

    Why: a training process holds hundreds of thousands of long-lived Python objects (the model's modules
    and parameters, compiled graphs and their guards, the libraries: 857,905 in a 7.8B `lean` process on an
    H200, where one full collection took 485 ms, and 60 ms frozen: docs/performance.md), and each full
    collection walks them all again while the host launches nothing, so the GPU waits; under DDP one rank's pause stalls every rank
    at the next all-reduce. Frozen objects are never walked again. Objects made later (each step's
    tensors and closures) are collected as before, so reference cycles formed during training are still
    freed. The trainer freezes when its loop starts, again after the first step (the compiled graphs
    are made there) and after any later step that compiled new code (`compiled_frame_count`: a recompile
    for a new row length made 77,500 objects on the tiny model), and thaws when the loop ends, so a
    process that goes on (a notebook, the tests) collects the trainer's cycles once it drops it.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug(f"Python heap frozen {when}: {frozen:,} objects left out of later garbage collections")
    return frozen


def compiled_frame_count() -> int:
    """How many frames torch.compile (dynamo) has compiled in this process so far (0 when it never ran): when it
    grows during training, a recompile made long-lived objects that `freeze_python_heap` has not frozen yet."""
    if "torch._dynamo" not in sys.modules:  # never compiled: no need to import dynamo for the answer
        return 0
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def thaw_python_heap(frozen_before: int) -> None:
    """Undo `freeze_python_heap` at the end of a loop, unless the process had frozen objects itself before
    the loop began (`frozen_before`: ``gc.get_freeze_count()`` then): its freeze is its own to undo."""
    if frozen_before == 0:
        gc.unfreeze()
