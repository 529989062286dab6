"""The QLoRA fine-tuning loop: one readable path from config to adapter, on one CPU or many GPUs.

    trainer = Trainer(cfg, explicit_keys)
    trainer.setup()       # data checks -> model folder -> tokenizer -> token cache -> 4-bit model + LoRA
    summary = trainer.train()

`Trainer.train_step(micro_batches, num_loss_tokens)` is one optimizer step and nothing else, so the
throughput benchmark times exactly what users run.

Run folder (the contract other stages read):
    resolved_config.yaml  run_info.json  metrics.jsonl  train.log  tensorboard/  loss_curve.png
    checkpoints/step_NNNNNNN/  adapter_best/  adapter_last/  summary.json
Under ``accelerate launch`` every process trains on its own share of each step's micro-batches;
only rank 0 logs, writes checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

from hai_medqa import chat_format
from hai_medqa.config import config_to_dict, dump_config_yaml
from hai_medqa.io_utils import atomic_dir, atomic_path, atomic_write_text, sha256_file, write_json
from hai_medqa.logging_setup import setup_logging
from hai_medqa.train import backends, fast_lora
from hai_medqa.train.config import (
    TrainConfig,
    apply_fsdp_requirements,
    estimate_fast_peak_gib,
    resolve_profile,
)
from hai_medqa.train.errors import TrainingError
from hai_medqa.train.packing import collate_packed, collate_padded, group_into_steps, plan_epoch
from hai_medqa.train.plots import plot_loss_curve, read_metrics
from hai_medqa.train.sft_data import TokenizedDataset, check_sft_file, effective_system_prompt, load_tokenized

EXIT_INTERRUPTED = 75
"""Exit code after a SIGINT/SIGTERM checkpoint (EX_TEMPFAIL: "try again", i.e. run with --resume)."""

# Keys that may differ between a checkpointed run and its resumption without changing the result.
RESUME_MAY_CHANGE = {"resume", "cache_dir", "logging_steps", "save_steps", "save_total_limit", "tensorboard",
                     "eval_steps", "early_stopping_patience", "early_stopping_min_delta", "output_dir",
                     "max_eval_samples", "train_file", "val_file", "model"}

_CHECKPOINT_PREFIX = "step_"


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became NaN or infinite."""


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


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers",
                 "liger-kernel", "flash-attn"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def _oom_advice(cfg: TrainConfig) -> str:
    tips = []
    if cfg.batching == "packed":
        tips.append(f"lower tokens_per_micro_batch (now {cfg.tokens_per_micro_batch}, try "
                    f"{max(cfg.max_length, cfg.tokens_per_micro_batch // 2)}) and raise gradient_accumulation_steps "
                    f"(now {cfg.gradient_accumulation_steps}) to keep the tokens per step")
    else:
        tips.append(f"lower micro_batch_size (now {cfg.micro_batch_size}) and raise gradient_accumulation_steps")
    if not cfg.gradient_checkpointing:
        tips.append("turn gradient_checkpointing on")
    tips.append(f"lower lora_r (now {cfg.lora_r}) or max_length (now {cfg.max_length})")
    tips.append("use profile: lean (Liger's fused cross-entropy never builds the full logits)")
    return "; ".join(tips)


class Trainer:
    """QLoRA fine-tuning of a Llama-layout causal LM on tokenised chat samples (see module docstring)."""

    def __init__(self, cfg: TrainConfig, explicit: Iterable[str] = (), *,
                 callbacks: Iterable[Callable[[Trainer, dict], None]] = ()):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        # cpu=True when there is no GPU: accelerate only forms a multi-process (gloo) group on CPU if told
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        # FSDP comes from `accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml`
        self.fsdp_version = (self.accelerator.state.fsdp_plugin.fsdp_version
                             if self.accelerator.distributed_type == DistributedType.FSDP else None)
        self.device = self.accelerator.device
        if self.device.type == "cuda" and self.device.index is None:  # one GPU: accelerate says plain "cuda"
            self.device = torch.device("cuda", torch.cuda.current_device())
        elif self.device.type == "cpu":  # gloo ranks get "cpu:N", which torch.load and safetensors reject
            self.device = torch.device("cpu")
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.requested_cfg = cfg  # before the profile: `auto` is settled once the model's size is known
        cfg, self.profile_used = resolve_profile(cfg, set(explicit), on_gpu=self.device.type == "cuda")
        cfg, self.fsdp_changed = apply_fsdp_requirements(cfg, set(explicit), self.fsdp_version)
        self.cfg = cfg
        self.explicit = set(explicit)
        self.callbacks = list(callbacks)
        self.out = Path(cfg.output_dir)
        self.state = TrainState()
        self._stop_signal: int | None = None
        self._tb = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Check inputs, fetch/convert the model, tokenise (cached), load the 4-bit model with LoRA."""
        cfg = self.cfg
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            setup_logging(self.out / "train.log")
        else:  # other ranks: warnings and errors only, no file
            setup_logging(None, level="WARNING")
        # Bad inputs fail here, before anything large is downloaded or loaded.
        if self.fsdp_changed:
            logger.info(f"FSDP (version {self.fsdp_version}): using {self.fsdp_changed} (FSDP-QLoRA needs them)")
        check_sft_file(cfg.train_file, what="train_file")
        if cfg.val_file:
            check_sft_file(cfg.val_file, what="val_file")
        self._check_output_dir()
        cfg = self.cfg  # --resume may have been dropped (nothing to resume)

        from hai_medqa.model.acquire import resolve_model
        from hai_medqa.model.load import load_tokenizer

        with self.accelerator.main_process_first():  # one download/conversion, the others reuse it
            self.model_path = Path(resolve_model(cfg.model, revision=cfg.model_revision))
        if self.requested_cfg.profile == "auto" and self.device.type == "cuda":
            model_config = json.loads((self.model_path / "config.json").read_text(encoding="utf-8"))
            gpu_bytes = torch.cuda.get_device_properties(self.device).total_memory
            self.cfg, self.profile_used = resolve_profile(self.requested_cfg, self.explicit, on_gpu=True,
                                                          model_config=model_config, gpu_memory_bytes=gpu_bytes)
            self.cfg, _ = apply_fsdp_requirements(self.cfg, self.explicit, self.fsdp_version)
            self.cfg = dataclasses.replace(self.cfg, resume=cfg.resume)  # as _check_output_dir settled it
            cfg = self.cfg
            logger.info(f"profile auto -> {self.profile_used} (fast profile needs ~"
                        f"{estimate_fast_peak_gib(model_config, cfg.tokens_per_micro_batch):.0f} GiB; "
                        f"GPU has {gpu_bytes / 2**30:.0f} GiB)")
        if cfg.resume:  # compared once the profile is settled, so `auto` resolves the same way as before
            self._check_resume_config()
        self.tokenizer = load_tokenizer(self.model_path)
        self._check_tokenizer()
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out.resolve().parent / ".tokenized_cache"
        common = {"max_length": cfg.max_length, "overlong": cfg.overlong, "system_prompt": cfg.system_prompt,
                  "cache_dir": cache_dir}
        with self.accelerator.main_process_first():  # rank 0 tokenises, the others hit its cache
            self.train_ds = load_tokenized(cfg.train_file, self.tokenizer, max_samples=cfg.max_train_samples,
                                           what="train_file", **common)
            self.val_ds = (load_tokenized(cfg.val_file, self.tokenizer, max_samples=cfg.max_eval_samples,
                                          what="val_file", **common) if cfg.val_file else None)
        self._plan_schedule()
        self._write_run_files()
        self._load_model()
        self._build_optimizer()
        if cfg.resume:
            self._resume()
        self._seed_for_training()

    def _check_output_dir(self) -> None:
        ckpts = self._list_checkpoints()
        if self.cfg.resume and not ckpts:
            logger.warning(f"--resume: no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
            self.cfg = dataclasses.replace(self.cfg, resume=False)
        elif not self.cfg.resume and ckpts:
            raise TrainingError(f"{self.out} already holds checkpoints ({ckpts[-1].name}); pass --resume to "
                                "continue that run, or choose a new --output-dir")

    def _check_resume_config(self) -> None:
        saved_path = self.out / "resolved_config.yaml"
        if not saved_path.is_file():
            return
        from hai_medqa.config import read_yaml_mapping

        saved = read_yaml_mapping(saved_path)
        now = config_to_dict(self.cfg)
        self._check_resume_global_batch(saved.get("gradient_accumulation_steps", self.cfg.gradient_accumulation_steps))
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
        info_path = self.out / "run_info.json"
        if info_path.is_file():
            recorded = json.loads(info_path.read_text(encoding="utf-8")).get("data", {}).get("train_file", {})
            if recorded.get("sha256") and recorded["sha256"] != sha256_file(self.cfg.train_file):
                raise TrainingError(f"--resume: {self.cfg.train_file} is not the file the checkpointed run trained on "
                                    f"(SHA-256 differs from run_info.json); resume with that file or use a new "
                                    "--output-dir")

    def _check_resume_global_batch(self, saved_accumulation: int) -> None:
        """A checkpoint resumes on any number of processes that keeps the micro-batches per optimizer
        step (gradient_accumulation_steps x processes): the steps, their order and the schedule are
        then the same (packing.group_into_steps)."""
        ckpt = self._list_checkpoints()[-1]
        saved_world = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("world_size", 1)
        saved_global = saved_accumulation * saved_world
        now_global = self.cfg.gradient_accumulation_steps * self.world_size
        if saved_global == now_global:
            if saved_world != self.world_size:
                logger.info(f"--resume: {ckpt.name} was written by {saved_world} process(es), continuing on "
                            f"{self.world_size} with gradient_accumulation_steps {self.cfg.gradient_accumulation_steps} "
                            f"(same {now_global} micro-batches per step)")
            return
        hint = (f"set --gradient-accumulation-steps {saved_global // self.world_size}" if saved_global % self.world_size == 0
                else f"use a number of processes that divides {saved_global}")
        raise TrainingError(f"--resume: {ckpt.name} took {saved_global} micro-batches per optimizer step "
                            f"(gradient_accumulation_steps {saved_accumulation} x {saved_world} process(es)), this run "
                            f"{now_global} ({self.cfg.gradient_accumulation_steps} x {self.world_size}); {hint} to "
                            "keep the steps and the schedule")

    def _check_tokenizer(self) -> None:
        problems = chat_format.check_tokenizer_template(self.tokenizer)
        if any("chat_template" in p for p in problems):
            # The adapter folder must carry the exact template training used.
            logger.warning("the tokenizer's chat template differs from hai_medqa.chat_format; "
                           "the saved adapters carry the project's template")
            self.tokenizer.chat_template = chat_format.EXAONE_CHAT_TEMPLATE
        for p in problems:
            if "chat_template" not in p:
                logger.warning(f"tokenizer: {p}")

    # ------------------------------------------------------------------ data plan
    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        cfg = self.cfg
        plan = plan_epoch(self.train_ds.lengths, seed=cfg.seed, epoch=epoch, batching=cfg.batching,
                          tokens_per_micro_batch=cfg.tokens_per_micro_batch, micro_batch_size=cfg.micro_batch_size)
        return group_into_steps(plan, accumulation=cfg.gradient_accumulation_steps, world_size=self.world_size)

    def _plan_schedule(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = [len(self._epoch_steps(e)) for e in range(cfg.num_epochs)]
        if sum(self.steps_per_epoch) == 0:
            raise TrainingError(f"train_file gives no optimizer step with {self.world_size} processes "
                                f"({len(self.train_ds)} samples)")
        self.total_steps = cfg.max_steps if cfg.max_steps else sum(self.steps_per_epoch)
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        n_mb = sum(len(s) for s in self._epoch_steps(0))
        fill = self.train_ds.stats["tokens"] / max(1, n_mb * cfg.tokens_per_micro_batch)
        logger.info(
            f"{len(self.train_ds)} train samples -> {n_mb} micro-batches/epoch ({cfg.batching}"
            + (f", row fill {fill:.1%}" if cfg.batching == "packed" else "")
            + f") -> {self.steps_per_epoch[0]} steps/epoch x {cfg.num_epochs} epochs; training {self.total_steps} steps "
            f"({self.warmup_steps} warm-up) on {self.world_size} process(es)"
        )

    # ------------------------------------------------------------------ model
    def _load_model(self) -> None:
        from peft import LoraConfig, get_peft_model

        from hai_medqa.model.load import load_causal_lm

        cfg = self.cfg
        self.compute_dtype = backends.resolve_compute_dtype(cfg.compute_dtype, self.device)
        self.attn_implementation = backends.resolve_attn_implementation(cfg.attn_implementation, self.device)
        if cfg.batching == "packed":
            backends.check_packing_isolation(self.attn_implementation, self.device, self.compute_dtype)
        torch.manual_seed(cfg.seed)  # LoRA init: identical on every rank and every run
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        device_map = {"": self.device.index if self.device.type == "cuda" else "cpu"}
        # Every rank loads the whole 4-bit model onto its GPU (transformers has no rank-0-only path for
        # quantised weights); FSDP then keeps 1/N of it per GPU.
        quant_storage = backends.resolve_quant_storage(cfg.quant_storage, self.compute_dtype,
                                                       fsdp=self.fsdp_version is not None)
        model = load_causal_lm(self.model_path, quantize_4bit=cfg.quantize_4bit, dtype=self.compute_dtype,
                               device_map=device_map, attn_implementation=self.attn_implementation,
                               quant_storage=quant_storage)
        model_bytes = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda"
                       else model.get_memory_footprint())
        if self.device.type == "cpu":
            backends.keep_cpu_4bit_layout_trainable(model)
        self.liger_applied = backends.maybe_apply_liger(model, cfg.liger_kernel, self.device)
        model.config.use_cache = False  # a cache would silently turn packing off (samples would attend across)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=cfg.checkpoint_every_n_layers)
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input grad
        # No prepare_model_for_kbit_training: it up-casts every frozen non-quantised weight to fp32
        # (+5 GB and slower on 7.8B). Norms and embeddings stay in the compute dtype; peft keeps the
        # LoRA weights in fp32 (autocast_adapter_dtype).
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.lora_kernel == "fused":
            fast_lora.fuse_lora_forward(model)
        if cfg.dequantize_cache and cfg.quantize_4bit:
            fast_lora.cache_dequantized_weights(model, self.compute_dtype)
        model.train()  # from_pretrained returns eval mode, where checkpointing and dropout do nothing
        trainable, total = model.get_nb_trainable_parameters()
        self.trainable_params, self.total_params = int(trainable), int(total)
        where = (f"GPU memory {model_bytes / 2**30:.2f} GiB" if self.device.type == "cuda"
                 else f"memory {model_bytes / 2**20:.1f} MiB")
        logger.info(
            f"model loaded ({'4-bit NF4' if cfg.quantize_4bit else str(self.compute_dtype)}, compute "
            f"{str(self.compute_dtype).replace('torch.', '')}, attention {self.attn_implementation}, "
            f"liger {'on' if self.liger_applied else 'off'}): {where}; trainable parameters "
            f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
        )
        self.model_memory_bytes = int(model_bytes)
        if cfg.resume:  # before any wrapping: FSDP would hold only a shard of each weight
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(model, load_peft_weights(str(self._list_checkpoints()[-1]), device=str(self.device)))
        if self.fsdp_version is not None:
            from peft.utils.other import fsdp_auto_wrap_policy

            # decoder layers as FSDP units, each LoRA matrix its own unit (trainable fp32 apart from frozen bf16)
            self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        self.model = self.accelerator.prepare_model(model, device_placement=False)

    @property
    def peft_model(self):
        """The PEFT model without any DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_parameters = params
        self.optimizer, self.optimizer_name = backends.build_optimizer(params, self.cfg, self.device)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.cfg.lr_scheduler]
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=self.warmup_steps,
                                       num_training_steps=self.total_steps)

    def _dropout_seed(self, global_step: int, position: int) -> int:
        """The RNG seed of one micro-batch: a function of (seed, optimizer step, place in the step) only,
        so a run draws the same dropout masks on any number of processes and after any resume."""
        return int(np.random.SeedSequence([self.cfg.seed, global_step, position]).generate_state(1, np.uint64)[0]
                   % 2**63)

    def _seed_for_training(self, force: bool = False) -> None:
        if self.cfg.resume and not force:
            return  # RNG states came from the checkpoint
        # Dropout is seeded per micro-batch (_dropout_seed); this covers anything else drawing numbers.
        seed = self.cfg.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ batches
    def collate(self, ds: TokenizedDataset, indices: list[int]) -> dict[str, torch.Tensor]:
        """Tensors of one micro-batch (packed row or padded batch), on the training device."""
        cfg = self.cfg
        if cfg.batching == "packed":
            batch = collate_packed(ds, indices, pad_token_id=self.pad_token_id,
                                   pad_to=cfg.tokens_per_micro_batch if cfg.pad_to_fixed_length else None)
        else:
            batch = collate_padded(ds, indices, pad_token_id=self.pad_token_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_tokens(self, ds: TokenizedDataset, micro_batches: Iterable[list[int]]) -> int:
        ans = ds.answer_lengths
        return int(sum(int(ans[i]) for mb in micro_batches for i in mb))

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], num_loss_tokens: int, *,
                   dropout_seeds: list[int] | None = None, join_only: bool = False) -> dict[str, float]:
        """One optimizer step over this process's micro-batches.

        `num_loss_tokens` is the number of answer tokens in the whole step over all processes: each
        micro-batch's summed cross-entropy is divided by it, so the step's loss is the mean over
        answer tokens whatever the packing, padding, accumulation or process count.
        `dropout_seeds` (one per micro-batch) seed torch's RNG before each forward, so dropout masks
        belong to the micro-batch, not to the process that happens to run it. `join_only`: this
        process has no micro-batch in the step; it runs the given one with zero weight, only to take
        part in the gradient all-reduce.
        """
        model, cfg = self.model, self.cfg
        model.train()
        n_items = torch.tensor(float(num_loss_tokens), device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        # DDP averages gradients over processes; scale so the result is the global token mean.
        weight = 0.0 if join_only else float(self.world_size)
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            sync = contextlib.nullcontext() if (last or self.world_size == 1) else self.accelerator.no_sync(model)
            if dropout_seeds is not None:
                torch.manual_seed(dropout_seeds[k])
            with sync:
                out = model(**batch, use_cache=False, num_items_in_batch=n_items)
                (out.loss * weight).backward()
            if not join_only:
                loss_sum += out.loss.detach()
        loss = self.accelerator.reduce(loss_sum, reduction="sum") if self.world_size > 1 else loss_sum
        loss_value = float(loss)
        lr = float(self.scheduler.get_last_lr()[0])
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {loss_value} at step {self.state.global_step + 1}")
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        if self.fsdp_version is not None:  # the norm over every shard
            grad_norm = float(self.model.clip_grad_norm_(max_norm))
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.state.global_step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (mean cross-entropy over answer tokens) and answer-token perplexity."""
        assert self.val_ds is not None
        cfg = self.cfg
        model = self.model
        model.eval()
        plan = plan_epoch(self.val_ds.lengths, seed=0, epoch=0, batching=cfg.batching, shuffle=False,
                          tokens_per_micro_batch=cfg.tokens_per_micro_batch, micro_batch_size=cfg.micro_batch_size)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        one = torch.tensor(1.0, device=self.device)
        for mb in tqdm(plan[self.rank::self.world_size], desc="eval", leave=False, disable=not self.is_main):
            batch = self.collate(self.val_ds, mb)
            # num_items_in_batch=1 makes the model return the summed cross-entropy of the batch
            out = model(**batch, use_cache=False, num_items_in_batch=one)
            total += out.loss.double()
            count += self._loss_tokens(self.val_ds, [mb])
        if self.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
            count = self.accelerator.reduce(count, reduction="sum")
        model.train()
        val_loss = float(total / count)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ------------------------------------------------------------------ saving
    def _list_checkpoints(self) -> list[Path]:
        folder = self.out / "checkpoints"
        if not folder.is_dir():
            return []
        ckpts = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_CHECKPOINT_PREFIX)
                 and (p / "trainer_state.json").is_file()]
        return sorted(ckpts, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX):]))

    def save_adapter(self, folder: str | Path) -> Path:
        """Write a standard PEFT adapter folder with the tokenizer and chat template beside it (rank 0)."""
        folder = Path(folder)
        state_dict = self._gathered_state_dict()
        if self.is_main:
            with atomic_dir(folder) as tmp:
                self.peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
                write_json(tmp / "hai_medqa_training.json", {
                    "base_model": self.cfg.model, "base_model_revision": self.cfg.model_revision,
                    "base_layout": "llama", "step": self.state.global_step,
                    "val_loss": self.state.best_val_loss if folder.name == "adapter_best" else None,
                    "system_prompt": effective_system_prompt(self.cfg.system_prompt),
                })
        self.accelerator.wait_for_everyone()
        return folder

    def _gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole model's state dict on rank 0 (a collective: every rank must call it;
        PEFT keeps the adapter's part), else None (each process holds the whole adapter)."""
        if self.fsdp_version is None:
            return None
        return self.accelerator.get_state_dict(self.model)

    def _gathered_optimizer_state(self) -> dict[str, Any]:
        """The optimizer state with every shard gathered on rank 0 (a collective under FSDP)."""
        if self.fsdp_version is None:
            return self.optimizer.state_dict()
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return FSDP.optim_state_dict(self.model, self.optimizer)

    def save_checkpoint(self) -> Path:
        """Adapter weights, optimizer, scheduler, RNG states and progress, written atomically."""
        folder = self.out / "checkpoints" / f"{_CHECKPOINT_PREFIX}{self.state.global_step:07d}"
        rng = {
            "python": random.getstate(),
            "numpy": [np.random.get_state()[0], torch.from_numpy(np.random.get_state()[1].copy()),
                      *np.random.get_state()[2:]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        # Every process saves its own RNG state; rank 0 writes the rest.
        rng_dir = self.out / "checkpoints" / f".rng_{self.state.global_step:07d}"
        rng_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(rng_dir / f"rng_state_{self.rank}.pt") as tmp:
            torch.save(rng, tmp)
        self.accelerator.wait_for_everyone()
        state_dict, optim_state = self._gathered_state_dict(), self._gathered_optimizer_state()
        if self.is_main:
            with atomic_dir(folder) as tmp:
                self.peft_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
                torch.save(optim_state, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                for f in sorted(rng_dir.iterdir()):
                    shutil.copy2(f, tmp / f.name)
                write_json(tmp / "trainer_state.json", {**dataclasses.asdict(self.state),
                                                        "world_size": self.world_size})
            shutil.rmtree(rng_dir, ignore_errors=True)
            for old in self._list_checkpoints()[:-self.cfg.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info(f"checkpoint saved: {folder}")
        self.accelerator.wait_for_everyone()
        return folder

    def _resume(self) -> None:
        ckpt = self._list_checkpoints()[-1]  # its adapter weights were loaded with the model
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        saved.pop("world_size", None)  # another process count is fine when the global batch is (checked above)
        optim_state = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
        if self.fsdp_version is not None:  # the saved state is whole; give each rank its shard
            from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(),
                                      FullOptimStateDictConfig(rank0_only=False)):
                optim_state = FSDP.optim_state_dict_to_load(self.model, self.optimizer, optim_state)
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        self.state = TrainState(**saved)
        rng_file = ckpt / f"rng_state_{self.rank}.pt"  # absent for ranks the checkpointing run did not have
        if not rng_file.is_file():
            self._seed_for_training(force=True)
        else:
            rng = torch.load(rng_file, weights_only=True)
            random.setstate(rng["python"])
            np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            self._truncate_metrics(self.state.global_step)
        logger.info(f"resumed from {ckpt} at step {self.state.global_step} (epoch {self.state.epoch}, "
                    f"step {self.state.step_in_epoch} of that epoch)")

    def _truncate_metrics(self, step: int) -> None:
        # Lines logged after the checkpoint will be logged again by the resumed run.
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        atomic_write_text(path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ run files
    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        cfg = self.cfg
        atomic_write_text(self.out / "resolved_config.yaml", dump_config_yaml(cfg))
        data = {"train_file": {"path": str(cfg.train_file), "sha256": sha256_file(cfg.train_file),
                               **{k: self.train_ds.stats.get(k) for k in ("records", "unusable_records", "samples",
                                                                           "truncated", "dropped_overlong",
                                                                           "dropped_prompt_too_long", "tokens",
                                                                           "answer_tokens")}}}
        if self.val_ds is not None:
            data["val_file"] = {"path": str(cfg.val_file), "sha256": sha256_file(cfg.val_file),
                                "samples": len(self.val_ds), "answer_tokens": self.val_ds.stats.get("answer_tokens")}
        device = {"type": self.device.type, "world_size": self.world_size}
        if self.device.type == "cuda":
            device["name"] = torch.cuda.get_device_name(self.device)
            device["memory_gib"] = round(torch.cuda.get_device_properties(self.device).total_memory / 2**30, 1)
        else:
            device["cpu_threads"] = torch.get_num_threads()
        info = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "git_commit": _git_commit(),
            "versions": _package_versions(),
            "device": device,
            "model": {"requested": cfg.model, "revision": cfg.model_revision, "local_path": str(self.model_path)},
            "data": data,
            "profile": self.profile_used,
            "explicit_keys": sorted(self.explicit),
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                         "steps_per_epoch": self.steps_per_epoch},
        }
        self.run_info = info
        write_json(self.out / "run_info.json", info)

    def _update_run_info(self, **extra: Any) -> None:
        if self.is_main:
            self.run_info.update(extra)
            write_json(self.out / "run_info.json", self.run_info)

    def _log_metrics(self, rec: dict) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:  # one whole line per write
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(("eval/" if k.startswith("val_") else "train/") + k, v, rec["step"])

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._stop_signal = signum
        logger.warning(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
                       "(Ctrl-C again to abort without saving)")

    def _stop_requested(self) -> bool:
        flag = self._stop_signal is not None
        if self.world_size > 1:  # all processes must stop at the same step
            t = torch.tensor(1.0 if flag else 0.0, device=self.device)
            flag = bool(self.accelerator.reduce(t, reduction="sum") > 0)
        return flag

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run until max_steps/epochs, early stop, a signal or a non-finite loss; return the summary."""
        cfg, st = self.cfg, self.state
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):  # every process stops at the same step boundary
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                handlers[sig] = signal.signal(sig, self._on_signal)
        if self.is_main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=st.global_step + 1 if st.global_step else None)
        status = "completed"
        t_start = time.time()
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="train", unit="step", disable=not self.is_main,
                   dynamic_ncols=True)
        try:
            status = self._loop(bar)
        except NonFiniteLossError as e:
            status = "non_finite_loss"
            last = self._list_checkpoints()
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
            self._finish(status, t_start, bar)
            raise TrainingError(f"{e}: stopping ({where}); lower learning_rate or check the data") from None
        except torch.cuda.OutOfMemoryError:
            status = "out_of_memory"
            self._finish(status, t_start, bar)
            raise TrainingError(f"CUDA out of memory at step {st.global_step + 1}: {_oom_advice(cfg)}") from None
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self._finish(status, t_start, bar)

    def _loop(self, bar: tqdm) -> str:
        cfg, st = self.cfg, self.state
        while st.global_step < self.total_steps:
            if not cfg.max_steps and st.epoch >= cfg.num_epochs:
                break
            steps = self._epoch_steps(st.epoch)
            while st.step_in_epoch < len(steps) and st.global_step < self.total_steps:
                step_mbs = steps[st.step_in_epoch]
                positions = list(range(self.rank, len(step_mbs), self.world_size))  # this rank's share
                join_only = not positions  # a short last step: nothing left for this rank
                if join_only:
                    positions = [0]
                n_loss = self._loss_tokens(self.train_ds, step_mbs)
                t0 = time.perf_counter()
                batches = [self.collate(self.train_ds, step_mbs[k]) for k in positions]
                seeds = [self._dropout_seed(st.global_step, k) for k in positions]
                stats = self.train_step(batches, n_loss, dropout_seeds=seeds, join_only=join_only)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                n_tokens = int(sum(self.train_ds.lengths[i] for mb in step_mbs for i in mb))
                st.global_step += 1
                st.step_in_epoch += 1
                st.tokens_seen += n_tokens
                st.loss_tokens_seen += n_loss
                st.train_seconds += dt
                rec = {"step": st.global_step, "epoch": round(st.epoch + st.step_in_epoch / len(steps), 4),
                       "loss": round(stats["loss"], 6), "lr": stats["lr"], "grad_norm": round(stats["grad_norm"], 6),
                       "tokens": n_tokens, "loss_tokens": n_loss, "tokens_per_s": round(n_tokens / dt, 1),
                       "batch_digest": hashlib.sha1(json.dumps(step_mbs).encode()).hexdigest()[:12]}
                if self.device.type == "cuda":
                    rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
                self._log_metrics(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{n_tokens / dt:,.0f}", lr=f"{stats['lr']:.2e}")
                if self.is_main and (st.global_step % cfg.logging_steps == 0 or st.global_step == 1):
                    logger.info(f"step {st.global_step}/{self.total_steps} loss {stats['loss']:.4f} "
                                f"lr {stats['lr']:.3e} grad_norm {stats['grad_norm']:.3f} {n_tokens / dt:,.0f} tok/s")
                for cb in self.callbacks:
                    cb(self, rec)
                done = st.global_step >= self.total_steps or (
                    not cfg.max_steps and st.epoch == cfg.num_epochs - 1 and st.step_in_epoch == len(steps))
                evaluate_now = self.val_ds is not None and (st.global_step % cfg.eval_steps == 0 or done)
                if evaluate_now and self._evaluate_and_maybe_stop():
                    self.save_checkpoint()
                    return "early_stopped"
                if self._stop_requested():
                    self.save_checkpoint()
                    return "interrupted"
                if st.global_step % cfg.save_steps == 0 and not done:
                    self.save_checkpoint()
            if st.step_in_epoch >= len(steps):
                st.epoch += 1
                st.step_in_epoch = 0
        self.save_checkpoint()
        return "completed"

    def _evaluate_and_maybe_stop(self) -> bool:
        cfg, st = self.cfg, self.state
        ev = self.evaluate()
        improved = st.best_val_loss is None or ev["val_loss"] < st.best_val_loss - cfg.early_stopping_min_delta
        self._log_metrics({"step": st.global_step, "val_loss": round(ev["val_loss"], 6),
                           "val_ppl": round(ev["val_ppl"], 4)})
        logger.info(f"eval at step {st.global_step}: val_loss {ev['val_loss']:.4f} val_ppl {ev['val_ppl']:.3f}"
                    + (" (best so far)" if improved else f" (best {st.best_val_loss:.4f} at step {st.best_step})"))
        if improved:
            st.best_val_loss, st.best_step, st.evals_without_improvement = ev["val_loss"], st.global_step, 0
            self.save_adapter(self.out / "adapter_best")
            return False
        st.evals_without_improvement += 1
        if cfg.early_stopping_patience and st.evals_without_improvement >= cfg.early_stopping_patience:
            logger.info(f"early stopping: no improvement in {st.evals_without_improvement} evaluations")
            return True
        return False

    def _finish(self, status: str, t_start: float, bar: tqdm) -> dict[str, Any]:
        bar.close()
        st = self.state
        if status in ("completed", "early_stopped"):
            self.save_adapter(self.out / "adapter_last")
        summary = {
            "status": status,
            "global_step": st.global_step,
            "total_steps": self.total_steps,
            "epoch": st.epoch,
            "best_val_loss": st.best_val_loss,
            "best_step": st.best_step,
            "tokens_seen": st.tokens_seen,
            "loss_tokens_seen": st.loss_tokens_seen,
            "train_seconds": round(st.train_seconds, 2),
            "wall_seconds_this_session": round(time.time() - t_start, 2),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "model_memory_bytes": self.model_memory_bytes,
            "attn_implementation": self.attn_implementation,
            "liger_kernel": self.liger_applied,
            "optimizer": self.optimizer_name,
            "adapter_best": str(self.out / "adapter_best") if (self.out / "adapter_best").is_dir() else None,
            "adapter_last": str(self.out / "adapter_last") if (self.out / "adapter_last").is_dir() else None,
        }
        if self.device.type == "cuda":
            summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        if self.is_main:
            train, _ = read_metrics(self.out / "metrics.jsonl")
            if train:
                summary["first_loss"] = train[0]["loss"]
                summary["last_loss"] = train[-1]["loss"]
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png",
                            title=f"{Path(self.cfg.model).name} QLoRA r={self.cfg.lora_r}")
            if self._tb is not None:
                self._tb.close()
                self._tb = None
            write_json(self.out / "summary.json", summary)
            self._update_run_info(resolved={"attn_implementation": self.attn_implementation,
                                            "liger_kernel": self.liger_applied, "optimizer": self.optimizer_name,
                                            "compute_dtype": str(self.compute_dtype).replace("torch.", "")})
            logger.info(f"training {status} at step {st.global_step}; summary in {self.out / 'summary.json'}")
        return summary


def run_training(cfg: TrainConfig, explicit: Iterable[str] = (), *, callbacks: Iterable[Callable] = ()) -> dict:
    """Set up and run one training job; return its summary (status: completed, early_stopped, interrupted)."""
    threads = torch.get_num_threads()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    try:
        trainer = Trainer(cfg, explicit, callbacks=callbacks)
        trainer.setup()
        return trainer.train()
    finally:
        torch.set_num_threads(threads)
