"""Answer-token perplexity of reference answers: how likely the model finds the human answer.

The tokens scored are exactly the training loss tokens of the last answer - the answer plus
``[|endofturn|]``, after the rendered prompt - because the samples are tokenised by the training code
itself (`hai_medqa.train.sft_data.tokenize_records` with ``train_turns="last"``). So
``log(answer_ppl)`` on a single-turn validation file is comparable to the trainer's validation loss
(which, on multi-turn records, also covers the earlier assistant turns).

Aggregation is token-weighted: ``exp(sum of answer-token NLL / number of answer tokens)`` over all
samples (a per-sample mean of perplexities would let a few short answers dominate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hai_medqa.chat_format import resolve_system_prompt
from hai_medqa.train.sft_data import IGNORE_INDEX, TokenizedDataset, tokenize_records

_HEAD_CHUNK = 2048  # answer positions per LM-head call (2048 x 102400 float32 logits = 0.8 GB)


@torch.inference_mode()
def answer_nll(model, ds: TokenizedDataset, *, batch_size: int = 8, pad_token_id: int = 0,
               progress: bool = False) -> tuple[float, int]:
    """(sum of answer-token negative log-likelihoods in nats, number of answer tokens) over `ds`.

    Right-padded batches with an attention mask and no KV cache. The LM head runs only on answer
    positions, and log-softmax in float32 whatever the model dtype.
    """
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA stays injected
    decoder, head = base.get_decoder(), base.get_output_embeddings()
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
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        # token t is predicted from position t-1; only answer positions go through the LM head, in
        # chunks, so a batch never materialises (batch x length x 102400) logits
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, y = hidden[:, :-1][keep], targets[keep]
        for start in range(0, len(y), _HEAD_CHUNK):
            logits = head(h[start : start + _HEAD_CHUNK]).float()
            total_nll += float(F.cross_entropy(logits, y[start : start + _HEAD_CHUNK], reduction="sum"))
        total_tokens += int(y.numel())
    return total_nll, total_tokens


def answer_perplexity(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    *,
    system_prompt: str | None,
    max_length: int = 2048,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Token-weighted perplexity of the last (assistant) turn of each conversation.

    Returns ``{"answer_ppl", "answer_nll", "answer_tokens", "samples", "truncated"}``. Answers
    longer than `max_length` allows are cut as in training (their last token stays EOS).
    `system_prompt` follows `chat_format.resolve_system_prompt` (None = the default, "" = none).
    """
    records = list(enumerate(conversations, 1))
    ds = tokenize_records(records, tokenizer, max_length=max_length, overlong="truncate", train_turns="last",
                          system_prompt=resolve_system_prompt(system_prompt), desc="tokenising references")
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
