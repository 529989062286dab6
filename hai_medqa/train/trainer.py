"""The QLoRA fine-tuning recipe: one readable path from config to adapter, on one CPU or many GPUs.

    trainer = Trainer(cfg, explicit_keys)
    trainer.setup()       # checks -> settled config -> tokenizer -> token cache -> 4-bit model + LoRA -> optimizer
    summary = trainer.train()

The loop (`Trainer._loop`, below) reads plan -> step -> log -> evaluate/save -> stop. Everything else
is delegated: the settled config (config.settle_config), where the run executes (runtime.py), the
data (sft_data.py, packing.py), the model and optimizer (model_build.py), checkpoints and resuming
(checkpoint.py), the run folder's records (run_record.py; file names in hai_medqa/run_folder.py)
and signals (signals.py). `Trainer.train_step(micro_batches, num_loss_tokens)` is one optimizer step
and nothing else, so the throughput benchmark times exactly what users run.

Under ``accelerate launch`` every process trains on its own share of each step's micro-batches;
only rank 0 logs, writes checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger
from torch.profiler import record_function  # "hai/<phase>" ranges, read by bench/kernel_breakdown.py
from tqdm import tqdm

from hai_medqa import chat_format
from hai_medqa.cli import signal_name
from hai_medqa.data.provenance import data_provenance
from hai_medqa.io_utils import fault_point
from hai_medqa.run_folder import ADAPTER_BEST, ADAPTER_LAST, TrainingRecord, list_checkpoints
from hai_medqa.train import checkpoint, compile_regions, eval_loss, fp8_base, fsdp_lora, sample_answers
from hai_medqa.train.adapter_folder import finish_adapter_folder
from hai_medqa.train.checkpoint import TrainState
from hai_medqa.train.config import (
    TrainConfig,
    check_compile_layers,
    check_fsdp_requirements,
    check_run_paths,
    recorded_base_precision,
    settle_config,
)
from hai_medqa.train.errors import NonFiniteLossError, TrainingError
from hai_medqa.train.model_build import BuiltModel, build_model, build_optimizer
from hai_medqa.train.packing import (
    collate_packed,
    collate_padded,
    group_into_steps,
    packed_flex_block_mask,
    plan_epoch,
)
from hai_medqa.train.run_record import RunRecord
from hai_medqa.train.runtime import compiled_frame_count, detect_runtime, freeze_python_heap, thaw_python_heap
from hai_medqa.train.sft_data import TokenizedDataset, check_sft_file, load_tokenized
from hai_medqa.train.signals import EXIT_INTERRUPTED, StopSignals

__all__ = ["EXIT_INTERRUPTED", "NonFiniteLossError", "TrainState", "Trainer", "run_training"]

TOKEN_CACHE_DIR = ".tokenized_cache"
"""Default tokenisation cache, beside the run folder (shared by the runs of one parent folder)."""


@dataclass
class StepInputs:
    """One optimizer step's inputs for this process, on the device (Trainer._step_inputs)."""

    step_mbs: list[list[int]]
    positions: list[int]  # which of the step's micro-batches this process runs
    join_only: bool  # none left for this process: it runs positions[0] with zero weight
    loss_tokens: int  # answer tokens of the whole step, over all processes
    batches: list[dict[str, torch.Tensor]]


class Trainer:
    """QLoRA fine-tuning of a Llama-layout causal LM on tokenised chat samples.

    Features: padding-free packing, gradient accumulation over any number of processes (DDP or
    FSDP-QLoRA) with the same steps as one process, the speed/memory profiles, validation with early
    stopping and a best adapter, checkpoints every `save_steps` that resume exactly (on another
    process count too), a checkpoint on SIGINT/SIGTERM, and a stop with a clear message on a
    non-finite loss or CUDA out-of-memory.

    Raises (one line each, from `setup` or `train`): TrainingDataError for unusable data files,
    ConfigError for settings that cannot run here, TrainingError for a run folder or resume that
    does not fit, a non-finite loss or an out-of-memory step.
    """

    def __init__(self, cfg: TrainConfig, explicit: Iterable[str] = (), *,
                 callbacks: Iterable[Callable[[Trainer, dict], None]] = ()):
        self.requested_cfg = cfg  # settled once in setup(): `auto` needs the model's size
        self.explicit = set(explicit)
        self.callbacks = list(callbacks)
        self.runtime = detect_runtime()
        self.out = Path(cfg.output_dir)
        self.record = RunRecord(self.out, writer=self.runtime.is_main)
        self.state = TrainState()
        self._data: dict[str, Any] | None = None  # TrainingRecord.data, read on the first adapter save

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run until max_steps/epochs, early stop, a signal or a non-finite loss; return the summary."""
        t_start = time.time()
        self._session_start_step = self.state.global_step  # this session's first step (resumed runs: later)
        self.record.open(tensorboard=self.cfg.tensorboard, start_step=self.state.global_step,
                         total_steps=self.total_steps)
        try:
            with StopSignals() as stop:
                frozen_before = gc.get_freeze_count()
                try:
                    freeze_python_heap("before the first step")
                    status = self._loop(stop)
                except KeyboardInterrupt as e:  # a second Ctrl-C after the first signal: no checkpoint now
                    if stop.received is not None:
                        last = list_checkpoints(self.out)
                        e.add_note(f"a second Ctrl-C after {signal_name(stop.received)} aborted step "
                                   f"{self.state.global_step + 1} without saving it; "
                                   + (f"the last checkpoint is {last[-1]}" if last else "no checkpoint was saved"))
                    raise
                finally:
                    thaw_python_heap(frozen_before)
        except NonFiniteLossError as e:
            last = list_checkpoints(self.out)
            where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
            self._finish("non_finite_loss", t_start)
            raise TrainingError(f"{e}: stopping ({where}); lower learning_rate or check the data") from None
        except torch.cuda.OutOfMemoryError:
            self._finish("out_of_memory", t_start)
            raise TrainingError(f"CUDA out of memory at step {self.state.global_step + 1}: "
                                f"{_oom_advice(self.cfg)}") from None
        return self._finish(status, t_start)

    def _loop(self, stop: StopSignals) -> str:
        """plan -> step -> log -> evaluate/save -> stop, one optimizer step per turn; how it ended.

        A signal is acted on within seconds in any phase (torchrun's agent and SLURM send SIGKILL 30 s
        after SIGTERM): a step finishes, an evaluation or its sample answers stop where they are, and
        the checkpoint is saved. An evaluation cut short is done again first thing on --resume."""
        cfg, st = self.cfg, self.state
        frames_frozen = compiled_frame_count()  # compiled code the frozen heap holds (freeze_python_heap)
        if st.eval_pending and self.val_ds is not None:  # a signal cut this step's evaluation short
            if self._evaluate_and_keep_best(stop):
                self.save_checkpoint()
                return "early_stopped"
            self.save_checkpoint()  # the same step with its evaluation done (or still pending if cut again)
            if stop.requested(self.runtime):
                return "interrupted"
        while st.global_step < self.total_steps and (cfg.max_steps or st.epoch < cfg.num_epochs):
            steps = self.epoch_steps(st.epoch)  # plan: the epoch's optimizer steps (lists of micro-batches)
            ready = None  # the next step's inputs, collated while the GPU still ran this step's backward
            while st.step_in_epoch < len(steps) and st.global_step < self.total_steps:
                step_mbs = steps[st.step_in_epoch]
                nxt = st.step_in_epoch + 1
                next_mbs = steps[nxt] if nxt < len(steps) and st.global_step + 1 < self.total_steps else None
                t0 = time.perf_counter()
                stats, ready = self._step(step_mbs, ready, next_mbs)  # step: this process's share, one update
                if st.global_step == self._session_start_step:
                    if self.built.compiled_layers:
                        compile_regions.log_compile_stats(self.compile_stats(), when="after the first step")
                    freeze_python_heap("after the first step")  # with what compiling the layers made
                elif (frames := compiled_frame_count()) != frames_frozen:
                    # a recompile (a new row length when rows are not padded: pad_to_fixed_length false) made
                    # ~80,000 long-lived objects, which every full collection would walk again (~40 ms, per rank
                    # under DDP)
                    logger.info(f"step {st.global_step + 1}: torch.compile compiled {frames - frames_frozen} new "
                                "frame(s) (a slower step; their objects are now left out of garbage collection)")
                    freeze_python_heap(f"after step {st.global_step + 1} (torch.compile made new code)")
                frames_frozen = compiled_frame_count()
                with record_function("hai/log"):
                    rec = self._advance(step_mbs, stats, time.perf_counter() - t0, len(steps))
                    self.record.log_step(rec, stats, total_steps=self.total_steps, logging_steps=cfg.logging_steps)
                for cb in self.callbacks:
                    cb(self, rec)
                done = st.global_step >= self.total_steps or (
                    not cfg.max_steps and st.epoch == cfg.num_epochs - 1 and st.step_in_epoch == len(steps))
                evaluate_now = self.val_ds is not None and (st.global_step % cfg.eval_steps == 0 or done)
                if evaluate_now and self._evaluate_and_keep_best(stop):  # evaluate (adapter_best), early stop
                    self.save_checkpoint()
                    return "early_stopped"
                if stop.requested(self.runtime):  # stop: every process at the same step
                    self.save_checkpoint()
                    return "interrupted"
                if st.global_step % cfg.save_steps == 0 and not done:
                    self.save_checkpoint()
            if st.step_in_epoch >= len(steps):
                st.epoch, st.step_in_epoch = st.epoch + 1, 0
        self.save_checkpoint()
        return "completed"

    def _step(self, step_mbs: list[list[int]], ready: StepInputs | None = None,
              next_mbs: list[list[int]] | None = None) -> tuple[dict[str, float], StepInputs | None]:
        """This process's micro-batches of one optimizer step (rank r takes ``step_mbs[r::world_size]``)
        through `train_step`; a process left without one joins with zero weight.

        `ready`: this step's inputs if already collated; `next_mbs`: the next step, whose inputs are
        collated once this step's backward is launched, while the GPU still runs it (the host's collation
        otherwise left the GPU idle ~10 ms per step at the 7.8B shape). Returns (stats, next step's inputs)."""
        rt = self.runtime
        inputs = ready if ready is not None and ready.step_mbs == step_mbs else self._step_inputs(step_mbs)
        seeds = [self.dropout_seed(self.state.global_step, k) for k in inputs.positions]
        prefetched: list[StepInputs] = []
        stats = self.train_step(inputs.batches, inputs.loss_tokens, dropout_seeds=seeds, join_only=inputs.join_only,
                                after_backward=None if next_mbs is None else
                                lambda: prefetched.append(self._step_inputs(next_mbs)))
        if rt.on_gpu:
            with record_function("hai/step_sync"):
                torch.cuda.synchronize(rt.device)
        return {**stats, "loss_tokens": inputs.loss_tokens}, (prefetched[0] if prefetched else None)

    def _step_inputs(self, step_mbs: list[list[int]]) -> StepInputs:
        """Collate this process's share of one optimizer step onto the device."""
        rt = self.runtime
        with record_function("hai/collate"):
            positions = list(range(rt.rank, len(step_mbs), rt.world_size))
            join_only = not positions  # a short last step: nothing left for this rank
            if join_only:
                positions = [0]
            # flex attention: the mask is built here too, from the host's position ids (packing.packed_flex_block_mask)
            block_mask = self.attn_implementation == "flex_attention" and self.cfg.batching == "packed"
            return StepInputs(step_mbs, positions, join_only, self.answer_tokens(self.train_ds, step_mbs),
                              [self.collate(self.train_ds, step_mbs[k], block_mask=block_mask) for k in positions])

    def _advance(self, step_mbs: list[list[int]], stats: dict[str, float], dt: float, steps_in_epoch: int,
                 ) -> dict[str, Any]:
        """Count the step into the state; return its metrics line (and add tokens_per_s to `stats`)."""
        st = self.state
        n_tokens = int(sum(self.train_ds.lengths[i] for mb in step_mbs for i in mb))
        n_loss = int(stats["loss_tokens"])
        st.global_step += 1
        st.step_in_epoch += 1
        st.tokens_seen += n_tokens
        st.loss_tokens_seen += n_loss
        st.train_seconds += dt
        stats["tokens_per_s"] = n_tokens / dt
        rec = {"step": st.global_step, "epoch": round(st.epoch + st.step_in_epoch / steps_in_epoch, 4),
               "loss": round(stats["loss"], 6), "lr": stats["lr"], "grad_norm": round(stats["grad_norm"], 6),
               "tokens": n_tokens, "loss_tokens": n_loss, "tokens_per_s": round(n_tokens / dt, 1),
               "batch_digest": hashlib.sha1(json.dumps(step_mbs).encode()).hexdigest()[:12]}
        if self.runtime.on_gpu:
            rec["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.runtime.device) / 2**30, 2)
        return rec

    def _evaluate_and_keep_best(self, stop: StopSignals | None = None) -> bool:
        """Evaluate, write adapter_best on improvement; True when early stopping ends the run.

        A signal during the evaluation leaves no trace of it (no eval line, adapter_best untouched,
        `eval_pending` set for --resume); during the sample answers, none are written for this step."""
        cfg, st = self.cfg, self.state
        ev = self.evaluate(stop)
        if ev is None:
            st.eval_pending = True
            logger.warning(f"evaluation at step {st.global_step} cut short by {stop.describe()}: not logged, "
                           "adapter_best untouched; --resume evaluates this step again")
            return False
        st.eval_pending = False
        improved = st.best_val_loss is None or ev["val_loss"] < st.best_val_loss - cfg.early_stopping_min_delta
        note = " (best so far)" if improved else f" (best {st.best_val_loss:.4f} at step {st.best_step})"
        self.record.log_eval(st.global_step, ev["val_loss"], ev["val_ppl"], note)
        sample_answers.at_evaluation(self, stop)  # fixed validation questions answered greedily (samples.jsonl)
        if improved:
            st.best_val_loss, st.best_step, st.evals_without_improvement = ev["val_loss"], st.global_step, 0
            self.save_adapter(self.out / ADAPTER_BEST)
            return False
        st.evals_without_improvement += 1
        if cfg.early_stopping_patience and st.evals_without_improvement >= cfg.early_stopping_patience:
            logger.info(f"early stopping: no improvement in {st.evals_without_improvement} evaluations")
            return True
        return False

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], num_loss_tokens: int, *,
                   dropout_seeds: list[int] | None = None, join_only: bool = False,
                   after_backward: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer step over this process's micro-batches.

        `num_loss_tokens` is the number of answer tokens in the whole step over all processes: each
        micro-batch's summed cross-entropy is divided by it, so the step's loss is the mean over
        answer tokens whatever the packing, padding, accumulation or process count.
        `dropout_seeds` (one per micro-batch) seed torch's RNG before each forward, so dropout masks
        belong to the micro-batch, not to the process that happens to run it. `join_only`: this
        process has no micro-batch in the step; it runs the given one with zero weight, only to take
        part in the gradient all-reduce. `after_backward` runs once the last backward is launched, before
        the step waits for the GPU (host work there overlaps the GPU's backward).
        """
        model, cfg, rt = self.model, self.cfg, self.runtime
        if not model.training:  # train() walks ~2,700 modules at 7.8B (~6 ms here: bench/cpu_probes.py train-walk);
            model.train()  # evaluation and sample answers put the mode back themselves
        n_items = torch.tensor(float(num_loss_tokens), device=rt.device)
        loss_sum = torch.zeros((), device=rt.device)
        # DDP (and fsdp_lora.average_gradients) average gradients over processes; scale so the result is
        # the global token mean.
        weight = 0.0 if join_only else float(rt.world_size)
        # Under FSDP the LoRA modules are FSDP-ignored (fsdp_lora.py): FSDP has no gradient to reduce, and
        # theirs are averaged below, once per step.
        fsdp = rt.fsdp_version is not None
        for k, batch in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            plain = last or rt.world_size == 1 or fsdp
            sync = contextlib.nullcontext() if plain else rt.accelerator.no_sync(model)
            if dropout_seeds is not None:
                torch.manual_seed(dropout_seeds[k])
            with sync:
                with record_function("hai/forward"):
                    out = model(**batch, use_cache=False, num_items_in_batch=n_items)
                with record_function("hai/backward"):
                    (out.loss * weight).backward()
            if not join_only:
                loss_sum += out.loss.detach()
        if after_backward is not None:
            after_backward()
        with record_function("hai/grad_clip"):  # launched without waiting: clipping a non-finite norm is harmless,
            loss = rt.accelerator.reduce(loss_sum, reduction="sum") if rt.world_size > 1 else loss_sum
            if fsdp:  # one flattened all-reduce of the replicated LoRA gradients, after the last backward
                fsdp_lora.average_gradients(self.trainable_parameters, rt.world_size)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters, max_norm)
        with record_function("hai/loss_sync"):  # as the step is refused below before the optimizer sees it
            loss_value, grad_norm = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()  # one wait
        lr = float(self.scheduler.get_last_lr()[0])
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"loss is {loss_value} at step {self.state.global_step + 1}")
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.state.global_step + 1}")
        with record_function("hai/optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, stop: StopSignals | None = None) -> dict[str, float] | None:
        """Validation loss (mean cross-entropy over answer tokens) and answer-token perplexity.

        The loss comes from the final hidden states a chunk of positions at a time
        (eval_loss.summed_nll): like training on the GPU profiles, evaluation never holds the
        [tokens x vocab] logits. With `stop`, every round first asks whether any process received a
        signal (`stop.requested`, a collective, so all processes leave at the same round) and the
        evaluation ends there with None."""
        assert self.val_ds is not None
        cfg, rt = self.cfg, self.runtime
        model = self.model
        model.eval()
        plan = plan_epoch(self.val_ds.lengths, seed=0, epoch=0, batching=cfg.batching, shuffle=False,
                          tokens_per_micro_batch=cfg.tokens_per_micro_batch, micro_batch_size=cfg.micro_batch_size)
        total = torch.zeros((), device=rt.device, dtype=torch.float64)
        count = torch.zeros((), device=rt.device, dtype=torch.float64)
        head = eval_loss.output_head(self.peft_model)
        share = plan[rt.rank::rt.world_size]
        # Every process runs the same number of forwards: under DDP/FSDP each forward is a collective, so a
        # process with a shorter share (fewer validation micro-batches than processes) repeats one whose
        # result it drops, instead of leaving the others waiting.
        rounds = -(-len(plan) // rt.world_size)
        for k in tqdm(range(rounds), desc="eval", leave=False, disable=not rt.is_main):
            if k == 0:
                fault_point("train:evaluating")  # fault-injection tests signal the run here
            if stop is not None and stop.requested(rt):
                model.train()
                return None
            mb = share[k] if k < len(share) else plan[0]
            nll = eval_loss.summed_nll(model, self.collate(self.val_ds, mb), head=head)
            if k < len(share):
                total += nll
                count += self.answer_tokens(self.val_ds, [mb])
        if rt.world_size > 1:
            total = rt.accelerator.reduce(total, reduction="sum")
            count = rt.accelerator.reduce(count, reduction="sum")
        model.train()
        val_loss = float(total / count)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        """Adapter weights, optimizer, scheduler, RNG states and progress, written atomically."""
        return checkpoint.save(self.out, self.state, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, runtime=self.runtime, keep=self.cfg.save_total_limit)

    def save_adapter(self, folder: str | Path) -> Path:
        """A standard PEFT adapter folder with the tokenizer, chat template and training record, made
        shareable on rank 0 (`finish_adapter_folder`: the base by Hub id or null, the data's
        provenance, the project's card instead of PEFT's template; the weights are not touched)."""
        folder, cfg, st = Path(folder), self.cfg, self.state
        record = TrainingRecord(base_model=cfg.model, base_model_revision=cfg.model_revision, base_layout="llama",
                                step=st.global_step, val_loss=st.best_val_loss if folder.name == ADAPTER_BEST else None,
                                system_prompt=chat_format.resolve_system_prompt(cfg.system_prompt),
                                data=self._data_record() if self.is_main else None,
                                base_precision=recorded_base_precision(cfg))
        checkpoint.save_adapter(folder, model=self.model, tokenizer=self.tokenizer, record=record,
                                runtime=self.runtime)
        if self.is_main:
            finish_adapter_folder(folder, record, run_dir=self.out, requested_model=cfg.model,
                                  summary=self._progress())
        return folder

    def _data_record(self) -> dict[str, Any]:
        """TrainingRecord.data: the provenance of the training and validation files (read once)."""
        if self._data is None:
            cfg = self.cfg
            self._data = {"train": data_provenance(cfg.train_file),
                          "validation": data_provenance(cfg.val_file) if cfg.val_file else None}
        return self._data

    def _progress(self) -> dict[str, Any]:
        """summary.json's progress keys as they stand now (the adapter card's steps and tokens: the
        run's summary.json is written only at the end, and may be an earlier session's)."""
        st = self.state
        in_epoch = self.steps_per_epoch[st.epoch] if st.epoch < len(self.steps_per_epoch) else 0
        epochs = round(st.epoch + st.step_in_epoch / in_epoch, 4) if in_epoch else st.epoch  # as metrics.jsonl
        return {"global_step": st.global_step, "total_steps": self.total_steps, "epoch": epochs,
                "tokens_seen": st.tokens_seen, "loss_tokens_seen": st.loss_tokens_seen,
                "best_val_loss": st.best_val_loss, "best_step": st.best_step}

    def _finish(self, status: str, t_start: float) -> dict[str, Any]:
        self.record.close_progress()
        st, built = self.state, self.built
        if status in ("completed", "early_stopped"):
            self.save_adapter(self.out / ADAPTER_LAST)
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
            "trainable_params": built.trainable_params,
            "total_params": built.total_params,
            "model_memory_bytes": built.memory_bytes,
            "attn_implementation": built.attn_implementation,
            "liger_kernel": built.liger_applied,
            "optimizer": self.optimizer_name,
            "adapter_best": str(self.out / ADAPTER_BEST) if (self.out / ADAPTER_BEST).is_dir() else None,
            "adapter_last": str(self.out / ADAPTER_LAST) if (self.out / ADAPTER_LAST).is_dir() else None,
        }
        if self.runtime.on_gpu:
            summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.runtime.device))
        if built.compiled_layers:
            summary["compile"] = self.compile_stats()
            compile_regions.log_compile_stats(summary["compile"], when="at the end")
        return self.record.finish(
            summary, title=f"{Path(self.cfg.model).name} QLoRA r={self.cfg.lora_r}",
            resolved={"attn_implementation": built.attn_implementation, "liger_kernel": built.liger_applied,
                      "optimizer": self.optimizer_name,
                      "compute_dtype": str(built.compute_dtype).replace("torch.", "")})

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Check inputs, settle the config, tokenise (cached), build the 4-bit model with LoRA and
        its optimizer, and restore the checkpoint when resuming."""
        requested, rt = self.requested_cfg, self.runtime
        # Paths of the wrong kind and a --resume with nothing to resume fail before the run folder is made.
        check_run_paths(requested)
        resume = checkpoint.decide_resume(self.out, requested.resume)
        self.record.start_logging()
        # Bad inputs fail here, before anything large is downloaded or loaded.
        check_fsdp_requirements(requested, self.explicit, rt.fsdp_version)
        fp8_base.check_base_precision(requested, rt.device)  # a GPU without FP8: one line, nothing loaded
        compile_available = compile_regions.compiler_available(rt.device)
        check_compile_layers(requested, self.explicit, compile_available)
        check_sft_file(requested.train_file, what="train_file")
        if requested.val_file:
            check_sft_file(requested.val_file, what="val_file")

        from hai_medqa.model.acquire import resolve_model
        from hai_medqa.model.load import load_tokenizer

        with rt.accelerator.main_process_first():  # one download/conversion, the others reuse it
            self.model_path = Path(resolve_model(requested.model, revision=requested.model_revision))
        self.cfg, self.profile_used = settle_config(requested, self.explicit, on_gpu=rt.on_gpu,
                                                    fsdp_version=rt.fsdp_version, resume=resume,
                                                    recorded=checkpoint.recorded_config(self.out) if resume else None,
                                                    compile_available=compile_available,
                                                    **self._gpu_facts())
        cfg = self.cfg
        if cfg.resume:  # compared once the profile is settled, so `auto` resolves the same way as before
            checkpoint.check_resumable(self.out, cfg, rt.world_size)
        self.tokenizer = load_tokenizer(self.model_path)
        self.chat_ids = chat_format.apply_tokenizer_rule(self.tokenizer, source=str(self.model_path),
                                                         repair_template=True)
        self.train_ds, self.val_ds = self._load_data()
        self._plan_schedule()
        self.record.write_start(cfg, profile=self.profile_used, explicit=self.explicit, runtime=rt,
                                model_path=self.model_path, train_ds=self.train_ds, val_ds=self.val_ds,
                                schedule={"total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                                          "steps_per_epoch": self.steps_per_epoch})
        fault_point("train:before_model")  # fault-injection tests stop start-up here (tests/pipeline)
        self.built: BuiltModel = build_model(cfg, self.model_path, rt, resume_from=self.out if cfg.resume else None)
        self.model = self.built.model
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler, self.optimizer_name = build_optimizer(
            self.model, cfg, rt, warmup_steps=self.warmup_steps, total_steps=self.total_steps)
        if cfg.resume:  # RNG states come from the checkpoint
            self.state = checkpoint.restore(self.out, model=self.model, optimizer=self.optimizer,
                                            scheduler=self.scheduler, runtime=rt, seed=cfg.seed)
            self.record.truncate_metrics(self.state.global_step)  # lines after it will be logged again
        else:
            # Dropout is seeded per micro-batch (dropout_seed); this covers anything else drawing numbers.
            checkpoint.seed_everything(cfg.seed + rt.rank)

    def _gpu_facts(self) -> dict[str, Any]:
        """What `auto` needs on a GPU: the model's config and the GPU's memory (nothing otherwise)."""
        if self.requested_cfg.profile != "auto" or not self.runtime.on_gpu:
            return {}
        model_config = json.loads((self.model_path / "config.json").read_text(encoding="utf-8"))
        return {"model_config": model_config,
                "gpu_memory_bytes": torch.cuda.get_device_properties(self.runtime.device).total_memory}

    def _load_data(self) -> tuple[TokenizedDataset, TokenizedDataset | None]:
        cfg = self.cfg
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out.resolve().parent / TOKEN_CACHE_DIR
        common = {"max_length": cfg.max_length, "overlong": cfg.overlong, "system_prompt": cfg.system_prompt,
                  "cache_dir": cache_dir, "eot_id": self.chat_ids.eot_id, "train_turns": cfg.train_turns}
        with self.runtime.accelerator.main_process_first():  # rank 0 tokenises, the others hit its cache
            train_ds = load_tokenized(cfg.train_file, self.tokenizer, max_samples=cfg.max_train_samples,
                                      what="train_file", **common)
            val_ds = (load_tokenized(cfg.val_file, self.tokenizer, max_samples=cfg.max_eval_samples,
                                     what="val_file", **common) if cfg.val_file else None)
        return train_ds, val_ds

    def _plan_schedule(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = [len(self.epoch_steps(e)) for e in range(cfg.num_epochs)]
        if sum(self.steps_per_epoch) == 0:
            raise TrainingError(f"train_file gives no optimizer step with {self.world_size} processes "
                                f"({len(self.train_ds)} samples)")
        self.total_steps = cfg.max_steps if cfg.max_steps else sum(self.steps_per_epoch)
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        n_mb = sum(len(s) for s in self.epoch_steps(0))
        fill = self.train_ds.stats["tokens"] / max(1, n_mb * cfg.tokens_per_micro_batch)
        logger.info(
            f"{len(self.train_ds)} train samples -> {n_mb} micro-batches/epoch ({cfg.batching}"
            + (f", row fill {fill:.1%}" if cfg.batching == "packed" else "")
            + f") -> {self.steps_per_epoch[0]} steps/epoch x {cfg.num_epochs} epochs; training {self.total_steps} steps "
            f"({self.warmup_steps} warm-up) on {self.world_size} process(es)"
        )

    # ------------------------------------------------------------------ data plan and batches
    def epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """The optimizer steps of `epoch`: a pure function of (seed, epoch, global batch)."""
        cfg = self.cfg
        plan = plan_epoch(self.train_ds.lengths, seed=cfg.seed, epoch=epoch, batching=cfg.batching,
                          tokens_per_micro_batch=cfg.tokens_per_micro_batch, micro_batch_size=cfg.micro_batch_size)
        return group_into_steps(plan, accumulation=cfg.gradient_accumulation_steps, world_size=self.world_size)

    def dropout_seed(self, global_step: int, position: int) -> int:
        """The RNG seed of one micro-batch: a function of (seed, optimizer step, place in the step) only,
        so a run draws the same dropout masks on any number of processes and after any resume."""
        return int(np.random.SeedSequence([self.cfg.seed, global_step, position]).generate_state(1, np.uint64)[0]
                   % 2**63)

    def collate(self, ds: TokenizedDataset, indices: list[int], *, block_mask: bool = False) -> dict[str, Any]:
        """Tensors of one micro-batch (packed row or padded batch), on the training device; with
        `block_mask` (packed rows, flex attention) also its ready flex-attention mask as ``attention_mask``."""
        cfg = self.cfg
        if cfg.batching == "packed":
            batch = collate_packed(ds, indices, pad_token_id=self.chat_ids.pad_id,
                                   pad_to=cfg.tokens_per_micro_batch if cfg.pad_to_fixed_length else None)
        else:
            batch = collate_padded(ds, indices, pad_token_id=self.chat_ids.pad_id)
        host_positions = batch.get("position_ids")
        if self.runtime.on_gpu:  # pinned: the copy is queued behind the GPU's work instead of waiting for it
            batch = {k: v.pin_memory() for k, v in batch.items()}
        out: dict[str, Any] = {k: v.to(self.runtime.device, non_blocking=True) for k, v in batch.items()}
        if block_mask and host_positions is not None:
            out["attention_mask"] = packed_flex_block_mask(host_positions, out["position_ids"])
        return out

    @staticmethod
    def answer_tokens(ds: TokenizedDataset, micro_batches: Iterable[list[int]]) -> int:
        """Answer (loss-carrying) tokens in the given micro-batches."""
        ans = ds.answer_lengths
        return int(sum(int(ans[i]) for mb in micro_batches for i in mb))

    def compile_stats(self) -> dict[str, Any] | None:
        """With compile_layers: the compiled layers' graphs, recompiles and graph breaks so far
        (compile_regions.compile_stats); None without."""
        if not self.built.compiled_layers:
            return None
        return {"layers": self.built.compiled_layers, **compile_regions.compile_stats()}

    # ------------------------------------------------------------------ views
    @property
    def peft_model(self):
        """The PEFT model without any DDP/FSDP wrapper."""
        return self.runtime.accelerator.unwrap_model(self.model)

    @property
    def accelerator(self):
        return self.runtime.accelerator

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def world_size(self) -> int:
        return self.runtime.world_size

    @property
    def is_main(self) -> bool:
        return self.runtime.is_main

    @property
    def fsdp_version(self) -> int | None:
        return self.runtime.fsdp_version

    @property
    def attn_implementation(self) -> str:
        return self.built.attn_implementation

    @property
    def liger_applied(self) -> bool:
        return self.built.liger_applied


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


def run_training(cfg: TrainConfig, explicit: Iterable[str] = (), *, callbacks: Iterable[Callable] = ()) -> dict:
    """Set up and run one training job; return its summary (status: completed, early_stopped, interrupted)."""
    threads = torch.get_num_threads()
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    try:
        trainer = Trainer(cfg, explicit, callbacks=callbacks)
        try:
            trainer.setup()
        except KeyboardInterrupt as e:  # what the user is told: start-up stopped, nothing trained
            e.add_note("stopped during start-up, before the first training step (no checkpoint was written)")
            raise
        summary = trainer.train()
        trainer.runtime.end()  # only on a normal end: a rank leaving on an error must not wait for the others
        return summary
    finally:
        torch.set_num_threads(threads)
