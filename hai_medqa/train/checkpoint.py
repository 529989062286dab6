"""Checkpoints: everything a run needs to continue exactly where it stopped, behind two calls.

    folder = checkpoint.save(run_dir, state, model=m, optimizer=o, scheduler=s, runtime=rt, keep=3)
    state = checkpoint.restore(run_dir, model=m, optimizer=o, scheduler=s, runtime=rt, seed=cfg.seed)

A checkpoint, ``run_folder.checkpoint_dir(RUN, step)``, holds the LoRA adapter (PEFT's files),
``optimizer.pt``, ``scheduler.pt``, one ``rng_state_<rank>.pt`` per process and ``trainer_state.json``
(TrainState plus the process count). It is written atomically, by rank 0, after every process has
put down its RNG state (every process calls `save`). Only the newest `keep` checkpoints stay. The
adapter and the optimizer state are whole on every process, under DDP and under FSDP alike (FSDP
shards only the frozen base; the LoRA modules are replicated: fsdp_lora.py), so rank 0 writes what it
holds, and a checkpoint resumes on any number of processes with either launcher.

Adapter weights (checkpoints and adapter folders alike) are chosen here, not by PEFT: every tensor the
model trains, under PEFT's file names, whole. Under FSDP, PEFT 0.21 finds the adapter's tensors by
walking the module tree, whose names carry ``_fsdp_wrapped_module.`` inside every wrapped layer, and
so matched nothing of the (then gathered) state dict: FSDP runs wrote empty adapters (issue 18). Each
written adapter file is read back and must hold exactly those tensors (`check_adapter_file`), and a
checkpoint whose adapter does not is refused when resuming.

Resuming, in the order the trainer calls them: `decide_resume` (before anything heavy),
`check_resumable` (same recipe, same data, same micro-batches per step), `load_adapter_weights`
(into the model before any FSDP/DDP wrapping), `restore` (optimizer, scheduler, RNG, progress).
The same checkpoint resumes on another number of processes when the global batch is the same.

`save_adapter` writes the adapter folders other stages read (adapter_best/, adapter_last/).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from hai_medqa.config import config_to_dict, read_yaml_mapping
from hai_medqa.io_utils import atomic_dir, atomic_path, sha256_file, write_json
from hai_medqa.run_folder import (
    ADAPTER_WEIGHTS,
    CHECKPOINTS_DIR,
    RESOLVED_CONFIG,
    RUN_INFO,
    TRAINER_STATE,
    TrainingRecord,
    checkpoint_dir,
    list_checkpoints,
    write_training_record,
)
from hai_medqa.train import backends
from hai_medqa.train.errors import TrainingError

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state_{rank}.pt"

RESUME_MAY_CHANGE = {"resume", "cache_dir", "logging_steps", "save_steps", "save_total_limit", "tensorboard",
                     "eval_steps", "early_stopping_patience", "early_stopping_min_delta", "output_dir",
                     "max_eval_samples", "train_file", "val_file", "model", "report_to", "sample_questions",
                     "sample_max_new_tokens"}
"""Keys that may differ between a checkpointed run and its resumption without changing the result."""


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must restore (besides weights, optimizer, RNG)."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    """Optimizer steps already taken in `epoch` (the data position)."""
    tokens_seen: int = 0
    loss_tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    eval_pending: bool = False
    """A signal cut short the evaluation of `global_step`: --resume evaluates that step first."""


# ---------------------------------------------------------------- the two calls
def save(run_dir: str | Path, state: TrainState, *, model: Any, optimizer: Any, scheduler: Any, runtime: Any,
         keep: int) -> Path:
    """Adapter weights, optimizer, scheduler, every process's RNG state and `state`, written
    atomically; then only the newest `keep` checkpoints are kept. Every process calls it."""
    run_dir = Path(run_dir)
    folder = checkpoint_dir(run_dir, state.global_step)
    # Every process puts down its own RNG state; rank 0 writes the rest.
    rng_dir = run_dir / CHECKPOINTS_DIR / f".rng_{state.global_step:07d}"
    rng_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(rng_dir / RNG_FILE.format(rank=runtime.rank)) as tmp:
        torch.save(capture_rng(), tmp)
    runtime.wait_for_everyone()
    tensors, optim_state = adapter_state_dict(model, runtime), optimizer.state_dict()

    def write() -> None:
        with atomic_dir(folder) as tmp:
            write_adapter_weights(tmp, runtime.accelerator.unwrap_model(model), tensors, where=folder)
            torch.save(optim_state, tmp / OPTIMIZER_FILE)
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            for f in sorted(rng_dir.iterdir()):
                shutil.copy2(f, tmp / f.name)
            write_json(tmp / TRAINER_STATE, {**dataclasses.asdict(state), "world_size": runtime.world_size})
        shutil.rmtree(rng_dir, ignore_errors=True)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"checkpoint saved: {folder}")

    _write_on_rank0(runtime, folder, write)
    runtime.wait_for_everyone()
    return folder


def restore(run_dir: str | Path, *, model: Any, optimizer: Any, scheduler: Any, runtime: Any, seed: int) -> TrainState:
    """Load the newest checkpoint's optimizer, scheduler, this process's RNG state and progress (its
    adapter weights went into the model before wrapping: `load_adapter_weights`). A process the
    checkpointing run did not have is seeded as a fresh run would seed it. A checkpoint whose
    adapter lacks any tensor the model trains is refused (TrainingError)."""
    ckpt = list_checkpoints(run_dir)[-1]
    check_checkpoint_adapter(ckpt, runtime.accelerator.unwrap_model(model))
    saved = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
    saved.pop("world_size", None)  # another process count is fine when the global batch is (check_resumable)
    # Whole on every process (FSDP too: the LoRA parameters are replicated), in the trainable parameters'
    # order, which FSDP's wrapping does not change.
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, map_location=runtime.device, weights_only=True))
    backends.repage_loaded_optimizer_state(optimizer)
    scheduler.load_state_dict(torch.load(ckpt / SCHEDULER_FILE, weights_only=True))
    state = TrainState(**saved)
    rng_file = ckpt / RNG_FILE.format(rank=runtime.rank)
    if rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=True))
    else:
        seed_everything(seed + runtime.rank)
    logger.info(f"resumed from {ckpt} at step {state.global_step} (epoch {state.epoch}, "
                f"step {state.step_in_epoch} of that epoch)")
    return state


# ---------------------------------------------------------------- resume checks
def decide_resume(run_dir: str | Path, resume: bool) -> bool:
    """Whether the run resumes: `resume` with nothing to resume is refused, naming the folder (a typo
    in --output-dir must not train anew); a run folder holding checkpoints without `resume` is refused
    too (a fresh start would clobber it)."""
    ckpts = list_checkpoints(run_dir)
    if resume and not ckpts:
        raise TrainingError(f"--resume: no checkpoint to resume in {Path(run_dir) / CHECKPOINTS_DIR}; check "
                            "--output-dir, or drop --resume to start a new run there")
    if not resume and ckpts:
        raise TrainingError(f"{run_dir} already holds checkpoints ({ckpts[-1].name}); pass --resume to "
                            "continue that run, or choose a new --output-dir")
    return resume


def recorded_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The settled config a run folder recorded when its run started (resolved_config.yaml), or None."""
    path = Path(run_dir) / RESOLVED_CONFIG
    return read_yaml_mapping(path) if path.is_file() else None


def check_resumable(run_dir: str | Path, cfg: Any, world_size: int) -> None:
    """Refuse (TrainingError, with the fix) to resume with another recipe, another training file or
    another number of micro-batches per optimizer step than the checkpointed run's."""
    run_dir = Path(run_dir)
    saved = recorded_config(run_dir)
    if saved is None:
        return
    now = config_to_dict(cfg)
    _check_global_batch(run_dir, saved.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                        cfg.gradient_accumulation_steps, world_size)
    changed = [k for k in now if k not in RESUME_MAY_CHANGE | {"gradient_accumulation_steps"}
               and k in saved and saved[k] != now[k]]
    if changed:
        k = changed[0]
        raise TrainingError(
            f"--resume: the config differs from the checkpointed run in {', '.join(changed)} "
            f"(e.g. {k}: {saved[k]!r} -> {now[k]!r}); use the original values or a new --output-dir"
        )
    # The file may have moved (its path may change); its content may not: the saved data position
    # indexes into it.
    info_path = run_dir / RUN_INFO
    if info_path.is_file():
        recorded = json.loads(info_path.read_text(encoding="utf-8")).get("data", {}).get("train_file", {})
        if recorded.get("sha256") and recorded["sha256"] != sha256_file(cfg.train_file):
            raise TrainingError(f"--resume: {cfg.train_file} is not the file the checkpointed run trained on "
                                f"(SHA-256 differs from run_info.json); resume with that file or use a new "
                                "--output-dir")


def _check_global_batch(run_dir: Path, saved_accumulation: int, accumulation: int, world_size: int) -> None:
    """A checkpoint resumes on any number of processes that keeps the micro-batches per optimizer
    step (gradient_accumulation_steps x processes): the steps, their order and the schedule are
    then the same (packing.group_into_steps)."""
    ckpt = list_checkpoints(run_dir)[-1]
    saved_world = json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8")).get("world_size", 1)
    saved_global = saved_accumulation * saved_world
    now_global = accumulation * world_size
    if saved_global == now_global:
        if saved_world != world_size:
            logger.info(f"--resume: {ckpt.name} was written by {saved_world} process(es), continuing on "
                        f"{world_size} with gradient_accumulation_steps {accumulation} "
                        f"(same {now_global} micro-batches per step)")
        return
    hint = (f"set --gradient-accumulation-steps {saved_global // world_size}" if saved_global % world_size == 0
            else f"use a number of processes that divides {saved_global}")
    raise TrainingError(f"--resume: {ckpt.name} took {saved_global} micro-batches per optimizer step "
                        f"(gradient_accumulation_steps {saved_accumulation} x {saved_world} process(es)), this run "
                        f"{now_global} ({accumulation} x {world_size}); {hint} to "
                        "keep the steps and the schedule")


def load_adapter_weights(model: Any, run_dir: str | Path, device: torch.device) -> Path:
    """Load the newest checkpoint's LoRA weights into `model` (before any wrapping: FSDP would hold
    only a shard of each weight); return that checkpoint. TrainingError, before anything is
    loaded, when the checkpoint's adapter does not hold every tensor the model trains (PEFT would
    silently leave the missing ones at their initial values)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    ckpt = list_checkpoints(run_dir)[-1]
    check_checkpoint_adapter(ckpt, model)
    result = set_peft_model_state_dict(model, load_peft_weights(str(ckpt), device=str(device)))
    trained = trained_tensors(model)
    not_loaded = sorted({_clean_name(k) for k in result.missing_keys} & trained.keys())
    if not_loaded or result.unexpected_keys:
        what = (f"{len(not_loaded)} trained tensors not loaded (e.g. {not_loaded[0]})" if not_loaded
                else f"{len(result.unexpected_keys)} tensors the model has no place for "
                     f"(e.g. {result.unexpected_keys[0]})")
        raise TrainingError(f"--resume: {ckpt / ADAPTER_WEIGHTS} does not fit the model: {what}")
    return ckpt


def check_checkpoint_adapter(ckpt: Path, peft_model: Any) -> None:
    """Refuse (TrainingError) to resume from a checkpoint whose adapter lacks a tensor the model trains."""
    try:
        check_adapter_file(ckpt, expected_adapter_tensors(peft_model))
    except TrainingError as e:
        raise TrainingError(f"--resume: cannot restore {ckpt.name}: {e} (FSDP runs before the issue 18 fix saved "
                            "empty adapters: start a new run)") from None


# ---------------------------------------------------------------- adapters
def save_adapter(folder: str | Path, *, model: Any, tokenizer: Any, record: TrainingRecord, runtime: Any) -> Path:
    """Write a standard PEFT adapter folder with the tokenizer (and its chat template) and the
    training record beside it (rank 0 writes; every process calls it). TrainingError on every
    process, and nothing replaced, when the adapter file would not hold every trained tensor."""
    folder = Path(folder)
    tensors = adapter_state_dict(model, runtime)

    def write() -> None:
        with atomic_dir(folder) as tmp:
            write_adapter_weights(tmp, runtime.accelerator.unwrap_model(model), tensors, where=folder)
            tokenizer.save_pretrained(tmp)
            write_training_record(tmp, record)

    _write_on_rank0(runtime, folder, write)
    runtime.wait_for_everyone()
    return folder


def _write_on_rank0(runtime: Any, folder: Path, write: Any) -> None:
    """Run `write` on rank 0; a TrainingError there is raised on every process (a collective), so
    no process is left waiting for a rank that has stopped."""
    error: TrainingError | None = None
    if runtime.is_main:
        try:
            write()
        except TrainingError as e:
            error = e
    if runtime.any_process(error is not None):
        raise error or TrainingError(f"{folder}: not written: rank 0 refused it (its log says why)")


# ---------------------------------------------------------------- the adapter's tensors
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
"""Name segments that FSDP, activation-checkpoint wrappers and torch.compile insert into module names
(an FSDP state dict has none of them)."""


_FSDP_FLATTENED = "_fsdp_flattened"
"""The flag FSDP1 sets on an original parameter whose data lives in a flat parameter (torch's
``_common_utils.FSDP_FLATTENED``)."""


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def trained_tensors(peft_model: Any) -> dict[str, tuple[int, ...] | None]:
    """{name in the (unwrapped) model's state dict: whole shape} of every tensor `peft_model` trains,
    sorted, whether or not FSDP has wrapped and sharded its layers (an FSDP1 flat parameter stands
    for the original tensors it holds). Shape None where only a shard is visible."""
    out: dict[str, tuple[int, ...] | None] = {}
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        fqns = getattr(param, "_fqns", None)
        if fqns is not None:  # FlatParameter (use_orig_params=False): registered as <module>._flat_param
            prefix = name.rpartition("_flat_param")[0]
            for fqn, shape in zip(fqns, param._shapes, strict=True):
                out[_clean_name(prefix + fqn)] = tuple(shape)
        else:  # plain, or a sharded view of FSDP1 with use_orig_params=True (shape unknown)
            out[_clean_name(name)] = None if getattr(param, _FSDP_FLATTENED, False) else tuple(param.shape)
    return dict(sorted(out.items()))


def adapter_file_key(name: str, adapter_name: str) -> str:
    """PEFT's adapter-file name of a model tensor: the adapter's name dropped
    (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``)."""
    parts = name.split(".")
    if parts[-1] == adapter_name:  # an nn.Parameter held directly in a ParameterDict
        del parts[-1]
    elif len(parts) >= 2 and parts[-2] == adapter_name:  # a module's weight/bias
        del parts[-2]
    return ".".join(parts)


def expected_adapter_tensors(peft_model: Any) -> dict[str, tuple[int, ...] | None]:
    """{adapter-file key: shape} that a saved adapter of `peft_model` must hold: every trained tensor."""
    adapter = peft_model.active_adapter
    return {adapter_file_key(n, adapter): shape for n, shape in trained_tensors(peft_model).items()}


def adapter_state_dict(model: Any, runtime: Any) -> dict[str, torch.Tensor]:
    """Every tensor the model trains, whole, on CPU, under PEFT's adapter-file keys (each process holds
    them all: under FSDP the LoRA modules are replicated, fsdp_lora.py).

    Chosen by name from the model's trainable parameters, not by PEFT's module walk (which finds
    nothing under nested FSDP units: issue 18)."""
    peft_model = runtime.accelerator.unwrap_model(model)
    trained = trained_tensors(peft_model)
    full = {_clean_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    adapter = peft_model.active_adapter
    # A missing tensor surfaces in write_adapter_weights' check (one message for every path).
    return {adapter_file_key(n, adapter): full[n].detach().to("cpu", copy=True).contiguous()
            for n in trained if n in full}


def write_adapter_weights(tmp: Path, peft_model: Any, tensors: dict[str, torch.Tensor], *, where: Path) -> None:
    """PEFT's adapter files in `tmp` (adapter_config.json, README.md, adapter_model.safetensors), the
    weights being `tensors`; then the file is read back and checked (`check_adapter_file`)."""
    from safetensors.torch import save_file

    # PEFT writes the config and card; its weights file is replaced by ours, whose choice of tensors
    # does not depend on how FSDP named the modules.
    peft_model.save_pretrained(tmp, safe_serialization=True, state_dict={})
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    check_adapter_file(tmp, expected_adapter_tensors(peft_model), where=where)


def check_adapter_file(folder: str | Path, expected: dict[str, tuple[int, ...] | None], *,
                       where: str | Path | None = None) -> None:
    """Raise TrainingError (one line) unless `folder`'s adapter_model.safetensors holds exactly the
    `expected` tensors ({key: shape, None = any shape}), each whole. `where` names the folder in
    the message (a temporary folder's final name)."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    shown = Path(where) / ADAPTER_WEIGHTS if where is not None else path
    if not path.is_file():
        raise TrainingError(f"{shown}: missing; the adapter's {len(expected)} trained tensors are not saved")
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    missing = [k for k in expected if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in expected)
    wrong = [k for k, s in expected.items() if k in shapes and s is not None and shapes[k] != s]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} not trained by this model (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {shapes[wrong[0]]}, "
                        f"expected {expected[wrong[0]]})")
    raise TrainingError(f"{shown}: holds {len(shapes)} tensors, not the {len(expected)} LoRA tensors the model "
                        f"trains: {'; '.join(problems)}")


# ---------------------------------------------------------------- random number generators
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """The state of every global generator (Python, NumPy, torch CPU, every CUDA device)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the generator states of `capture_rng`."""
    random.setstate(rng["python"])
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
