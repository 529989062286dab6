"""Answer-token perplexity of reference answers: how likely the model finds the human answer.

The tokens scored are exactly the training loss tokens - the answer plus ``[|endofturn|]``, after
the rendered prompt - because the samples are tokenised by the training code itself
(`hai_medqa.train.sft_data.tokenize_records`, which uses `chat_format.split_prompt_answer`). So
``log(answer_ppl)`` on the validation file is comparable to the trainer's validation loss.

Aggregation is token-weighted: ``exp(sum of answer-token NLL / number of answer tokens)`` over all
samples (a per-sample mean of perplexities would let a few short answers dominate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hai_medqa.train.sft_data import IGNORE_INDEX, TokenizedDataset, tokenize_records


@torch.inference_mode()
def answer_nll(model, ds: TokenizedDataset, *, batch_size: int = 8, pad_token_id: int = 0,
               progress: bool = False) -> tuple[float, int]:
    """(sum of answer-token negative log-likelihoods in nats, number of answer tokens) over `ds`.

    Right-padded batches with an attention mask and no KV cache (a full forward pass per batch).
    Log-softmax runs in float32 whatever the model dtype.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(ds)), key=lambda i: -int(ds.lengths[i]))  # similar lengths together
    total_nll, total_tokens = 0.0, 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="answer perplexity", unit="batch", disable=not progress):
        width = max(int(ds.lengths[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            sample, _ = ds.sample(i)
            n = len(sample)
            ids[row, :n] = torch.as_tensor(sample, dtype=torch.long)
            labels[row, :n] = torch.as_tensor(ds.labels(i))
            mask[row, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        # token t is predicted from position t-1
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    return total_nll, total_tokens


def answer_perplexity(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    *,
    system_prompt: str,
    max_length: int = 2048,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity of the last (assistant) turn of each conversation.

    Returns ``{"answer_ppl", "answer_nll", "answer_tokens", "samples", "truncated"}``. Answers
    longer than `max_length` allows are cut as in training (their last token stays EOS).
    """
    records = list(enumerate(conversations, 1))
    ds = tokenize_records(records, tokenizer, max_length=max_length, overlong="truncate",
                          system_prompt=system_prompt, desc="tokenising references")
    if len(ds) == 0:
        raise ValueError("no reference answer fits in max_length; raise --max-length")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, n_tokens = answer_nll(model, ds, batch_size=batch_size, pad_token_id=pad, progress=progress)
    mean = nll / n_tokens
    return {
        "answer_ppl": math.exp(mean),
        "answer_nll": mean,
        "answer_tokens": n_tokens,
        "samples": len(ds),
        "truncated": ds.stats.get("truncated", 0),
    }
