"""Exact, low-memory LoRA merge: stream the base checkpoint tensor by tensor and add each LoRA delta
in float32 (see streaming.py). Public entry point: `merge_adapter`."""

from hai_medqa.merge.lora import AdapterError, LoraAdapter, load_adapter, resolve_adapter_dir
from hai_medqa.merge.nf4 import NF4Settings, nf4_roundtrip
from hai_medqa.merge.streaming import (
    MergeError,
    MergeResult,
    check_adapter_fits,
    existing_merge_matches,
    merge_adapter,
    read_base_checkpoint,
)

__all__ = [
    "AdapterError",
    "LoraAdapter",
    "MergeError",
    "MergeResult",
    "NF4Settings",
    "check_adapter_fits",
    "existing_merge_matches",
    "load_adapter",
    "merge_adapter",
    "nf4_roundtrip",
    "read_base_checkpoint",
    "resolve_adapter_dir",
]
