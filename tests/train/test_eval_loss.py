"""Evaluation never builds the [tokens x vocab] logits (issue 17: `lean` went from 9.5 to 29.2 GiB at
the first evaluation), and its chunked loss is the full-logits loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hai_medqa.config import load_config
from hai_medqa.train import eval_loss
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.packing import plan_epoch
from hai_medqa.train.trainer import Trainer

CHUNK = 16


class LargestLogits(TorchDispatchMode):
    """Records the largest tensor any (non-view) operation creates whose last dimension is the vocab."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.largest = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab_size:
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def trainer(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_memory") / "run"
    cfg, explicit = load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", {
        "model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]),
        "val_file": str(sample_jsonl["validation"]), "max_eval_samples": "12", "output_dir": str(out),
        "cache_dir": str(out.parent / "cache"), "tokens_per_micro_batch": "1024", "tensorboard": "false"})
    trainer = Trainer(cfg, explicit)
    trainer.setup()
    with torch.no_grad():  # non-zero LoRA B: the adapter takes part in the loss
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return trainer


def full_logits_val_loss(trainer) -> float:
    """The loss as transformers computes it from the whole batch's logits (the pre-fix evaluation)."""
    cfg, model = trainer.cfg, trainer.model
    plan = plan_epoch(trainer.val_ds.lengths, seed=0, epoch=0, batching=cfg.batching, shuffle=False,
                      tokens_per_micro_batch=cfg.tokens_per_micro_batch, micro_batch_size=cfg.micro_batch_size)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for mb in plan:
            out = model(**trainer.collate(trainer.val_ds, mb), use_cache=False, num_items_in_batch=torch.tensor(1.0))
            total += float(out.loss.double())
            count += trainer.answer_tokens(trainer.val_ds, [mb])
    model.train()
    return total / count


@pytest.mark.parametrize("batching", ["packed", "padded"])
def test_evaluation_holds_one_chunk_of_logits_and_gives_the_full_logits_loss(trainer, monkeypatch, batching):
    trainer.cfg = dataclasses.replace(trainer.cfg, batching=batching, micro_batch_size=5)
    vocab = trainer.peft_model.config.vocab_size
    reference = full_logits_val_loss(trainer)
    with LargestLogits(vocab) as watch:  # the reference's own logits: what evaluation used to build
        full_logits_val_loss(trainer)
    assert watch.largest > 20 * CHUNK * vocab  # many answer tokens per micro-batch: chunking matters

    monkeypatch.setattr(eval_loss, "CHUNK_TOKENS", CHUNK)
    with LargestLogits(vocab) as watch:
        got = trainer.evaluate()["val_loss"]
    assert 0 < watch.largest <= CHUNK * vocab  # logits were made, one chunk at a time
    assert got == pytest.approx(reference, rel=1e-5)
    assert trainer.model.training  # back in training mode


def test_chunked_nll_equals_transformers_loss_on_a_padded_batch():
    """The shift and the masking as transformers' ForCausalLMLoss, chunks of every size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=101)).eval()
    ids = torch.randint(0, 101, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # prompts
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        want = float(model(**batch, num_items_in_batch=torch.tensor(1.0)).loss)
    for chunk in (1, 7, 1000):
        got = float(eval_loss.summed_nll(model, batch, head=eval_loss.output_head(model), chunk_tokens=chunk))
        assert got == pytest.approx(want, rel=1e-6), chunk
    assert "forward" not in model.lm_head.__dict__  # the head's own forward is back
    assert model(input_ids=ids).logits.shape == (3, 20, 101)
