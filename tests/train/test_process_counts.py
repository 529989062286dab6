"""Any number of processes, without launching them: the step grouping, the per-rank split, the
zero-weight join, the dropout seeds, the validation split and the resume rule for 1, 2, 4 and 8
processes (the 4- and 8-GPU machines were not available; tests/train/test_distributed.py runs 2 and 4
real gloo processes).

The contract, on 7 micro-batches m0..m6 and a global batch of 4 micro-batches per optimizer step::

    group_into_steps([m0..m6], accumulation=2, world_size=2)  # or 1 x 4, or 4 x 1: the same steps
        -> [[m0, m1, m2, m3], [m4, m5, m6]]
    Trainer._step, rank r of N takes step[r::N]:
        2 processes x 2:  rank 0: [m0, m2] then [m4, m6]   rank 1: [m1, m3] then [m5]
        4 processes x 1:  rank 0: [m0] then [m4]   rank 1: [m1] then [m5]   rank 2: [m2] then [m6]
                          rank 3: [m3] then [m4] with weight 0 (it only joins the all-reduce)
        1 process  x 4:   rank 0: [m0, m1, m2, m3] then [m4, m5, m6]

Every micro-batch is trained once per epoch with weight N (DDP averages over the N processes), its
loss divided by the answer tokens of the whole step, its dropout seeded by (seed, step, place in
step): so the sum over ranks is the same gradient whatever N.

The trainer's own `_step`, `dropout_seed` and `answer_tokens` run here on a stand-in that records
what `train_step` receives instead of running a model.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hai_medqa.run_folder import CHECKPOINTS_DIR
from hai_medqa.train import checkpoint
from hai_medqa.train.errors import TrainingError
from hai_medqa.train.packing import group_into_steps, plan_epoch
from hai_medqa.train.trainer import Trainer

WORLD_SIZES = (1, 2, 4, 8)
ACCUMULATIONS = (1, 2, 3, 4)


class RecordingRank:
    """One process as Trainer._step sees it: the real dealing code; `train_step` only records."""

    _step = Trainer._step
    _step_inputs = Trainer._step_inputs
    dropout_seed = Trainer.dropout_seed
    answer_tokens = staticmethod(Trainer.answer_tokens)

    def __init__(self, rank: int, world_size: int, answer_lengths, seed: int = 0):
        self.runtime = SimpleNamespace(rank=rank, world_size=world_size, on_gpu=False)
        self.cfg = SimpleNamespace(seed=seed, batching="packed")
        self.attn_implementation = "sdpa"
        self.train_ds = SimpleNamespace(answer_lengths=answer_lengths)
        self.state = SimpleNamespace(global_step=0)
        self.calls: list[dict] = []

    def collate(self, ds, indices, *, block_mask=False):
        return list(indices)  # the micro-batch itself stands in for its tensors

    def train_step(self, batches, n_loss, *, dropout_seeds, join_only, after_backward=None):
        self.calls.append({"step": self.state.global_step, "batches": batches, "n_loss": n_loss,
                           "seeds": dropout_seeds, "join_only": join_only})
        if after_backward is not None:  # the next step's inputs, collated as the trainer does mid-step
            after_backward()
        return {"loss": 0.0, "lr": 0.0, "grad_norm": 0.0}


def run_epoch(micro_batches, *, world_size: int, accumulation: int, answer_lengths, start_step: int = 0,
              steps_done: int = 0) -> list[RecordingRank]:
    """Every rank through the epoch's steps (from `steps_done` on), as the trainer's loop calls `_step`."""
    steps = group_into_steps(micro_batches, accumulation=accumulation, world_size=world_size)
    ranks = [RecordingRank(r, world_size, answer_lengths) for r in range(world_size)]
    ready = [None] * world_size  # each rank's next step, collated during this one (Trainer._loop)
    todo = steps[steps_done:]
    for i, step_mbs in enumerate(todo):
        next_mbs = todo[i + 1] if i + 1 < len(todo) else None
        for r, rank in enumerate(ranks):
            rank.state.global_step = start_step + i
            _, ready[r] = rank._step(step_mbs, ready[r], next_mbs)
            assert (ready[r] is None) == (next_mbs is None) and (ready[r] is None or ready[r].step_mbs == next_mbs)
    return ranks


def trained(ranks: list[RecordingRank]) -> list[tuple[int, tuple[int, ...], int]]:
    """(optimizer step, micro-batch, dropout seed) of every weighted forward, in a canonical order."""
    out = []
    for rank in ranks:
        for call in rank.calls:
            if not call["join_only"]:
                out += [(call["step"], tuple(mb), seed) for mb, seed in zip(call["batches"], call["seeds"], strict=True)]
    return sorted(out)


@pytest.fixture(scope="module")
def epoch():
    """A packed epoch of 61 samples of varied length: 23 micro-batches (a prime, so most
    (processes x accumulation) leave a short last step)."""
    rng = np.random.default_rng(4)
    lengths = rng.integers(40, 400, size=61)
    answer_lengths = lengths // 3
    plan = plan_epoch(lengths, seed=0, epoch=0, tokens_per_micro_batch=800)
    assert len(plan) == 23
    return plan, answer_lengths


def test_the_docstring_example():
    mbs = [[i] for i in range(7)]
    steps = group_into_steps(mbs, accumulation=2, world_size=2)
    assert steps == [[[0], [1], [2], [3]], [[4], [5], [6]]]
    assert steps == group_into_steps(mbs, accumulation=4, world_size=1) == group_into_steps(
        mbs, accumulation=1, world_size=4)
    ans = np.ones(7, dtype=np.int64)
    two = run_epoch(mbs, world_size=2, accumulation=2, answer_lengths=ans)
    assert [[c["batches"] for c in r.calls] for r in two] == [[[[0], [2]], [[4], [6]]], [[[1], [3]], [[5]]]]
    four = run_epoch(mbs, world_size=4, accumulation=1, answer_lengths=ans)
    assert [[(c["batches"], c["join_only"]) for c in r.calls] for r in four] == [
        [([[0]], False), ([[4]], False)], [([[1]], False), ([[5]], False)],
        [([[2]], False), ([[6]], False)], [([[3]], False), ([[4]], True)]]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("accumulation", ACCUMULATIONS)
def test_every_micro_batch_is_trained_exactly_once_per_epoch(epoch, world_size, accumulation):
    plan, ans = epoch
    ranks = run_epoch(plan, world_size=world_size, accumulation=accumulation, answer_lengths=ans)
    steps = group_into_steps(plan, accumulation=accumulation, world_size=world_size)
    n_steps = -(-len(plan) // (accumulation * world_size))
    assert len(steps) == n_steps
    done = Counter(mb for _, mb, _ in trained(ranks))
    assert done == Counter(tuple(mb) for mb in plan)  # each once, none dropped, none twice
    for rank in ranks:
        # one train_step (one gradient all-reduce) per optimizer step on every rank, never an empty one
        assert [c["step"] for c in rank.calls] == list(range(n_steps))
        assert all(1 <= len(c["batches"]) <= accumulation for c in rank.calls)
    for i, step_mbs in enumerate(steps):
        calls = [rank.calls[i] for rank in ranks]
        # every rank divides by the answer tokens of the whole step, not of its own share
        assert {c["n_loss"] for c in calls} == {int(sum(ans[j] for mb in step_mbs for j in mb))}
        shares = [len(c["batches"]) for c in calls if not c["join_only"]]
        assert max(shares) - min(shares) <= 1  # balanced: rank r takes step[r::N]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a_short_last_step_leaves_the_last_ranks_a_zero_weight_join(epoch, world_size):
    """23 micro-batches with accumulation 1: the last step holds 23 mod N of them; ranks past that
    run the step's first micro-batch with weight 0, only to take part in the all-reduce."""
    plan, ans = epoch
    ranks = run_epoch(plan, world_size=world_size, accumulation=1, answer_lengths=ans)
    last = group_into_steps(plan, accumulation=1, world_size=world_size)[-1]
    assert len(last) == (len(plan) % world_size or world_size)
    joined = [r.runtime.rank for r in ranks if r.calls[-1]["join_only"]]
    assert joined == list(range(len(last), world_size))
    for r in joined:
        assert ranks[r].calls[-1]["batches"] == [last[0]]
    assert not any(c["join_only"] for r in ranks for c in r.calls[:-1])  # only ever in the last step


@pytest.mark.parametrize("global_batch", [1, 2, 4, 8])
def test_the_same_global_batch_takes_the_same_steps_on_any_process_count(epoch, global_batch):
    """8 GPUs x accumulation 1 == 4 x 2 == 2 x 4 == 1 x 8: the same steps as index lists, and the same
    micro-batches with the same dropout seeds in each step."""
    plan, ans = epoch
    splits = [(n, global_batch // n) for n in WORLD_SIZES if global_batch % n == 0]
    steps = {split: group_into_steps(plan, accumulation=split[1], world_size=split[0]) for split in splits}
    work = {split: trained(run_epoch(plan, world_size=split[0], accumulation=split[1], answer_lengths=ans))
            for split in splits}
    reference = splits[0]
    assert len(splits) == WORLD_SIZES.index(global_batch) + 1
    for split in splits:
        assert steps[split] == steps[reference], split
        assert work[split] == work[reference], split


def test_different_global_batches_take_different_steps(epoch):
    plan, _ = epoch
    assert group_into_steps(plan, accumulation=1, world_size=4) != group_into_steps(plan, accumulation=1,
                                                                                    world_size=8)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_validation_micro_batches_are_split_once_over_the_ranks(world_size):
    """Trainer.evaluate: rank r evaluates plan[r::N] and the sums are reduced; with fewer micro-batches
    than ranks the last ranks evaluate nothing and only take part in the reduction."""
    plan = [[i] for i in range(5)]
    shares = [plan[r::world_size] for r in range(world_size)]
    assert sorted(mb for share in shares for mb in share) == plan
    assert [len(s) for s in shares] == {1: [5], 2: [3, 2], 4: [2, 1, 1, 1], 8: [1] * 5 + [0] * 3}[world_size]


def _checkpoint(run, *, step: int, world_size: int, accumulation: int):
    ckpt = run / CHECKPOINTS_DIR / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / checkpoint.TRAINER_STATE).write_text(json.dumps({"global_step": step, "world_size": world_size}))
    return run


@pytest.mark.parametrize("saved", [(w, a) for w in WORLD_SIZES for a in (1, 2, 8)])
def test_resume_accepts_exactly_the_process_counts_that_keep_the_global_batch(tmp_path, saved):
    saved_world, saved_acc = saved
    run = _checkpoint(tmp_path, step=3, world_size=saved_world, accumulation=saved_acc)
    for world in WORLD_SIZES:
        for acc in (1, 2, 3, 4, 8, 16, 64):
            if acc * world == saved_acc * saved_world:
                checkpoint._check_global_batch(run, saved_acc, acc, world)
            else:
                with pytest.raises(TrainingError, match="micro-batches per optimizer step") as err:
                    checkpoint._check_global_batch(run, saved_acc, acc, world)
                total = saved_acc * saved_world
                hint = (f"set --gradient-accumulation-steps {total // world}" if total % world == 0
                        else f"use a number of processes that divides {total}")
                assert hint in str(err.value)


@pytest.mark.parametrize(("before", "after"), [((8, 1), (1, 8)), ((4, 1), (2, 2)), ((1, 8), (8, 1)),
                                               ((2, 4), (4, 2))])
def test_resuming_mid_epoch_on_another_process_count_trains_the_remaining_steps_unchanged(epoch, before, after):
    """Stop after 1 step on `before` processes, continue on `after`: the union is the uninterrupted run."""
    plan, ans = epoch
    world, acc = before
    whole = trained(run_epoch(plan, world_size=world, accumulation=acc, answer_lengths=ans))
    first = trained(run_epoch(plan[:world * acc], world_size=world, accumulation=acc, answer_lengths=ans))
    rest = trained(run_epoch(plan, world_size=after[0], accumulation=after[1], answer_lengths=ans,
                             start_step=1, steps_done=1))
    assert sorted(first + rest) == whole


# ------------------------------------------------------------------ validation: one forward count for every rank
class CountingLM(torch.nn.Module):
    """A causal LM as Trainer.evaluate uses it (forward through the output head once), counting its
    forwards: under DDP or FSDP every forward of the wrapped model can be a collective."""

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(4, 11)
        self.forwards = 0

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, use_cache=False, **kwargs):
        self.forwards += 1
        self.lm_head(torch.zeros(*input_ids.shape, 4))


class EvaluatingRank:
    """One process as Trainer.evaluate sees it: the real method on a counting model."""

    evaluate = Trainer.evaluate
    peft_model = Trainer.peft_model
    answer_tokens = staticmethod(Trainer.answer_tokens)

    def __init__(self, rank: int, world_size: int, lengths):
        lengths = np.asarray(lengths)
        self.val_ds = SimpleNamespace(lengths=lengths, answer_lengths=lengths // 2)
        self.cfg = SimpleNamespace(batching="packed", tokens_per_micro_batch=100, micro_batch_size=1)
        self.runtime = SimpleNamespace(rank=rank, world_size=world_size, device=torch.device("cpu"),
                                       is_main=rank == 0,
                                       accelerator=SimpleNamespace(unwrap_model=lambda m: m,
                                                                   reduce=lambda t, reduction: t))
        self.model = CountingLM()

    def collate(self, ds, indices):
        n = int(sum(ds.lengths[i] for i in indices))
        return {"input_ids": torch.ones(1, n, dtype=torch.long), "labels": torch.ones(1, n, dtype=torch.long)}


# Found by this test (2026-11-30): rank r ran plan[r::N] alone, so with fewer validation micro-batches than
# processes some ranks ran no forward; DDP's forward broadcasts buffers (a collective), and a 4-process gloo
# run with one validation micro-batch hung at its first evaluation. Under FSDP every forward all-gathers.
@pytest.mark.parametrize(("world_size", "n_micro_batches"), [(2, 5), (4, 1), (4, 5), (8, 5)])
def test_every_rank_runs_the_same_number_of_validation_forwards(world_size, n_micro_batches):
    lengths = [100] * n_micro_batches  # one full 100-token micro-batch each
    ranks = [EvaluatingRank(r, world_size, lengths) for r in range(world_size)]
    for rank in ranks:
        rank.evaluate()
    assert sum(r.model.forwards for r in ranks) >= n_micro_batches  # every micro-batch evaluated
    assert len({r.model.forwards for r in ranks}) == 1, [r.model.forwards for r in ranks]
