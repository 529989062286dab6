"""The validation loss without the full logits: summed answer-token cross-entropy, chunk by chunk.

Training on the GPU profiles never builds the ``[tokens x vocab]`` logits: Liger's fused linear +
cross-entropy computes the loss from the final hidden states in chunks. Liger does that only in
training mode, so an evaluation through the model's own forward builds them in full - 8,192 x
102,400 logits in bf16 plus their float32 copies, which took `lean` at the 7.8B shape from 9.5 GiB
reserved to 29.2 GiB at the first evaluation (issue 17; TRL had the same bug, trl#4679).

`summed_nll` runs the whole (possibly DDP/FSDP-wrapped) model forward, but for that one call the
model's output head is replaced by one that turns the final hidden states into the summed negative
log-likelihood of the shifted labels: only the positions whose next token is a loss token go through
the head, at most `CHUNK_TOKENS` of them at a time, their logits cast to float32 as transformers'
loss does. Running inside the forward keeps every wrapper's contract (FSDP gathers the head's weight
for the forward). The result equals transformers' ``ForCausalLMLoss`` with ``reduction="sum"`` up to
floating-point summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from hai_medqa.train.sft_data import IGNORE_INDEX

CHUNK_TOKENS = 1024
"""Positions per output-head call: 1,024 x 102,400 logits = 0.2 GiB in bf16, 0.4 GiB in float32."""


def output_head(model: Any) -> torch.nn.Module:
    """The output projection (lm_head) of a causal LM or of the PEFT model around it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def shifted_nll_sum(hidden: torch.Tensor, labels: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor],
                    *, chunk_tokens: int) -> torch.Tensor:
    """Sum of -log p(labels[t + 1] | position t) over the positions whose next label is not
    IGNORE_INDEX, projecting at most `chunk_tokens` hidden states at a time; a float64 scalar.

    ``hidden`` is (batch, length, hidden_size), ``labels`` (batch, length), as the model sees them.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h, y = hidden[:, :-1][keep], targets[keep]
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(y), chunk_tokens):
        logits = project(h[start:start + chunk_tokens]).float()  # float32, as transformers' loss upcasts
        total += F.cross_entropy(logits, y[start:start + chunk_tokens], reduction="sum").double()
    return total


@contextlib.contextmanager
def _head_returning_nll(head: torch.nn.Module, labels: torch.Tensor, chunk_tokens: int,
                        sums: list[torch.Tensor]) -> Iterator[None]:
    """While the block runs, calling `head` appends the summed NLL to `sums` and returns an empty
    tensor instead of logits; the head's own forward is back afterwards."""
    own = head.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) to restore
    project = head.forward

    def nll_instead_of_logits(hidden: torch.Tensor) -> torch.Tensor:
        sums.append(shifted_nll_sum(hidden, labels, project, chunk_tokens=chunk_tokens))
        return hidden[..., :0]

    head.forward = nll_instead_of_logits
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


@torch.no_grad()
def summed_nll(model: Any, batch: dict[str, torch.Tensor], *, head: torch.nn.Module,
               chunk_tokens: int | None = None) -> torch.Tensor:
    """The summed cross-entropy of `batch`'s loss tokens (float64 scalar) through `model`'s forward
    (`head`: its output projection, `output_head`), never holding more than `chunk_tokens` (default
    `CHUNK_TOKENS`) positions' logits. `batch` is a collated micro-batch with ``labels``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    sums: list[torch.Tensor] = []
    with _head_returning_nll(head, batch["labels"], chunk_tokens or CHUNK_TOKENS, sums):
        model(**inputs, use_cache=False)
    if len(sums) != 1:
        raise RuntimeError(f"the output head ran {len(sums)} times in one forward; expected once")
    return sums[0]
