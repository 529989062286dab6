"""SIGTERM mid-run saves a checkpoint; --resume then finishes exactly like a run never interrupted.
Also: a NaN loss stops the run with a clear message and leaves the last good checkpoint intact."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from hai_medqa.config import load_config
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.errors import TrainingError
from hai_medqa.train.trainer import Trainer, run_training

STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model trains fastest on one thread (tests run beside other jobs on a 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def make_cfg(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    cache = tmp_path_factory.mktemp("resume_cache")

    def make(out, **extra):
        overrides = {"model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]), "val_file": "null",
                     "output_dir": str(out), "cache_dir": str(cache), "max_steps": str(STEPS), "save_steps": "3",
                     "gradient_accumulation_steps": "2", "tokens_per_micro_batch": "1024", "tensorboard": "false",
                     "lora_dropout": "0.1",  # dropout draws random numbers: the RNG state must be restored too
                     "optimizer": "paged_adamw_8bit",  # the default optimizer; its state must survive resume
                     **{k: str(v) for k, v in extra.items()}}
        return load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", overrides)

    return make


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def test_sigterm_then_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    straight = run_training(*make_cfg(tmp_path / "straight"))
    assert straight["status"] == "completed" and straight["global_step"] == STEPS
    assert straight["optimizer"] == "paged_adamw_8bit"  # bitsandbytes' optimizer runs on CPU too

    def send_sigterm(trainer, rec):
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal through the real handler

    out = tmp_path / "interrupted"
    first = run_training(*make_cfg(out), callbacks=[send_sigterm])
    assert first["status"] == "interrupted" and first["global_step"] == 5
    assert (out / "checkpoints" / "step_0000005" / "optimizer.pt").is_file()
    assert not (out / "adapter_last").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # our handler was removed again

    with pytest.raises(TrainingError, match="already holds checkpoints .* pass --resume"):
        run_training(*make_cfg(out))  # a fresh start must not clobber the interrupted run

    resumed = run_training(*make_cfg(out, resume="true"))
    assert resumed["status"] == "completed" and resumed["global_step"] == STEPS

    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["batch_digest"] for r in b] == [r["batch_digest"] for r in a]  # same data order
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-9, abs=1e-12)  # same schedule
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=2e-5)  # same dropout, same optimizer
    wa = load_file(str(tmp_path / "straight" / "adapter_last" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter_last" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert "tokenisation cache hit" in (out / "train.log").read_text(encoding="utf-8")


def test_resume_with_lora_stepped_as_one_flat_tensor_matches_uninterrupted_run(make_cfg, tmp_path):
    """At rank 64 most of the tiny model's LoRA tensors are whole 256-element blocks of at least 4,096 elements, so
    the optimizer steps them as one flat tensor (flat_optimizer.py) and the rest (k/v's B, 2,048 elements: 32-bit
    states in bitsandbytes) on their own; the checkpoint (per-tensor format) must resume that exactly."""
    extra = {"lora_r": 64, "lora_alpha": 128}
    seen: dict[str, int] = {}

    def note(trainer, rec):
        seen.update(members=len(trainer.optimizer.members), loners=len(trainer.optimizer.loners))

    run_training(*make_cfg(tmp_path / "straight", **extra), callbacks=[note])
    assert seen["members"] >= 2 and seen["loners"] >= 1, seen  # both paths in one run

    def send_sigterm(trainer, rec):
        if rec["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "interrupted"
    assert run_training(*make_cfg(out, **extra), callbacks=[send_sigterm])["status"] == "interrupted"
    assert run_training(*make_cfg(out, resume="true", **extra))["status"] == "completed"
    a, b = metrics(tmp_path / "straight"), metrics(out)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=2e-5)
    wa = load_file(str(tmp_path / "straight" / "adapter_last" / "adapter_model.safetensors"))
    wb = load_file(str(out / "adapter_last" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_resume_refuses_a_changed_recipe_or_data(make_cfg, sample_jsonl, tmp_path):
    out = tmp_path / "run"
    cfg, explicit = make_cfg(out, max_steps=2, save_steps=1)
    run_training(cfg, explicit)
    with pytest.raises(TrainingError, match=r"config differs .* lora_r"):
        run_training(*make_cfg(out, max_steps=4, save_steps=1, resume="true", lora_r=8))
    other = tmp_path / "other.jsonl"
    other.write_text(sample_jsonl["train"].read_text(encoding="utf-8").replace("두통", "편두통", 1), encoding="utf-8")
    with pytest.raises(TrainingError, match=r"other\.jsonl is not the file the checkpointed run trained on"):
        run_training(*make_cfg(out, max_steps=2, save_steps=1, resume="true", train_file=str(other)))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(*make_cfg(out, save_steps=2))
    trainer.setup()

    def poison_after_step_2(tr, rec):
        if rec["step"] == 2:  # from step 3 on, the embeddings output NaN
            tr.peft_model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))

    trainer.callbacks.append(poison_after_step_2)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3: stopping \(the last good checkpoint is .*step_0000002\)"):
        trainer.train()
    good = load_file(str(out / "checkpoints" / "step_0000002" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert not (out / "adapter_last").exists()
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "non_finite_loss" and summary["global_step"] == 2


def test_validation_loss_is_the_same_packed_padded_or_fixed_length(make_cfg, sample_jsonl, tmp_path):
    """The trainer's own collation and loss reduction, through the 4-bit model with LoRA: batching
    choices must not change the number."""
    import dataclasses

    cfg, explicit = make_cfg(tmp_path / "eval", val_file=str(sample_jsonl["validation"]), max_eval_samples=12)
    trainer = Trainer(cfg, explicit)
    trainer.setup()
    packed = trainer.evaluate()["val_loss"]
    trainer.cfg = dataclasses.replace(cfg, pad_to_fixed_length=True)
    fixed = trainer.evaluate()["val_loss"]
    trainer.cfg = dataclasses.replace(cfg, batching="padded", micro_batch_size=5)
    padded = trainer.evaluate()["val_loss"]
    assert fixed == pytest.approx(packed, rel=1e-5)
    assert padded == pytest.approx(packed, rel=1e-5)
    assert 3.0 < packed < 12.0  # a random tiny model: near log(vocab), not 0 or nan


def test_evaluation_does_not_change_training_gradients(make_cfg, sample_jsonl, tmp_path):
    """bitsandbytes repacks 4-bit weights into a CPU inference layout (no backward) the first time a
    layer runs in eval mode without grad; training after an evaluation must get the same gradients."""
    cfg, explicit = make_cfg(tmp_path / "grads", val_file=str(sample_jsonl["validation"]), max_eval_samples=4,
                             lora_dropout=0.0)
    trainer = Trainer(cfg, explicit)
    trainer.setup()
    batch = trainer.collate(trainer.train_ds, [0, 1])
    n = torch.tensor(float(trainer.answer_tokens(trainer.train_ds, [[0, 1]])))

    def grads():
        trainer.model.train()
        trainer.model.zero_grad(set_to_none=True)
        trainer.model(**batch, use_cache=False, num_items_in_batch=n).loss.backward()
        return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}

    with torch.no_grad():  # non-zero LoRA B so gradients flow through every layer's input
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    before = grads()
    trainer.evaluate()
    after = grads()
    for name in before:
        assert torch.allclose(before[name], after[name], rtol=1e-5, atol=1e-8), name


def test_every_way_out_of_evaluation_leaves_the_model_training(make_cfg, sample_jsonl, tmp_path):
    """train_step skips model.train() when the model is already training (walking ~2,700 modules cost a 7.8B step
    several ms of idle GPU), so evaluation, a cut-short evaluation and the sample answers must each put every
    module back in training mode themselves."""
    from types import SimpleNamespace

    from hai_medqa.train import sample_answers

    cfg, explicit = make_cfg(tmp_path / "modes", val_file=str(sample_jsonl["validation"]), max_eval_samples=4,
                             sample_questions=1, sample_max_new_tokens=2)
    trainer = Trainer(cfg, explicit)
    trainer.setup()

    def all_training() -> bool:
        return all(m.training for m in trainer.model.modules())

    assert all_training()
    assert trainer.evaluate() is not None and all_training()
    cut = SimpleNamespace(requested=lambda rt: True, seen=lambda: True, describe=lambda: "a test signal")
    assert trainer.evaluate(cut) is None and all_training()
    sample_answers.at_evaluation(trainer)
    assert all_training()
    assert (trainer.out / "samples.jsonl").exists()  # the answers really ran (in eval mode)


def test_early_stopping_keeps_best_and_last_adapters(make_cfg, sample_jsonl, tmp_path):
    out = tmp_path / "early"
    summary = run_training(*make_cfg(out, val_file=str(sample_jsonl["validation"]), max_eval_samples=6,
                                     learning_rate=1e-9, eval_steps=2, early_stopping_patience=2,
                                     early_stopping_min_delta=1e-3))  # a frozen model never improves by 1e-3
    assert summary["status"] == "early_stopped"
    assert summary["global_step"] == 6 and summary["best_step"] == 2
    assert [r["step"] for r in metrics(out) if "val_loss" in r] == [2, 4, 6]
    best = json.loads((out / "adapter_best" / "hai_medqa_training.json").read_text(encoding="utf-8"))
    last = json.loads((out / "adapter_last" / "hai_medqa_training.json").read_text(encoding="utf-8"))
    assert (best["step"], last["step"]) == (2, 6)
    assert best["val_loss"] == pytest.approx(summary["best_val_loss"])


def test_python_heap_is_frozen_while_training_and_thawed_after_every_way_out(make_cfg, tmp_path, monkeypatch):
    """Full garbage collections walk every live object while the GPU waits for the host; the trainer freezes the
    heap (gc.freeze) for its loop, including what the first step made (compiled graphs on a GPU), and thaws it
    when the loop ends however it ends, so a process that goes on can collect the trainer's cycles later."""
    import gc

    from hai_medqa.train import trainer as trainer_module

    assert gc.get_freeze_count() == 0
    freezes = []
    real_freeze = trainer_module.freeze_python_heap
    monkeypatch.setattr(trainer_module, "freeze_python_heap", lambda when: freezes.append(when) or real_freeze(when))
    counts = []
    trainer = Trainer(*make_cfg(tmp_path / "ok", max_steps=3))
    trainer.setup()
    trainer.callbacks.append(lambda tr, rec: counts.append(gc.get_freeze_count()))
    trainer.train()
    assert len(counts) == 3 and all(n > 0 for n in counts), counts
    assert freezes == ["before the first step", "after the first step"]  # again with what step 1 made
    assert gc.get_freeze_count() == 0, "the heap stayed frozen after training"

    # a recompile after the first step (here a new row length at step 2) made ~77,500 long-lived objects that
    # every later full collection walked: the step that compiled freezes them too
    from hai_medqa.train import compile_regions

    monkeypatch.setenv(compile_regions.BACKEND_ENV, "aot_eager")
    freezes.clear()
    unfrozen = []
    trainer = Trainer(*make_cfg(tmp_path / "recompiled", max_steps=4, gradient_accumulation_steps=1,
                                compile_layers=True, gradient_checkpointing=False))
    trainer.setup()
    trainer.callbacks.append(lambda tr, rec: gc.collect() or unfrozen.append(len(gc.get_objects())))
    trainer.train()
    assert [w for w in freezes if "torch.compile made new code" in w], freezes  # the path ran
    assert max(unfrozen) < 2_000, unfrozen
    assert gc.get_freeze_count() == 0

    # a loop that ends in an error thaws too
    trainer = Trainer(*make_cfg(tmp_path / "nan", max_steps=3))
    trainer.setup()
    trainer.callbacks.append(lambda tr, rec: tr.peft_model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: o * float("nan")))
    with pytest.raises(TrainingError):
        trainer.train()
    assert gc.get_freeze_count() == 0

    # a process that froze objects itself before the loop keeps its freeze (the loop passes what it found)
    from hai_medqa.train.runtime import thaw_python_heap

    gc.freeze()
    try:
        frozen_before = gc.get_freeze_count()
        real_freeze("in the test")
        thaw_python_heap(frozen_before)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_nf4_in_place_lora_kernel_trains_like_the_fused_one(make_cfg, tmp_path):
    """`lora_kernel: fused_nf4` through the whole trainer (config -> model build -> steps): the first step's loss
    is the fused kernel's bit for bit (same forward), the later ones agree to rounding (gradients summed in
    another order), and the adapter saves in the same format."""
    fused = run_training(*make_cfg(tmp_path / "fused", max_steps=2, lora_dropout=0.0))
    nf4 = run_training(*make_cfg(tmp_path / "nf4", max_steps=2, lora_dropout=0.0, lora_kernel="fused_nf4"))
    a = [r for r in metrics(tmp_path / "fused") if "loss" in r]
    b = [r for r in metrics(tmp_path / "nf4") if "loss" in r]
    assert fused["status"] == nf4["status"] == "completed" and len(a) == len(b) == 2
    assert a[0]["loss"] == b[0]["loss"]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(x["loss"]), (x["loss"], y["loss"])
    assert sorted(load_file(str(tmp_path / "nf4" / "adapter_last" / "adapter_model.safetensors"))) == sorted(
        load_file(str(tmp_path / "fused" / "adapter_last" / "adapter_model.safetensors")))
