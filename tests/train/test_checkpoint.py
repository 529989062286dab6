"""Checkpoints without a Trainer: save/restore round-trips a tiny LoRA model's optimizer, schedule,
RNG and progress exactly; old checkpoints are pruned; resuming refuses what would change the run."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from hai_medqa.config import save_config
from hai_medqa.io_utils import sha256_file, write_json
from hai_medqa.run_folder import TRAINER_STATE, checkpoint_dir, list_checkpoints, read_training_record
from hai_medqa.train import checkpoint
from hai_medqa.train.checkpoint import TrainState
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.errors import TrainingError
from hai_medqa.train.runtime import detect_runtime


@pytest.fixture(scope="module")
def runtime():
    return detect_runtime()  # one CPU process: rank 0 of 1, no FSDP


def tiny_lora(lora_seed: int = 0):
    """A 2-layer random Llama (the same frozen base every time, as a model file would give) with LoRA
    on q/v initialised from `lora_seed` (dropout on, so training draws random numbers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=97))
    torch.manual_seed(lora_seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def recipe(lora_seed: int = 0):
    from transformers import get_scheduler

    model = tiny_lora(lora_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler) -> float:
    ids = torch.randint(0, 97, (1, 12))  # draws from the global RNG, like dropout does
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_save_then_restore_continues_exactly(tmp_path, runtime):
    checkpoint.seed_everything(7)
    model, optimizer, scheduler = recipe()
    for _ in range(3):
        step(model, optimizer, scheduler)
    state = TrainState(global_step=3, epoch=0, step_in_epoch=3, tokens_seen=36, best_val_loss=4.5, best_step=3)
    folder = checkpoint.save(tmp_path, state, model=model, optimizer=optimizer, scheduler=scheduler,
                             runtime=runtime, keep=2)
    assert folder == checkpoint_dir(tmp_path, 3) and list_checkpoints(tmp_path) == [folder]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "rng_state_0.pt",
        "scheduler.pt", TRAINER_STATE])
    assert json.loads((folder / TRAINER_STATE).read_text())["world_size"] == 1
    lr_at_save = scheduler.get_last_lr()
    # the uninterrupted run goes on for two more steps
    expected_losses = [step(model, optimizer, scheduler) for _ in range(2)]
    expected = lora_weights(model)

    # a new process: another LoRA init, other RNG states; the checkpoint brings back everything
    checkpoint.seed_everything(123)
    model2, optimizer2, scheduler2 = recipe(lora_seed=1)
    assert checkpoint.load_adapter_weights(model2, tmp_path, runtime.device) == folder
    restored = checkpoint.restore(tmp_path, model=model2, optimizer=optimizer2, scheduler=scheduler2,
                                  runtime=runtime, seed=0)
    assert restored == state
    assert scheduler2.get_last_lr() == lr_at_save and scheduler2.last_epoch == 3
    assert [step(model2, optimizer2, scheduler2) for _ in range(2)] == expected_losses
    got = lora_weights(model2)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_rng_states_are_those_at_save_time(tmp_path, runtime):
    checkpoint.seed_everything(3)
    model, optimizer, scheduler = recipe()
    step(model, optimizer, scheduler)
    checkpoint.save(tmp_path, TrainState(global_step=1), model=model, optimizer=optimizer, scheduler=scheduler,
                    runtime=runtime, keep=1)
    after_save = draws()
    checkpoint.seed_everything(99)
    checkpoint.restore(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, runtime=runtime, seed=3)
    assert draws() == after_save


def test_a_process_the_checkpoint_did_not_have_starts_seeded(tmp_path, runtime):
    """Resuming on more processes: a rank without an RNG file is seeded as a fresh run seeds it."""
    model, optimizer, scheduler = recipe()
    checkpoint.save(tmp_path, TrainState(global_step=2), model=model, optimizer=optimizer, scheduler=scheduler,
                    runtime=runtime, keep=1)
    (checkpoint_dir(tmp_path, 2) / "rng_state_0.pt").unlink()
    checkpoint.restore(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler, runtime=runtime, seed=11)
    got = draws()
    checkpoint.seed_everything(11 + runtime.rank)
    assert got == draws()


def test_only_the_newest_checkpoints_stay(tmp_path, runtime):
    model, optimizer, scheduler = recipe()
    for s in (2, 4, 6, 8):
        checkpoint.save(tmp_path, TrainState(global_step=s), model=model, optimizer=optimizer, scheduler=scheduler,
                        runtime=runtime, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000006", "step_0000008"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]


def test_adapter_folder_carries_tokenizer_and_training_record(tmp_path, runtime, tiny_exaone_dir):
    from hai_medqa.model.load import load_tokenizer
    from hai_medqa.run_folder import TrainingRecord

    model, _, _ = recipe()
    record = TrainingRecord(base_model="some/base", step=5, val_loss=1.25, system_prompt="")
    folder = checkpoint.save_adapter(tmp_path / "adapter_best", model=model, tokenizer=load_tokenizer(tiny_exaone_dir),
                                     record=record, runtime=runtime)
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert read_training_record(folder) == record


def test_resume_decisions(tmp_path, runtime):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"--resume: no checkpoint to resume in .*run.checkpoints"):
        checkpoint.decide_resume(run, resume=True)  # nothing to resume: an error naming the folder (issue 15)
    assert checkpoint.decide_resume(run, resume=False) is False
    model, optimizer, scheduler = recipe()
    checkpoint.save(run, TrainState(global_step=4), model=model, optimizer=optimizer, scheduler=scheduler,
                    runtime=runtime, keep=1)
    with pytest.raises(TrainingError, match=r"already holds checkpoints \(step_0000004\); pass --resume"):
        checkpoint.decide_resume(run, resume=False)
    assert checkpoint.decide_resume(run, resume=True) is True


def test_check_resumable_refuses_another_recipe_data_or_global_batch(tmp_path, runtime):
    run = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    cfg = TrainConfig(train_file=str(data), output_dir=str(run), gradient_accumulation_steps=2)
    model, optimizer, scheduler = recipe()
    checkpoint.save(run, TrainState(global_step=1), model=model, optimizer=optimizer, scheduler=scheduler,
                    runtime=runtime, keep=1)
    save_config(cfg, run / "resolved_config.yaml")
    write_json(run / "run_info.json", {"data": {"train_file": {"sha256": sha256_file(data)}}})
    checkpoint.check_resumable(run, dataclasses.replace(cfg, logging_steps=1, resume=True), world_size=1)  # may change
    with pytest.raises(TrainingError, match=r"config differs .* lora_r \(e\.g\. lora_r: 16 -> 8\)"):
        checkpoint.check_resumable(run, dataclasses.replace(cfg, lora_r=8), world_size=1)
    with pytest.raises(TrainingError, match=r"took 2 micro-batches .* set --gradient-accumulation-steps 1"):
        checkpoint.check_resumable(run, cfg, world_size=2)
    checkpoint.check_resumable(run, dataclasses.replace(cfg, gradient_accumulation_steps=1), world_size=2)
    data.write_text('{"instruction": "q2", "output": "a"}\n', encoding="utf-8")
    with pytest.raises(TrainingError, match=r"train\.jsonl is not the file the checkpointed run trained on"):
        checkpoint.check_resumable(run, cfg, world_size=1)


# ------------------------------------------------------------------ the adapter holds what the model trains (issue 18)
def test_adapter_tensors_are_those_peft_saves(runtime):
    """Chosen from the trainable parameters, the adapter's tensors and names are PEFT's own."""
    from peft import get_peft_model_state_dict

    model, optimizer, scheduler = recipe()
    step(model, optimizer, scheduler)
    ours, peft = checkpoint.adapter_state_dict(model, runtime), get_peft_model_state_dict(model)
    assert list(ours) == sorted(peft) and len(ours) == 2 * 2 * 2  # lora_A/B of q/v in 2 layers
    for k, v in peft.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=k)
    assert checkpoint.expected_adapter_tensors(model) == {k: tuple(v.shape) for k, v in ours.items()}


def _emptied_gathering(monkeypatch, runtime, gathered: dict):
    """An adapter state that holds `gathered` instead of the trained tensors (what the FSDP gathering
    and PEFT's module walk gave before issue 18's fixes)."""
    def adapter_state_dict(model, rt):  # the trained tensors' names, looked up in `gathered`
        return {checkpoint.adapter_file_key(n, model.active_adapter): gathered[n]
                for n in checkpoint.trained_tensors(model) if n in gathered}

    monkeypatch.setattr(checkpoint, "adapter_state_dict", adapter_state_dict)
    return runtime


def test_an_adapter_without_the_trained_tensors_is_refused_and_nothing_replaced(tmp_path, runtime, monkeypatch,
                                                                             tiny_exaone_dir):
    from safetensors.torch import load_file

    from hai_medqa.model.load import load_tokenizer
    from hai_medqa.run_folder import TrainingRecord

    model, optimizer, scheduler = recipe()
    tokenizer, record = load_tokenizer(tiny_exaone_dir), TrainingRecord(base_model="some/base", step=1)
    folder = checkpoint.save_adapter(tmp_path / "adapter_last", model=model, tokenizer=tokenizer, record=record,
                                     runtime=runtime)
    good = load_file(folder / "adapter_model.safetensors")
    fsdp_like = _emptied_gathering(monkeypatch, runtime, {})
    with pytest.raises(TrainingError, match=r"adapter_last/adapter_model\.safetensors: holds 0 tensors, not the 8 "
                                            r"LoRA tensors the model trains: 8 missing \(e\.g\. base_model\.model\."
                                            r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight\)"):
        checkpoint.save_adapter(folder, model=model, tokenizer=tokenizer, record=record, runtime=fsdp_like)
    assert load_file(folder / "adapter_model.safetensors").keys() == good.keys()  # the earlier adapter stays
    with pytest.raises(TrainingError, match=r"step_0000003/adapter_model\.safetensors: holds 0 tensors, not the 8"):
        checkpoint.save(tmp_path / "run", TrainState(global_step=3), model=model, optimizer=optimizer,
                        scheduler=scheduler, runtime=fsdp_like, keep=2)
    assert list_checkpoints(tmp_path / "run") == []

    # a shard instead of the whole tensor (flattened, as FSDP holds it) is refused too
    sharded = {k: v.detach().flatten()[: v.numel() // 2] if "q_proj.lora_A" in k else v.detach()
               for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"holds 8 tensors, not the 8 LoRA tensors the model trains: 2 of another "
                                            r"shape \(e\.g\. .*q_proj\.lora_A\.weight: \(64,\), expected \(4, 32\)\)"):
        checkpoint.save_adapter(folder, model=model, tokenizer=tokenizer, record=record,
                                runtime=_emptied_gathering(monkeypatch, runtime, sharded))


def test_resume_refuses_a_checkpoint_adapter_missing_a_trained_tensor(tmp_path, runtime):
    """PEFT loads a partial adapter without a word (the missing LoRA stays at its initial value)."""
    from safetensors.torch import load_file, save_file

    model, optimizer, scheduler = recipe()
    step(model, optimizer, scheduler)
    folder = checkpoint.save(tmp_path, TrainState(global_step=1), model=model, optimizer=optimizer,
                             scheduler=scheduler, runtime=runtime, keep=1)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})

    model2, optimizer2, scheduler2 = recipe(lora_seed=1)
    expected = rf"--resume: cannot restore step_0000001: .*adapter_model\.safetensors: holds 7 tensors, not the 8 .*1 missing \(e\.g\. {dropped}\)"
    with pytest.raises(TrainingError, match=expected):
        checkpoint.load_adapter_weights(model2, tmp_path, runtime.device)
    with pytest.raises(TrainingError, match=expected):
        checkpoint.restore(tmp_path, model=model2, optimizer=optimizer2, scheduler=scheduler2, runtime=runtime,
                           seed=0)
    save_file({}, weights, metadata={"format": "pt"})  # what FSDP runs wrote before the fix
    with pytest.raises(TrainingError, match=r"holds 0 tensors, not the 8 .*\(FSDP runs before the issue 18 fix"):
        checkpoint.load_adapter_weights(model2, tmp_path, runtime.device)


def test_resume_with_a_paged_8bit_optimizer_continues_exactly(tmp_path, runtime):
    """bitsandbytes' paged optimizers (the shipped `paged_adamw_8bit`) mark their CUDA-managed states with
    an `is_paged` attribute, which torch.save keeps: on the H200 the first step after --resume prefetched
    the loaded (unmanaged) state and crashed. The marks are put on here only for the save, as get_paged
    puts them on the managed buffers it allocates on CUDA (a CPU cannot allocate those)."""
    import bitsandbytes as bnb
    from transformers import get_scheduler

    def paged_recipe(lora_seed: int = 0):
        model = tiny_lora(lora_seed)
        optimizer = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)

    checkpoint.seed_everything(5)
    model, optimizer, scheduler = paged_recipe()
    for _ in range(2):
        step(model, optimizer, scheduler)
    states = [v for s in optimizer.state.values() for k, v in s.items() if k in ("state1", "state2")]
    assert states
    for v in states:
        v.is_paged, v.page_deviceid = True, 0
    checkpoint.save(tmp_path, TrainState(global_step=2), model=model, optimizer=optimizer, scheduler=scheduler,
                    runtime=runtime, keep=1)
    for v in states:
        del v.is_paged, v.page_deviceid
    expected_losses = [step(model, optimizer, scheduler) for _ in range(2)]
    expected = lora_weights(model)

    checkpoint.seed_everything(77)
    model2, optimizer2, scheduler2 = paged_recipe(lora_seed=1)
    checkpoint.load_adapter_weights(model2, tmp_path, runtime.device)
    checkpoint.restore(tmp_path, model=model2, optimizer=optimizer2, scheduler=scheduler2, runtime=runtime, seed=0)
    assert [step(model2, optimizer2, scheduler2) for _ in range(2)] == expected_losses
    got = lora_weights(model2)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)
