"""Padding-free packing: the plan, the tensors, and exactness against running each sample alone - single-turn
samples and multi-turn ones whose every assistant turn carries loss."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from hai_medqa import chat_format
from hai_medqa.train.packing import (
    collate_packed,
    collate_padded,
    count_loss_tokens,
    group_into_steps,
    pack_in_order,
    packed_flex_block_mask,
    packed_mask_function,
    plan_epoch,
)
from hai_medqa.train.sft_data import IGNORE_INDEX, TokenizedDataset, tokenize_records

QA = [
    ("두통이 자주 생겨요. 예방법이 있나요?", "규칙적인 수면과 수분 섭취가 도움이 됩니다."),
    ("감기에 걸렸을 때 어떻게 하나요?", "충분히 쉬고 물을 많이 드세요. 열이 계속되면 병원에 가세요. " * 3),
    ("당뇨병 환자의 식단은?", "통곡물과 채소 위주로 드시고 단 음료는 피하세요."),
    ("고혈압 약은 언제 먹나요?", "의사가 정한 시간에 매일 같은 시각에 드세요. " * 2),
    ("천식 발작이 오면?", "흡입기를 사용하고 호전이 없으면 119에 연락하세요."),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer

    return load_tokenizer(tiny_exaone_dir)


# Consultations: every assistant turn (follow-up question and answer) carries loss.
MULTI = [
    [("배가 아파요", "복통은 어떤 부위에 발생하나요?"), ("오른쪽 아랫배요", "외과 진료를 받아 보세요.")],
    [("기침이 나요", "언제부터인가요?"), ("3주째요", "호흡기내과 진료를 받아 보세요."), ("고마워요", "몸조심하세요.")],
]


def _turns(pairs):
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


@pytest.fixture(scope="module")
def ds(tokenizer) -> TokenizedDataset:
    """Samples 0-4 single-turn (QA), 5-6 multi-turn (MULTI)."""
    records = [(i + 1, _turns([qa])) for i, qa in enumerate(QA)]
    records += [(len(QA) + i + 1, _turns(pairs)) for i, pairs in enumerate(MULTI)]
    return tokenize_records(records, tokenizer, max_length=4096, system_prompt=chat_format.DEFAULT_SYSTEM_PROMPT)


def test_multi_turn_samples_carry_loss_on_every_answer(ds, tokenizer):
    eot = tokenizer.convert_tokens_to_ids(chat_format.EOT)
    for i, pairs in zip((5, 6), MULTI, strict=True):
        labels = ds.labels(i)
        trained = labels[labels != IGNORE_INDEX].tolist()
        assert trained == [t for _, a in pairs for t in tokenizer(a, add_special_tokens=False)["input_ids"] + [eot]]
        assert int(ds.answer_lengths[i]) == len(trained)
        # a prompt (user turn) sits between the answers: the loss is not one contiguous block
        runs = np.flatnonzero(np.diff((labels != IGNORE_INDEX).astype(int)) == 1)
        assert len(runs) == len(pairs)


@pytest.fixture(scope="module")
def model(tiny_exaone_dir):
    """The tiny EXAONE stand-in through the real conversion path, fp32, in train mode (no dropout)."""
    from hai_medqa.model.load import load_causal_lm

    m = load_causal_lm(tiny_exaone_dir, quantize_4bit=False, dtype=torch.float32, attn_implementation="sdpa")
    m.config.use_cache = False
    return m.train()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens of one sample."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def test_pack_in_order_respects_budget_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, size=200)
    rows = pack_in_order(lengths, rng.permutation(200), budget=600)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 600 for r in rows)
    # next-fit: each row but the last was closed only because the next sample did not fit
    for r, nxt in zip(rows, rows[1:], strict=False):
        assert sum(lengths[i] for i in r) + lengths[nxt[0]] > 600
    with pytest.raises(ValueError, match="more than the row budget"):
        pack_in_order([10, 700], [0, 1], budget=600)


def test_plan_is_a_pure_function_of_seed_and_epoch():
    lengths = list(range(5, 105))
    a = plan_epoch(lengths, seed=1, epoch=0, tokens_per_micro_batch=300)
    assert a == plan_epoch(lengths, seed=1, epoch=0, tokens_per_micro_batch=300)
    assert a != plan_epoch(lengths, seed=1, epoch=1, tokens_per_micro_batch=300)
    assert a != plan_epoch(lengths, seed=2, epoch=0, tokens_per_micro_batch=300)
    padded = plan_epoch(lengths, seed=1, epoch=0, batching="padded", micro_batch_size=8)
    assert [len(b) for b in padded] == [8] * 12 + [4]


def test_group_into_steps_depends_only_on_the_global_batch():
    mbs = [[i] for i in range(11)]
    steps = group_into_steps(mbs, accumulation=2, world_size=2)
    assert [len(s) for s in steps] == [4, 4, 3]  # nothing dropped: the last step is shorter
    assert [mb for s in steps for mb in s] == mbs
    assert [len(s[r::2]) for s in steps for r in range(2)] == [2, 2, 2, 2, 2, 1]
    assert steps == group_into_steps(mbs, accumulation=4, world_size=1)  # same steps on one process
    assert [len(s[r::4]) for s in group_into_steps(mbs, accumulation=1, world_size=4)[-1:] for r in range(4)] == [
        1, 1, 1, 0]  # rank 3 has nothing in the last step (it joins with a zero-weight pass)


def test_collate_packed_layout(ds):
    row = collate_packed(ds, [0, 5, 2, 6], pad_to=1400, pad_token_id=0)
    lens = [int(ds.lengths[i]) for i in (0, 5, 2, 6)]
    pos = row["position_ids"][0].tolist()
    assert row["input_ids"].shape == row["labels"].shape == row["position_ids"].shape == (1, 1400)
    assert "attention_mask" not in row  # transformers derives per-sample attention from position_ids
    off = 0
    for i, n in zip((0, 5, 2, 6), lens, strict=True):
        assert pos[off:off + n] == list(range(n))
        assert row["labels"][0, off:off + n].tolist() == ds.labels(i).tolist()  # every answer's labels, in place
        off += n
    assert pos[off:] == list(range(1400 - off))  # filler: its own position run
    assert (row["labels"][0, off:] == IGNORE_INDEX).all() and (row["input_ids"][0, off:] == 0).all()
    assert count_loss_tokens(row) == sum(int(ds.answer_lengths[i]) for i in (0, 5, 2, 6))
    padded = collate_padded(ds, [5, 0])
    assert padded["labels"][0, :int(ds.lengths[5])].tolist() == ds.labels(5).tolist()
    assert count_loss_tokens(padded) == int(ds.answer_lengths[5] + ds.answer_lengths[0])


def test_packed_loss_equals_each_sample_alone(ds, model):
    idx = [0, 5, 1, 2, 6, 3, 4]
    row = collate_packed(ds, idx)
    with torch.no_grad():
        packed_logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
        unpacked_logits = model(input_ids=row["input_ids"], use_cache=False).logits[0]  # one long causal sequence
        off, worst_unpacked = 0, 0.0
        for i in idx:
            ids, _ = ds.sample(i)
            n = len(ids)
            labels = torch.from_numpy(ds.labels(i))
            alone_logits = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0]
            alone = per_sample_loss(alone_logits, labels)
            packed = per_sample_loss(packed_logits[off:off + n], labels)
            assert abs(packed.item() - alone.item()) <= 1e-5 * max(1.0, abs(alone.item())), i
            assert torch.allclose(packed_logits[off:off + n], alone_logits, atol=1e-5)
            worst_unpacked = max(worst_unpacked, (unpacked_logits[off:off + n] - alone_logits).abs().max().item())
            off += n
    assert worst_unpacked > 1e-2  # without the position-id restarts the samples do see each other


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_crosses_sample_boundaries(ds, model, attn):
    model.set_attn_implementation(attn)
    try:
        row = collate_packed(ds, [1, 3])
        n1 = int(ds.lengths[1])
        changed = row["input_ids"].clone()
        changed[0, :n1] = torch.randint(5, 200, (n1,), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = model(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits[0]
            b = model(input_ids=changed, position_ids=row["position_ids"], use_cache=False).logits[0]
            plain = model(input_ids=changed, use_cache=False).logits[0]
        assert (a[:n1] - b[:n1]).abs().max() > 1e-3  # sample 1 did change
        assert torch.equal(a[n1:], b[n1:]) or (a[n1:] - b[n1:]).abs().max() <= 1e-6  # sample 2 did not
        assert (a[n1:] - plain[n1:]).abs().max() > 1e-3  # ...which a plain causal row would not guarantee
    finally:
        model.set_attn_implementation("sdpa")


def test_fixed_length_filler_changes_nothing(ds, model):
    plain = collate_packed(ds, [0, 4])
    fixed = collate_packed(ds, [0, 4], pad_to=plain["input_ids"].shape[1] + 37)
    n = plain["input_ids"].shape[1]
    with torch.no_grad():
        a = model(input_ids=plain["input_ids"], position_ids=plain["position_ids"], use_cache=False).logits[0]
        b = model(input_ids=fixed["input_ids"], position_ids=fixed["position_ids"], use_cache=False).logits[0]
    assert torch.allclose(a, b[:n], atol=1e-5)


def test_step_loss_is_the_token_mean_however_the_step_is_batched(ds, model):
    """Summed per-micro-batch losses divided by the step's answer tokens: one packed row, two packed rows
    and a padded batch give the same loss and the same gradients (what Trainer.train_step relies on)."""
    n_items = torch.tensor(float(sum(int(ds.answer_lengths[i]) for i in range(7))))
    layouts = {
        "one_row": [collate_packed(ds, [0, 1, 2, 3, 4, 5, 6])],
        "two_rows": [collate_packed(ds, [3, 0, 6]), collate_packed(ds, [2, 4, 5, 1], pad_to=3000)],
        "padded": [collate_padded(ds, [0, 1, 5, 2]), collate_padded(ds, [3, 6, 4])],
    }
    params = [p for p in model.parameters() if p.ndim == 2][:3]
    results = {}
    for name, batches in layouts.items():
        model.zero_grad(set_to_none=True)
        total = 0.0
        for batch in batches:
            out = model(**batch, use_cache=False, num_items_in_batch=n_items)
            out.loss.backward()
            total += out.loss.item()
        results[name] = (total, [p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    ref_loss, ref_grads = results["one_row"]
    # the reference mean computed sample by sample
    with torch.no_grad():
        s = sum(per_sample_loss(model(input_ids=torch.from_numpy(ds.sample(i)[0].astype(np.int64))[None],
                                      use_cache=False).logits[0], torch.from_numpy(ds.labels(i))).item()
                for i in range(7))
    assert ref_loss == pytest.approx(s / n_items.item(), rel=1e-5)
    for name in ("two_rows", "padded"):
        loss, grads = results[name]
        assert loss == pytest.approx(ref_loss, rel=1e-5), name
        for g, r in zip(grads, ref_grads, strict=True):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-7), name


def test_startup_isolation_probe_reports_exact_sdpa():
    from hai_medqa.train.backends import packing_isolation_error

    assert packing_isolation_error("sdpa", torch.device("cpu")) < 1e-4


@pytest.mark.parametrize("rows", [([0, 5, 2, 6], 1400), ([1, 3], None), ([0], None)], ids=["filler", "two", "one"])
def test_host_built_mask_rule_is_the_one_transformers_derives(ds, rows):
    """The trainer builds flex attention's mask from the host's position ids (no wait for the GPU); its rule must be
    the one transformers derives from the device's ids: the same boolean mask, token by token (sample boundaries,
    the fixed-length filler's own run, a row of one sample)."""
    from torch.nn.attention.flex_attention import create_mask
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    indices, pad_to = rows
    pos = collate_packed(ds, indices, pad_to=pad_to)["position_ids"]
    length = pos.shape[1]
    cfg = LlamaConfig()
    cfg._attn_implementation = "sdpa"  # transformers materialises the same rule as a dense mask for sdpa
    want = create_causal_mask(config=cfg, inputs_embeds=torch.empty(1, length, 1), attention_mask=None,
                              past_key_values=None, position_ids=pos, allow_is_causal_skip=False)
    got = create_mask(packed_mask_function(pos), 1, None, length, length, device="cpu")
    assert want.shape == got.shape == (1, 1, length, length)
    assert torch.equal(want, got)
    if len(indices) > 1:  # really block-diagonal: the last token does not see the first sample
        assert not bool(got[0, 0, -1, 0])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HAI_TEST_COMPILE_SLOW") != "1",
                    reason="flex attention's mask builder compiles with inductor (~25 s on the 2-core machine); "
                           "HAI_TEST_COMPILE_SLOW=1")
def test_host_built_block_mask_gives_transformers_logits(ds, tiny_exaone_dir):
    """The ready BlockMask passed as attention_mask (what the trainer does with flex attention) gives the logits
    transformers gives when it builds the mask itself from the position ids."""
    from hai_medqa.model.load import load_causal_lm

    m = load_causal_lm(tiny_exaone_dir, quantize_4bit=False, dtype=torch.float32, attn_implementation="flex_attention")
    row = collate_packed(ds, [0, 5, 2, 6], pad_to=1408)
    with torch.no_grad():
        want = m(input_ids=row["input_ids"], position_ids=row["position_ids"], use_cache=False).logits
        mask = packed_flex_block_mask(row["position_ids"], row["position_ids"])
        got = m(input_ids=row["input_ids"], position_ids=row["position_ids"], attention_mask=mask, use_cache=False).logits
    assert torch.equal(want, got)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HAI_TEST_COMPILE_SLOW") != "1",
                    reason="flex attention's mask builder compiles with inductor (~25 s on the 2-core machine); "
                           "HAI_TEST_COMPILE_SLOW=1")
def test_trainer_hands_flex_attention_its_ready_mask(tmp_path, tiny_exaone_dir, sample_jsonl):
    """With flex attention (a GPU's: on a CPU the trainer picks sdpa, so the recorded choice is set here as a GPU run
    records it) the trainer's step inputs carry the BlockMask, and a flex-attention model's loss with it is the loss
    transformers computes from the position ids alone (forward only: flex attention has no CPU backward)."""
    from torch.nn.attention.flex_attention import BlockMask

    from hai_medqa.model.load import load_causal_lm
    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.trainer import Trainer

    cfg = TrainConfig(model=str(tiny_exaone_dir), train_file=str(sample_jsonl["train"]), val_file=None,
                      output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), profile="plain",
                      max_steps=1, tensorboard=False, tokens_per_micro_batch=1024,
                      pad_to_fixed_length=True)  # torch 2.13's CPU flex kernel fails to compile at odd lengths
    trainer = Trainer(cfg, {"profile", "pad_to_fixed_length"})
    trainer.setup()
    assert "attention_mask" not in trainer._step_inputs([[0, 1, 2]]).batches[0]  # sdpa: transformers builds it
    trainer.built = dataclasses.replace(trainer.built, attn_implementation="flex_attention")
    batch = trainer._step_inputs([[0, 1, 2]]).batches[0]
    assert isinstance(batch["attention_mask"], BlockMask)
    without = {k: v for k, v in batch.items() if k != "attention_mask"}
    flex = load_causal_lm(tiny_exaone_dir, quantize_4bit=False, dtype=torch.float32, attn_implementation="flex_attention")
    with torch.no_grad():
        a = flex(**batch, use_cache=False).loss
        b = flex(**without, use_cache=False).loss
    assert torch.equal(a, b)
