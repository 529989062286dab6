"""Micro-batches: which samples go together, in what order, and how they become tensors.

Packed (default, padding-free): whole samples are laid end to end in one row of at most
``tokens_per_micro_batch`` tokens. ``position_ids`` restart at 0 for every sample and no
``attention_mask`` is passed, so transformers derives per-sample (block-diagonal causal) attention
from the position ids (`transformers.masking_utils.find_packed_sequence_indices`; flash-attention
turns the same ids into varlen offsets). With flex attention the trainer passes the BlockMask
transformers would derive, built from the host's copy of the ids (`packed_flex_block_mask`). The
label of each sample's first token is IGNORE_INDEX (it is prompt), so the shifted loss never
predicts across a boundary. With ``pad_to_fixed_length`` the
row is topped up with filler that has its own position-id run (it attends only to itself) and
IGNORE_INDEX labels, so every row has one shape.

Padded: ``micro_batch_size`` samples per micro-batch, right-padded to the longest, with an
attention mask - the plain reference path.

The order is a pure function of (seed, epoch): resuming rebuilds the same plan and skips to the
saved position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hai_medqa.train.sft_data import IGNORE_INDEX, TokenizedDataset


def pack_in_order(lengths: Sequence[int], order: Sequence[int], budget: int) -> list[list[int]]:
    """Group sample indices, taken in `order`, into rows of at most `budget` tokens (next-fit).

    Next-fit keeps the shuffled order (no length sorting, which would correlate batches with
    length); the waste is under one sample per row. A sample longer than `budget` raises ValueError.
    """
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens, more than the row budget {budget}")
        if used + n > budget and row:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    if row:
        rows.append(row)
    return rows


def plan_epoch(
    lengths: Sequence[int],
    *,
    seed: int,
    epoch: int,
    batching: str = "packed",
    tokens_per_micro_batch: int = 8192,
    micro_batch_size: int = 8,
    shuffle: bool = True,
) -> list[list[int]]:
    """The micro-batches (lists of sample indices) of one epoch, in training order."""
    n = len(lengths)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if batching == "packed":
        return pack_in_order(lengths, order, tokens_per_micro_batch)
    if batching == "padded":
        return [[int(i) for i in order[s:s + micro_batch_size]] for s in range(0, n, micro_batch_size)]
    raise ValueError(f"unknown batching {batching!r}")


def group_into_steps(micro_batches: list[list[int]], *, accumulation: int, world_size: int = 1) -> list[list[list[int]]]:
    """Split an epoch's micro-batches into optimizer steps of ``accumulation * world_size`` (the last may
    be shorter). Rank r trains on ``step[r::world_size]``.

    The steps depend only on the product (the global batch), never on how it is split across
    processes: a 2-GPU run with accumulation 2 and a 1-GPU run with accumulation 4 take the same steps
    in the same order, which is what lets a checkpoint resume on another number of processes. Nothing
    is dropped; a rank whose share of the last step is empty joins the gradient all-reduce with a
    zero-weight pass (Trainer.train_step).
    """
    per_step = accumulation * world_size
    return [micro_batches[s:s + per_step] for s in range(0, len(micro_batches), per_step)]


def collate_packed(ds: TokenizedDataset, indices: Sequence[int], *, pad_to: int | None = None,
                   pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """One packed row: input_ids, labels and position_ids of shape (1, T); no attention_mask.

    `pad_to` tops the row up to exactly that many tokens with inert filler (see module docstring).
    """
    ids, labels, pos = [], [], []
    for i in indices:
        s_ids, _ = ds.sample(i)
        ids.append(torch.from_numpy(s_ids.astype(np.int64)))
        labels.append(torch.from_numpy(ds.labels(i)))
        pos.append(torch.arange(len(s_ids)))
    used = sum(len(x) for x in ids)
    if pad_to is not None:
        if used > pad_to:
            raise ValueError(f"row holds {used} tokens, more than pad_to={pad_to}")
        fill = pad_to - used
        if fill:
            ids.append(torch.full((fill,), pad_token_id, dtype=torch.long))
            labels.append(torch.full((fill,), IGNORE_INDEX, dtype=torch.long))
            pos.append(torch.arange(fill))
    return {
        "input_ids": torch.cat(ids)[None],
        "labels": torch.cat(labels)[None],
        "position_ids": torch.cat(pos)[None],
    }


def packed_mask_function(position_ids: torch.Tensor, position_ids_on_device: torch.Tensor | None = None):
    """transformers' attention rule for a packed row (causal, and only within a sample), found on the host.

    The same mask function `transformers.masking_utils.create_causal_mask` derives from the position ids,
    made from transformers' own pieces; the sample boundaries are read from the CPU copy of `position_ids`,
    where transformers reads them from the device copy with a host wait (`find_packed_sequence_indices`).
    The returned function closes over device tensors when `position_ids_on_device` is given.

        position ids [[0, 1, 2, 0, 1]] -> token 3 attends to 3 only, token 4 to 3 and 4
    """
    from transformers.masking_utils import (
        causal_mask_function,
        find_packed_sequence_indices,
        packed_sequence_compatibility_function,
    )

    packed = find_packed_sequence_indices(position_ids)  # None: one sample (plain causal)
    if packed is None:
        return causal_mask_function
    device_ids = position_ids if position_ids_on_device is None else position_ids_on_device
    return packed_sequence_compatibility_function(causal_mask_function, device_ids,
                                                  packed.to(device_ids.device, non_blocking=True))


def packed_flex_block_mask(position_ids: torch.Tensor, position_ids_on_device: torch.Tensor):
    """The flex-attention BlockMask transformers would build for a packed row, built without waiting for the GPU.

    transformers takes a ready 4-D BlockMask passed as ``attention_mask`` as it is, so the trainer builds it
    while the previous step's backward still runs on the GPU (docs/performance.md: the forward otherwise
    began with the host waiting for the GPU, then building the mask while the GPU waited).
    """
    from transformers.masking_utils import flex_attention_mask

    batch, length = position_ids.shape
    return flex_attention_mask(batch, length, length,
                               mask_function=packed_mask_function(position_ids, position_ids_on_device),
                               device=position_ids_on_device.device)


def collate_padded(ds: TokenizedDataset, indices: Sequence[int], *, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, labels and attention_mask of shape (B, longest)."""
    longest = max(int(ds.lengths[i]) for i in indices)
    b = len(indices)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)
    for row, i in enumerate(indices):
        s_ids, _ = ds.sample(i)
        n = len(s_ids)
        input_ids[row, :n] = torch.from_numpy(s_ids.astype(np.int64))
        labels[row, :n] = torch.from_numpy(ds.labels(i))
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label at position t+1 != IGNORE_INDEX)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
