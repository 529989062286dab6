"""Training throughput of S_F2.py's own code path against the seed-style QLoRA stack, in one run.

What it does (issue 8):
  1. builds a random bf16 checkpoint in EXAONE-3.5's own layout (7.8B shape by default; 2.4b and 32b
     selectable) with hai_medqa.fixtures.tiny_model.build_exaone_checkpoint, plus a small byte-level BPE
     tokenizer carrying EXAONE's special tokens and chat template;
  2. writes a synthetic jsonl whose tokenised sample lengths are lognormal around 330 tokens (clipped
     64-2048, fixed seed). The answers follow a learnable pattern (a fixed cycle of sentences) so a real
     training step visibly lowers the loss;
  3. for every variant (a training profile plus config overrides) runs the project's Trainer - the
     conversion, 4-bit load, LoRA, tokenisation, packing and Trainer.train_step that S_F2.py runs - in
     its own process, for `--warmup` + `--steps` optimizer steps;
  4. runs the seed-style baseline on the same tokenised samples: prepare_model_for_kbit_training, every
     sample padded to 1024 tokens, batch 8, the same LoRA settings and optimizer;
  5. reports per variant real (non-padding) tokens/s over the timed steps, peak GPU memory (allocated
     and reserved by PyTorch), MFU and the ratio to the baseline; a variant whose loss did not fall or
     whose gradient norm was zero is reported as FAILED instead of a speed.

MFU = real_tokens/s * 6 * N / peak_flops with gradient checkpointing (forward + recomputed forward +
input-gradient backward; the frozen base has no weight gradient), 4 * N without. N = the parameters of
the decoder layers' seven projections plus lm_head (the matrix products every token passes through);
attention-score FLOPs (under 3% at ~330-token samples) and LoRA's own FLOPs (<1%) are left out.
peak_flops = 989e12 (H100 SXM dense bf16) unless --peak-tflops says otherwise.

Usage (GPU):
    python bench/train_throughput.py --shape 7.8b --variants fast,lean --baseline --out results.json
    python bench/train_throughput.py --variants "plain;fast;fast:gradient_checkpointing=false"
A variant is PROFILE[:key=value,...] with any TrainConfig key as an override, e.g.
    python bench/train_throughput.py --shape 7.8b --variants "lean;lean:offload_activations=true"

Evaluation (`--val-records N`): the Trainer gets a validation file of N synthetic records and evaluates
every `--eval-steps` steps and at the end, as S_F2.py does with the shipped configs. The reported peak
memory then includes evaluation (`peak_reserved_gib`, and apart: `train_peak_reserved_gib` just before
the first evaluation, `eval_peak_reserved_gib` the highest after any); evaluation and the adapter it
saves are timed apart and left out of the tokens/s.
    python bench/train_throughput.py --shape 7.8b --variants lean --val-records 400 --eval-steps 2

Peers in the same invocation (`--peers`, issue 17): TRL's SFTTrainer (BFD padding-free packing, Liger, flex
or sdpa attention, with and without checkpointing) and Unsloth (its offloaded checkpointing and none) train on
the same checkpoint (its Llama-layout conversion), the same tokenised samples and the same tokens per step,
each in its own process with its own PYTHONPATH (bench/peers.py; the wheels: bench/peer_wheels.py). A peer
whose packages are missing is skipped with the reason in the JSON; the rest runs.
    python bench/train_throughput.py --shape 7.8b --variants "fast;lean" --baseline --peers trl,unsloth \
        --peer-kit /tmp/kit                      # or --peer-site trl=DIR:DIR --peer-site unsloth=DIR:DIR
    python bench/train_throughput.py --variants "fast;lean" --peers trl:flex,unsloth --gpus 0,1
`--gpus 0,1` runs the arms two at a time, each alone on one GPU (every arm still has a whole GPU).

Several GPUs (`--num-processes N`): every variant runs under `accelerate launch` with
configs/accelerate/ddp.yaml (or `--accelerate-config`, e.g. fsdp_qlora.yaml) on N processes, each with
the variant's own micro-batches and accumulation (so N times the tokens per optimizer step), and - unless
`--no-single-reference` - once more on one process. Reported: total and per-GPU real tokens/s, the
scaling over the single process (ideal = N), and every GPU's peak memory.
    python bench/train_throughput.py --shape 7.8b --variants fast --num-processes 2
    python bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants lean --num-processes 2 \
        --accelerate-config configs/accelerate/fsdp_qlora.yaml --no-single-reference
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # CPU only for a smoke test of the mechanics (--shape tiny)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peaks() -> dict:
    if not CUDA:
        return {"peak_allocated_gib": float("nan"), "peak_reserved_gib": float("nan")}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}

SENTENCES = [  # the learnable pattern: answers walk this cycle from a random starting point
    "충분한 수분을 섭취하고 규칙적으로 생활하는 것이 중요합니다.",
    "증상이 계속되면 가까운 병원에서 진료를 받으시기 바랍니다.",
    "약은 의사와 상의한 뒤 정해진 용법대로 복용하세요.",
    "가벼운 운동은 혈액순환과 회복에 도움이 됩니다.",
    "기름진 음식과 음주는 증상을 악화시킬 수 있습니다.",
    "정기적인 검진으로 질환을 조기에 발견할 수 있습니다.",
    "손을 자주 씻는 것은 감염 예방의 기본입니다.",
    "충분한 수면은 면역력 유지에 필수적입니다.",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()})  # the "words" pattern's draws
QUESTIONS = ["두통이 자주 생기는데 어떻게 관리해야 하나요?", "고혈압 환자는 어떤 음식을 피해야 하나요?",
             "감기에 걸렸을 때 운동을 해도 되나요?", "당뇨병 예방을 위한 생활 습관이 궁금합니다."]


def matmul_params(cfg: dict) -> int:
    """Parameters every trained token is multiplied by: seven projections per layer plus lm_head."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2
    mlp = 3 * h * i
    return layers * (attn + mlp) + h * cfg["vocab_size"]


# ------------------------------------------------------------------------------------------ data
def write_synthetic_jsonl(path: Path, tokenizer, n: int, seed: int, pattern: str = "cycle") -> dict:
    """n records whose rendered, tokenised length is lognormal(log 330, 0.5) clipped to 64..2048.

    pattern "cycle": each answer walks the sentence cycle from a random start (learnt almost perfectly within
    tens of steps; the loss tends to ~0.01, where relative differences between runs are noise). "random":
    every sentence is drawn at random, so ln(8) nats per ~20-token sentence stay unlearnable (a loss floor of
    ~0.1). "words": every word is drawn at random from the sentences' words, so ln(len(WORDS)) nats per word stay
    unlearnable: a floor near 1 nat per answer token, where a real fine-tune's loss sits, so a relative
    difference between two runs means what it would mean there. Returns the records' count, their mean target
    length and, for the random patterns, ``loss_floor``: the unlearnable nats per answer token (the answer's
    tokens and its [|endofturn|]) that no model can go below.

    >>> len(WORDS), WORDS[0]
    (50, '가까운')
    """
    import random

    from hai_medqa import chat_format

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    targets = torch.exp(torch.randn(n, generator=gen) * 0.5 + math.log(330)).clamp(64, 2048).long().tolist()
    units = WORDS if pattern == "words" else SENTENCES  # what each draw picks
    unit_ids = [tokenizer(u, add_special_tokens=False)["input_ids"] for u in units]
    lengths, nats, answer_tokens = [], 0.0, 0
    with open(path, "w", encoding="utf-8") as f:
        for target in targets:
            q = rng.choice(QUESTIONS)
            prompt, _ = chat_format.split_prompt_answer(chat_format.record_to_messages({"instruction": q, "output": "x"}))
            budget = max(8, target - len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1)
            parts, used, k = [], 0, rng.randrange(len(units))
            while used < budget:
                parts.append(units[k % len(units)])
                used += len(unit_ids[k % len(units)]) + 1
                k = k + 1 if pattern == "cycle" else rng.randrange(len(units))
            answer = " ".join(parts)
            if pattern != "cycle":  # every draw after the first is one uniform choice among len(units)
                nats += (len(parts) - 1) * math.log(len(units))
                answer_tokens += len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1
            f.write(json.dumps({"instruction": q, "output": answer}, ensure_ascii=False) + "\n")
            lengths.append(target)
    info: dict[str, Any] = {"records": n, "target_mean": sum(lengths) / n, "pattern": pattern}
    if answer_tokens:
        info["loss_floor"] = round(nats / answer_tokens, 4)
    return info


# --------------------------------------------------------------------------------------- children
def full_collection_cost() -> dict[str, Any]:
    """How long one full garbage collection takes now, with the heap as the trainer keeps it (frozen after its
    first step) and with nothing frozen (what every full collection cost before): ms, and the objects walked."""
    frozen = gc.get_freeze_count()
    t0 = time.perf_counter()
    gc.collect()
    as_kept = (time.perf_counter() - t0) * 1e3
    walked_as_kept = len(gc.get_objects())
    gc.unfreeze()
    t0 = time.perf_counter()
    gc.collect()
    unfrozen = (time.perf_counter() - t0) * 1e3
    walked_unfrozen = len(gc.get_objects())
    if frozen:
        gc.freeze()  # as the trainer had it
    return {"frozen_objects": frozen, "full_collection_ms": round(as_kept, 1), "objects_walked": walked_as_kept,
            "full_collection_ms_unfrozen": round(unfrozen, 1), "objects_walked_unfrozen": walked_unfrozen}


def run_variant(spec: dict) -> dict:
    """One profile of the project's own Trainer, timed by a callback on its real loop."""
    from peers import median_step_tokens_per_s  # bench/peers.py: the peers' figure, computed the same way

    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.trainer import Trainer

    overrides = dict(spec["overrides"])
    explicit = set(overrides) | {"profile"}
    cfg = TrainConfig(model=spec["model"], train_file=spec["train_file"], val_file=spec.get("val_file"),
                      output_dir=spec["output_dir"], cache_dir=spec["cache_dir"], profile=spec["profile"],
                      max_steps=spec["warmup"] + spec["steps"] + spec.get("kernel_profile_steps", 0),
                      save_steps=10**6, logging_steps=5,
                      tensorboard=False, warmup_ratio=0.0, early_stopping_patience=None,
                      # constant, as the baseline and the peer arms train: a step's learning rate must not
                      # depend on how many steps the arm runs (--kernel-profile adds some), so curves compare
                      lr_scheduler=overrides.pop("lr_scheduler", "constant"), learning_rate=spec["lr"],
                      eval_steps=spec.get("eval_steps") or 200, max_eval_samples=None,
                      gradient_accumulation_steps=overrides.pop("gradient_accumulation_steps", 1), **overrides)
    records: list[dict] = []
    evals: list[dict] = []
    t_mark: dict[str, float] = {}
    # --kernel-profile: traced steps come after the timed ones, so the profiler never slows the tok/s figure
    from kernel_breakdown import StepProfiler

    profiler = StepProfiler(spec["warmup"] + spec["steps"], spec.get("kernel_profile_steps", 0), cuda=CUDA,
                            with_stack=spec.get("kernel_profile_stack", False))

    # Garbage collections during the timed steps: a full one walks every live Python object while the host
    # launches nothing (hai_medqa/train/runtime.py: freeze_python_heap); each pause is recorded here.
    gc_pauses: list[tuple[int, float]] = []  # (generation, ms)
    gc_state: dict[str, Any] = {"timing": False, "start": 0.0}

    def on_gc(phase, info):
        if phase == "start":
            gc_state["start"] = time.perf_counter()
        elif gc_state["timing"]:
            gc_pauses.append((info["generation"], (time.perf_counter() - gc_state["start"]) * 1e3))

    gc.callbacks.append(on_gc)
    gc_cost: dict[str, Any] = {}

    def on_step(trainer, rec):
        _sync()
        now = time.perf_counter()
        rec = dict(rec, wall=now - t_mark.get("last", now))
        t_mark["last"] = now
        if rec["step"] == spec["warmup"]:
            _reset_peak()
            gc_state["timing"] = True
        records.append(rec)
        if rec["step"] == spec["warmup"] + spec["steps"]:
            gc_state["timing"] = False
            gc_cost.update(full_collection_cost())  # after the timed steps: its time is charged to none of them
            t_mark["last"] = time.perf_counter()
        profiler.on_step(rec["step"])

    trainer = Trainer(cfg, explicit, callbacks=[on_step])
    trainer.setup()

    def timed_apart(fn, what):
        """Run fn outside the step timing (its time is taken off the next step's wall)."""
        def run(*args, **kwargs):
            _sync()
            before, t0 = _peaks(), time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            dt = time.perf_counter() - t0
            t_mark["last"] = t_mark.get("last", 0.0) + dt
            if what == "evaluate":
                evals.append({"step": trainer.state.global_step, "seconds": dt, "val_loss": out["val_loss"],
                              "peak_reserved_before_gib": before["peak_reserved_gib"],
                              "peak_reserved_after_gib": _peaks()["peak_reserved_gib"]})
            return out
        return run

    trainer.evaluate = timed_apart(trainer.evaluate, "evaluate")
    trainer.save_adapter = timed_apart(trainer.save_adapter, "save_adapter")
    t_mark["last"] = time.perf_counter()
    try:
        trainer.train()
    finally:
        gc.callbacks.remove(on_gc)  # the tests call run_variant in their own process
    timed = [r for r in records if spec["warmup"] < r["step"] <= spec["warmup"] + spec["steps"]]
    # What each process saw itself: its GPU's peak, its step walls (a pause on one rank stalls all at the next
    # all-reduce, but only that rank's record shows where) and its garbage collections.
    mine = {"peaks": _peaks(), "step_walls_s": [round(r["wall"], 4) for r in timed],
            "gc": {**gc_cost, "collections_in_timed_steps": {g: sum(1 for gen, _ in gc_pauses if gen == g)
                                                             for g in (0, 1, 2)},
                   "pause_ms_total": round(sum(ms for _, ms in gc_pauses), 1),
                   "pause_ms_max": round(max((ms for _, ms in gc_pauses), default=0.0), 1)}}
    ranks = [mine]
    if trainer.world_size > 1:  # gathered to rank 0 (the step records are global on every rank)
        import torch.distributed as dist

        ranks = [None] * trainer.world_size
        dist.all_gather_object(ranks, mine)
    if not trainer.is_main:
        return None
    peaks = [r["peaks"] for r in ranks]
    wall = sum(r["wall"] for r in timed)  # includes collation and logging: what users get
    tokens = sum(r["tokens"] for r in timed)
    return {"name": spec["name"], "profile": trainer.profile_used, "config": {
        k: getattr(trainer.cfg, k) for k in ("attn_implementation", "liger_kernel", "gradient_checkpointing",
                                             "checkpoint_every_n_layers", "tokens_per_micro_batch",
                                             "pad_to_fixed_length", "lora_dropout", "gradient_accumulation_steps",
                                             "lora_kernel", "dequantize_cache", "optimizer", "base_precision",
                                             "compile_layers", "offload_activations", "lr_scheduler")
        if hasattr(trainer.cfg, k)},
        "attn_used": trainer.attn_implementation, "liger_used": trainer.liger_applied,
        "real_tokens_per_s": tokens / wall, "steps_timed": len(timed), "tokens_timed": tokens,
        "real_tokens_per_s_median_step": median_step_tokens_per_s(tokens, [r["wall"] for r in timed]),
        "num_processes": trainer.world_size, "fsdp_version": trainer.fsdp_version,
        "fsdp_units": trainer.built.fsdp_units,  # decoder layers, untied embedding, root (LoRA replicated: fsdp_lora.py)
        "offloaded_layers": trainer.built.offloaded_layers,  # offload_activations (activation_offload.py)
        "real_tokens_per_s_per_gpu": tokens / wall / trainer.world_size,
        # the report's peak is the largest GPU's; per_gpu_peaks lists them all
        "peak_allocated_gib": max(p["peak_allocated_gib"] for p in peaks),
        "peak_reserved_gib": max(p["peak_reserved_gib"] for p in peaks), "per_gpu_peaks": peaks,
        "gradient_checkpointing": trainer.cfg.gradient_checkpointing,
        "evaluations": evals,
        # Reserved memory stays with PyTorch's allocator, so each reading covers everything before it
        # (back to the start, or to the warm-up reset when the first evaluation comes after it).
        "train_peak_reserved_gib": evals[0]["peak_reserved_before_gib"] if evals else None,
        "eval_peak_reserved_gib": max((e["peak_reserved_after_gib"] for e in evals), default=None),
        "losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
        "batch_digests": [r.get("batch_digest") for r in records],  # which samples each step trained on
        "step_walls_s": mine["step_walls_s"], "gc": mine["gc"],  # rank 0's; a pause shows as one slow step
        "per_rank_step_walls_s": [r["step_walls_s"] for r in ranks], "per_rank_gc": [r["gc"] for r in ranks],
        "compile": trainer.compile_stats(),  # compile_layers: graphs, recompiles, graph breaks (else None)
        "kernel_breakdown": profiler.result}  # --kernel-profile (bench/kernel_breakdown.py), else None


def run_baseline(spec: dict) -> dict:
    """The seed-style stack: prepare_model_for_kbit_training, pad to 1024, batch 8, same LoRA and optimizer."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from hai_medqa.model.acquire import resolve_model
    from hai_medqa.model.load import bnb_4bit_config, load_tokenizer
    from hai_medqa.train.config import LORA_TARGET_MODULES
    from hai_medqa.train.sft_data import load_tokenized

    path = resolve_model(spec["model"])
    tok = load_tokenizer(path)
    ds = load_tokenized(spec["train_file"], tok, max_length=2048, overlong="truncate", system_prompt=None,
                        cache_dir=Path(spec["cache_dir"]), what="train_file")
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=bnb_4bit_config(torch.bfloat16),
                                                 dtype=torch.bfloat16, device_map={"": 0 if CUDA else "cpu"}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                              target_modules=list(LORA_TARGET_MODULES)))
    model.train()
    opt = (bnb.optim.PagedAdamW8bit if CUDA else torch.optim.AdamW)([p for p in model.parameters() if p.requires_grad],
                                                                     lr=spec["lr"])
    pad_id = tok.pad_token_id
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    losses, norms, walls, toks = [], [], [], []
    _sync()
    for step in range(spec["warmup"] + spec["steps"]):
        idx = order[step * 8:(step + 1) * 8]
        ids = torch.full((8, 1024), pad_id, dtype=torch.long)
        labels = torch.full((8, 1024), -100, dtype=torch.long)
        mask = torch.zeros((8, 1024), dtype=torch.long)
        real = 0
        for row, i in enumerate(idx):
            x = torch.from_numpy(ds.sample(i)[0][:1024].astype("int64"))
            y = torch.from_numpy(ds.labels(i)[:1024])
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = x, y, 1
            real += len(x)
        t0 = time.perf_counter()
        out = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE))
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
        norms.append(float(norm))
        _sync()
        if step == spec["warmup"] - 1:
            _reset_peak()
        if step >= spec["warmup"]:
            walls.append(time.perf_counter() - t0)
            toks.append(real)
    return {"name": "baseline", "profile": "seed-style", "real_tokens_per_s": sum(toks) / sum(walls),
            "steps_timed": len(walls), "tokens_timed": sum(toks), "gradient_checkpointing": True,
            **_peaks(), "losses": losses, "grad_norms": norms,
            "config": {"batching": "pad to 1024, batch 8", "prepare_model_for_kbit_training": True,
                       "lora_dropout": 0.05, "attn_implementation": "sdpa"}}


def judge(result: dict, n_params: int, peak_tflops: float) -> dict:
    """Add MFU and the real-training check (loss falls, gradients non-zero)."""
    losses, norms = result["losses"], result["grad_norms"]
    k = max(2, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    # a peer that logs no gradient norm (norms == []) is judged by its loss alone
    ok = all(math.isfinite(x) for x in losses) and last < first - 0.02 * abs(first) and (not norms or min(norms) > 0)
    flops_per_token = (6 if result["gradient_checkpointing"] else 4) * n_params
    result.update(loss_first=first, loss_last=last, training_ok=ok,
                  mfu=result.get("real_tokens_per_s_per_gpu", result["real_tokens_per_s"]) * flops_per_token
                  / (peak_tflops * 1e12))
    return result


def loss_parity(ref: dict, other: dict, *, window: int = 10, target: float = 0.02) -> dict:
    """Per-step loss of `other` against `ref` (the same steps on the same data): mean and max of
    |l - l_ref| / l_ref, the mean absolute difference, and the same relative difference on `window`-step
    means (less sensitive to one step's noise). `same_batches` says whether every step trained on the same
    samples (the trainer's batch digests); without it the comparison means nothing."""
    a, b = other["losses"], ref["losses"]
    n = min(len(a), len(b))
    rel = [abs(x - y) / abs(y) for x, y in zip(a[:n], b[:n], strict=True)]
    wins = [(sum(a[i:i + window]) / len(a[i:i + window]), sum(b[i:i + window]) / len(b[i:i + window]))
            for i in range(0, n, window)]
    wrel = [abs(x - y) / abs(y) for x, y in wins]
    same = (len(a) == len(b) and other.get("batch_digests") is not None
            and other.get("batch_digests") == ref.get("batch_digests"))
    mean_rel = sum(rel) / n
    return {"reference": ref["name"], "steps": n, "same_batches": same, "mean_rel_diff": mean_rel,
            "max_rel_diff": max(rel), "max_rel_diff_step": rel.index(max(rel)) + 1,
            "mean_abs_diff": sum(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)) / n,
            "window": window, "window_mean_rel_diff": sum(wrel) / len(wrel), "window_max_rel_diff": max(wrel),
            "target_mean_rel_diff": target, "met": bool(same and mean_rel <= target)}


# ------------------------------------------------------------------------------------------- main
def parse_variant(text: str) -> dict:
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            overrides[key.strip()] = value.strip()  # names such as flex_attention
    return {"name": text, "profile": name, "overrides": overrides}


def _run_arm(spec: dict, cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
             prefix: str | None = None) -> tuple[int, float]:
    """Run one arm's process; with `prefix`, its output lines are prefixed (arms running side by side)."""
    t = time.time()
    if prefix is None:
        return subprocess.run(cmd, check=False, env=env, cwd=cwd).returncode, time.time() - t
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    for line in proc.stdout:
        print(f"{prefix} {line}", end="", flush=True)
    return proc.wait(), time.time() - t


def run_jobs(jobs: list[dict], gpus: list[str] | None, collect) -> None:
    """Run every job ({"spec", "cmd", "env", "cwd"}) in order, or - with `gpus` - one per GPU at a time
    (CUDA_VISIBLE_DEVICES set per arm, so each arm has a GPU to itself). `collect(job, rc, seconds, gpu)`
    is called once per job, under a lock."""
    lock = threading.Lock()
    if not gpus:
        for job in jobs:
            rc, dt = _run_arm(job["spec"], job["cmd"], env=job.get("env"), cwd=job.get("cwd"))
            collect(job, rc, dt, None)
        return
    queue = list(jobs)

    def worker(gpu: str) -> None:
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            env = dict(job.get("env") or os.environ, CUDA_VISIBLE_DEVICES=gpu)
            rc, dt = _run_arm(job["spec"], job["cmd"], env=env, cwd=job.get("cwd"), prefix=f"[gpu{gpu}]")
            with lock:
                collect(job, rc, dt, gpu)

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def compare_with_peers(results: list[dict]) -> None:
    """For each of the project's single-process arms: its speed over the best TRL arm and the Unsloth arm
    with the same recomputation choice (checkpointing or not), stored as r["vs_peers"]."""
    ok = [r for r in results if "error" not in r and "skipped" not in r and r.get("training_ok")]
    peers = [r for r in ok if r.get("peer")]
    for r in ok:
        if r.get("peer") or r["name"] == "baseline" or r.get("num_processes", 1) != 1:
            continue
        vs = {}
        for peer in ("trl", "unsloth"):
            same = [p for p in peers if p["peer"] == peer and p["gradient_checkpointing"] == r["gradient_checkpointing"]]
            if same:
                best = max(same, key=lambda p: p["real_tokens_per_s"])
                mine, theirs = r.get("real_tokens_per_s_median_step"), best.get("real_tokens_per_s_median_step")
                vs[peer] = {"arm": best["arm"], "exact_equivalent": best["exact_equivalent"],
                            "ratio": r["real_tokens_per_s"] / best["real_tokens_per_s"],
                            # a few slow steps on either side move the mean-based ratio (TRL: 1.37x mean, 1.23x
                            # median steps in one invocation): both are reported
                            "ratio_median_step": mine / theirs if mine and theirs else None}
        if vs:
            r["vs_peers"] = vs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7.8b", choices=["tiny", "2.4b", "7.8b", "32b"],
                    help="model shape (tiny: CPU smoke test of the mechanics only)")
    ap.add_argument("--variants", default="fast;lean", help="';'-separated PROFILE[:key=value,...]")
    ap.add_argument("--baseline", action="store_true", help="also run the seed-style baseline")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--records", type=int, default=4000)
    ap.add_argument("--val-records", type=int, default=0,
                    help="give every variant a validation file of N synthetic records (0: no evaluation), so the "
                         "peak memory includes evaluation")
    ap.add_argument("--eval-steps", type=int, default=5, help="with --val-records: evaluate every N steps (and at the end)")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="learning rate of every arm, constant (high, so the loss check is decisive in a few steps)")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/hai_bench"))
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--storage-dtype", default=None,
                    help="dtype of the random checkpoint's tensors on disk (default: the shape's bf16). "
                         "float8_e4m3fn halves the 32B checkpoint (64 -> 32 GB) so it fits a RAM disk; the "
                         "loader casts to bf16 and quantises to NF4 exactly as for a bf16 checkpoint")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "train_throughput.json"))
    ap.add_argument("--num-processes", type=int, default=1,
                    help="run every variant on N processes (GPUs) under `accelerate launch` (default 1: plain process)")
    ap.add_argument("--accelerate-config", default=str(REPO / "configs" / "accelerate" / "ddp.yaml"),
                    help="accelerate config for --num-processes > 1 (configs/accelerate/fsdp_qlora.yaml for FSDP-QLoRA)")
    ap.add_argument("--no-single-reference", action="store_true",
                    help="with --num-processes > 1, skip the 1-process run of each variant (e.g. FSDP on a model "
                         "that does not fit one GPU)")
    ap.add_argument("--same-global-batch", action="store_true",
                    help="with --num-processes N > 1, run the 1-process reference with N times the accumulation, so "
                         "both take the same optimizer steps and their loss curves can be compared step by step")
    ap.add_argument("--peers", default="",
                    help="also run peer arms (bench/peers.py), comma-separated prefixes: all, trl, trl:flex, trl:sdpa, "
                         "unsloth, or full keys such as trl:flex:ckpt, unsloth:nockpt")
    ap.add_argument("--peer-site", action="append", default=[], metavar="PEER=PATH[:PATH]",
                    help="PYTHONPATH of a peer's processes (repeatable; e.g. unsloth=/tmp/kit/site_unsloth:/tmp/kit/"
                         "site_common). Without one a peer runs in this process's environment")
    ap.add_argument("--peer-kit", default=None,
                    help="a folder unpacked by `bench/peer_wheels.py unpack`: sets every peer's PYTHONPATH from it")
    ap.add_argument("--peer-data", default="tokenized", choices=["tokenized", "conversational"],
                    help="what the peers are given: the project's tokenised samples (input_ids + labels, the exact "
                         "tokens the profiles train on; default) or prompt/completion messages for their chat template")
    ap.add_argument("--peer-tokens", type=int, default=None,
                    help="tokens per optimizer step of the peer arms (default: TrainConfig's tokens_per_micro_batch)")
    ap.add_argument("--gpus", default=None,
                    help="comma-separated GPU ids: run the single-process arms side by side, one per GPU (e.g. 0,1)")
    ap.add_argument("--loss-parity", action="store_true",
                    help="compare every variant's per-step loss with the first variant's (same data order and seed): "
                         "mean/max relative difference, target mean <= 2%% (issue 17's FP8 check; use --steps >= 200 "
                         "and --data-pattern random)")
    ap.add_argument("--data-pattern", default="cycle", choices=["cycle", "random", "words"],
                    help="synthetic answers: cycle (learnt to ~0.01 loss within tens of steps), random (sentences "
                         "drawn at random: a loss floor of ~0.1, so long runs stay comparable) or words (words drawn "
                         "at random: a floor near 1 nat per token, where a real fine-tune's loss sits)")
    ap.add_argument("--kernel-profile", type=int, default=0, metavar="N",
                    help="trace N more optimizer steps of each project arm with torch.profiler, after its timed steps, "
                         "and report its GPU time by kernel family and the GPU's idle time by trainer phase "
                         "(bench/kernel_breakdown.py)")
    ap.add_argument("--kernel-profile-stack", action="store_true",
                    help="with --kernel-profile: record Python frames too, so the host time the GPU waited for is "
                         "named down to the Python function (slows the traced steps' host a lot: read where, not "
                         "how much)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:  # one variant in its own process: no kernel patches or memory carried across
        spec = json.loads(args.child)
        result = run_baseline(spec) if spec["name"] == "baseline" else run_variant(spec)
        if result is not None:  # None: not rank 0 of a multi-process variant
            Path(spec["result_file"]).write_text(json.dumps(result))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers as peer_mod  # bench/peers.py
    from kernel_breakdown import format_breakdown

    # Every input checked before the checkpoint is built.
    if args.num_processes < 1:
        ap.error("--num-processes must be >= 1")
    if args.kernel_profile < 0:
        ap.error("--kernel-profile must be >= 0 (the number of steps to trace)")
    if args.kernel_profile_stack and not args.kernel_profile:
        ap.error("--kernel-profile-stack needs --kernel-profile N")
    try:
        peer_arms = peer_mod.parse_peers(args.peers)
        peer_sites = peer_mod.parse_peer_sites(args.peer_site, args.peer_kit)
    except peer_mod.PeerError as e:
        ap.error(str(e))
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    if gpus and args.num_processes > 1:
        ap.error("--gpus runs single-process arms side by side; it cannot be combined with --num-processes > 1")

    from hai_medqa.fixtures.tiny_model import build_exaone_checkpoint, build_tokenizer, resolve_shape
    from hai_medqa.model.load import load_tokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HAI_MEDQA_CACHE", str(work / "cache"))
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir)
    ckpt = work / f"exaone-{args.shape}"
    t0 = time.time()
    if not (ckpt / "config.json").exists():
        build_exaone_checkpoint(ckpt, args.shape, tokenizer_dir=tok_dir, device=DEVICE, dtype=args.storage_dtype)
    build_s = time.time() - t0
    data = work / ("synthetic.jsonl" if args.data_pattern == "cycle" else f"synthetic_{args.data_pattern}.jsonl")
    info = write_synthetic_jsonl(data, load_tokenizer(tok_dir), args.records, seed=0, pattern=args.data_pattern)
    val_data = None
    if args.val_records:
        val_data = work / "synthetic_val.jsonl"
        info["val"] = write_synthetic_jsonl(val_data, load_tokenizer(tok_dir), args.val_records, seed=1)
    n_params = matmul_params(resolve_shape(args.shape))

    variants = [parse_variant(v) for v in args.variants.split(";") if v.strip()]
    specs = []
    for v in variants:
        if args.num_processes == 1 or not args.no_single_reference:
            single = dict(v, processes=1)
            if args.same_global_batch and args.num_processes > 1:
                acc = int(v["overrides"].get("gradient_accumulation_steps", 1)) * args.num_processes
                single["overrides"] = {**v["overrides"], "gradient_accumulation_steps": acc}
            specs.append(single)
        if args.num_processes > 1:
            specs.append(dict(v, name=f"{v['name']} x{args.num_processes}", processes=args.num_processes))
    if args.baseline:
        specs.insert(0, {"name": "baseline", "profile": "seed-style", "overrides": {}, "processes": 1})
    jobs = []
    for i, spec in enumerate(specs):
        spec.update(model=str(ckpt), train_file=str(data), output_dir=str(work / f"run{i}"),
                    cache_dir=str(work / "tokcache"), warmup=args.warmup, steps=args.steps, lr=args.lr,
                    kernel_profile_steps=args.kernel_profile, kernel_profile_stack=args.kernel_profile_stack,
                    val_file=str(val_data) if val_data and spec["name"] != "baseline" else None,
                    eval_steps=args.eval_steps, result_file=str(work / f"result{i}.json"))
        cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
        if spec["processes"] > 1:  # the launcher users run (docs/training.md "Several GPUs")
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", args.accelerate_config,
                   "--num_processes", str(spec["processes"]), *cmd[1:]]
        jobs.append({"key": i, "spec": spec, "cmd": cmd})

    # Peers: the same checkpoint (its Llama-layout conversion, which the profiles' Trainer also loads), the
    # same tokenised samples and the same tokens per optimizer step.
    peer_info: dict = {}
    order = list(range(len(jobs)))  # the rows of the report (job index or peer name), skipped peers in place
    done: dict = {}
    if peer_arms:
        from hai_medqa.model.convert import ensure_llama_checkpoint
        from hai_medqa.train.config import LORA_TARGET_MODULES, TrainConfig

        llama = ensure_llama_checkpoint(ckpt)
        peer_data = work / "peer_data.jsonl"
        info["peer_data"] = peer_mod.write_peer_data(data, llama, peer_data, work / "tokcache")
        tokens = args.peer_tokens or TrainConfig.__dataclass_fields__["tokens_per_micro_batch"].default
        for peer in dict.fromkeys(peer_mod.ARMS[a].peer for a in peer_arms):
            peer_info[peer] = peer_mod.check_peer(peer, peer_sites, CUDA)
            if not peer_info[peer]["ok"]:
                # one line; the peers are a bench-only option, so nothing here asks for an install
                print(f"peer {peer}: skipped ({peer_info[peer]['reason']})", flush=True)
        for j, key in enumerate(peer_arms):
            arm = peer_mod.ARMS[key]
            i = len(specs) + j
            order.append(f"peer {key}" if not peer_info[arm.peer]["ok"] else len(jobs))
            if not peer_info[arm.peer]["ok"]:
                done[f"peer {key}"] = {"name": f"peer {key}", "peer": arm.peer, "arm": key,
                                       "skipped": peer_info[arm.peer]["reason"], **peer_mod.describe({"arm": key})}
                continue
            spec = peer_mod.make_spec(key, model=str(llama), data_file=str(peer_data), data_mode=args.peer_data,
                                      tokens=tokens, warmup=args.warmup, steps=args.steps, lr=args.lr,
                                      lora_targets=list(LORA_TARGET_MODULES), output_dir=str(work / f"run{i}"),
                                      result_file=str(work / f"result{i}.json"))
            # cwd: Unsloth writes its compiled-kernel cache into the working directory
            jobs.append({"key": len(jobs), "spec": spec, "cmd": peer_mod.child_command(spec),
                         "env": peer_mod.peer_env(arm.peer, peer_sites), "cwd": spec["output_dir"], "peer": True})

    for job in jobs:
        subprocess.run(["rm", "-rf", job["spec"]["output_dir"], job["spec"]["result_file"]], check=False)
        if job.get("peer"):
            Path(job["spec"]["output_dir"]).mkdir(parents=True)

    def collect(job: dict, rc: int, seconds: float, gpu: str | None) -> None:
        spec = job["spec"]
        if rc != 0 or not Path(spec["result_file"]).exists():
            done[job["key"]] = {"name": spec["name"], "error": f"exit code {rc}",
                                **({"peer": spec["peer"], "arm": spec["arm"], **peer_mod.describe(spec)}
                                   if job.get("peer") else {})}
            return
        res = json.loads(Path(spec["result_file"]).read_text())
        if job.get("peer"):
            res.update(peer_mod.describe(res))
        res = judge(res, n_params, args.peak_tflops)
        res["process_s"] = round(seconds, 1)
        if gpu is not None:
            res["gpu"] = gpu
        done[job["key"]] = res
        with Path(args.out).with_suffix(".partial.jsonl").open("a") as f:
            f.write(json.dumps(res) + "\n")
        print("RESULT", json.dumps({k: v for k, v in res.items()
                                    if k not in ("losses", "grad_norms", "tokens_per_step", "step_walls",
                                                 "batch_digests")}), flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run_jobs(jobs, gpus, collect)
    results = [done[key] for key in order]

    base = next((r for r in results if r["name"] == "baseline" and "error" not in r), None)
    singles = {r["name"]: r for r in results if "error" not in r and r.get("num_processes") == 1}
    for r in results:  # scaling of an N-process variant over the same variant on one process
        single = singles.get(r["name"].rsplit(" x", 1)[0]) if r.get("num_processes", 1) > 1 else None
        if single and "error" not in r:
            r["scaling_vs_1_process"] = r["real_tokens_per_s"] / single["real_tokens_per_s"]
            if args.same_global_batch and len(r.get("losses", [])) == len(single.get("losses", [])) > 0:
                rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], single["losses"], strict=True)]
                r["loss_vs_1_process"] = {"mean_rel_diff": sum(rel) / len(rel), "max_rel_diff": max(rel)}
    compare_with_peers(results)
    parity_ref = next((r for r in results if args.loss_parity and "error" not in r and "skipped" not in r
                       and r["name"] != "baseline" and not r.get("peer") and r.get("num_processes") == 1), None)
    for r in results if parity_ref else []:  # --loss-parity: every other arm against the first variant
        if r is not parity_ref and "error" not in r and "skipped" not in r and r.get("losses"):
            r["loss_parity"] = loss_parity(parity_ref, r)
    import bitsandbytes
    import peft
    import transformers  # noqa: E401 - versions for the record

    report = {"shape": args.shape, "device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__,
              "bitsandbytes": bitsandbytes.__version__, "date": time.strftime("%Y-%m-%d"),
              "num_processes": args.num_processes, "matmul_params": n_params, "storage_dtype": args.storage_dtype or "bfloat16", "data": info, "build_s": round(build_s, 1), "results": results}
    if peer_arms:
        report["peers"] = {"arms": peer_arms, "data": args.peer_data, "environments": peer_info}
    if gpus:
        report["gpus_side_by_side"] = gpus
    print(f"\n{args.shape} on {report['device']} (torch {torch.__version__}, transformers {transformers.__version__})")
    print(f"{'variant':<58} {'real tok/s':>10} {'x base':>7} {'MFU':>6} {'alloc':>7} {'reserv':>7}  check")
    for r in results:
        name = r["name"]
        if r.get("peer"):  # "=": same stock pieces as that profile; "~": same maths, other kernels
            name = f"{name} [{'=' if r['exact_equivalent'] else '~'}{r['peer_of']}]"
        if "skipped" in r:
            print(f"{name:<58} SKIPPED {r['skipped']}")
            continue
        if "error" in r:
            print(f"{name:<58} ERROR {r['error']}")
            continue
        ratio = r["real_tokens_per_s"] / base["real_tokens_per_s"] if base else float("nan")
        r["ratio_to_baseline"] = ratio
        speed = f"{r['real_tokens_per_s']:>10,.0f}" if r["training_ok"] else f"{'FAILED':>10}"
        print(f"{name:<58} {speed} {ratio:>7.2f} {r['mfu']:>6.1%} {r['peak_allocated_gib']:>6.1f}G "
              f"{r['peak_reserved_gib']:>6.1f}G  loss {r['loss_first']:.3f}->{r['loss_last']:.3f}")
        if r.get("eval_peak_reserved_gib") is not None:
            print(f"{'':<4}{len(r['evaluations'])} evaluations: peak reserved {r['train_peak_reserved_gib']:.1f}G before "
                  f"the first, {r['eval_peak_reserved_gib']:.1f}G with them; "
                  f"{sum(e['seconds'] for e in r['evaluations']):.1f} s (left out of tok/s)")
        if r.get("num_processes", 1) > 1:
            scaling = r.get("scaling_vs_1_process")
            print(f"{'':<4}{r['num_processes']} processes: {r['real_tokens_per_s_per_gpu']:,.0f} tok/s per GPU"
                  + (f", {scaling:.2f}x the 1-process run" if scaling else "") + "; peak per GPU (alloc/reserved) "
                  + ", ".join(f"{p['peak_allocated_gib']:.1f}/{p['peak_reserved_gib']:.1f}G" for p in r["per_gpu_peaks"]))
        if r.get("per_rank_step_walls_s"):  # a stall: one slow step (on which rank, and was it a collection?)
            print(f"{'':<4}step wall median/max per process: " + ", ".join(
                f"{sorted(w)[len(w) // 2]:.3f}/{max(w):.3f} s (longest collection {g.get('pause_ms_max', 0):.0f} ms)"
                for w, g in zip(r["per_rank_step_walls_s"], r["per_rank_gc"], strict=True) if w))
        if r.get("loss_parity"):
            lp = r["loss_parity"]
            print(f"{'':<4}loss vs {lp['reference']} over {lp['steps']} steps: mean {lp['mean_rel_diff']:.2%}, max "
                  f"{lp['max_rel_diff']:.2%} (step {lp['max_rel_diff_step']}), {lp['window']}-step means "
                  f"{lp['window_mean_rel_diff']:.2%}; " + ("same batches" if lp["same_batches"] else "DIFFERENT BATCHES")
                  + f"; target mean <= {lp['target_mean_rel_diff']:.0%}: {'met' if lp['met'] else 'NOT met'}")
        if r.get("compile"):
            c = r["compile"]
            print(f"{'':<4}compiled layers: {c['region_graphs']} graph(s), {c['region_recompiles']} recompile(s), "
                  f"{c['region_graph_breaks']} graph break(s) in the region ({c['process_graph_breaks']} in the "
                  "process)" + (" - RECOMPILE LIMIT REACHED" if c["recompile_limit_reached"] else ""))
        if r.get("kernel_breakdown"):
            print(f"{'':<4}device time by kernel family over {r['kernel_breakdown']['steps']} traced steps "
                  "(profiler-inflated; read the shares):\n" + format_breakdown(r["kernel_breakdown"], width=6))
        if r.get("vs_peers"):
            print(f"{'':<4}vs peers (same recomputation): " + ", ".join(
                f"{v['ratio']:.2f}x {v['arm']}" + (f" ({v['ratio_median_step']:.2f}x on median steps)"
                                                   if v.get("ratio_median_step") else "")
                + ("" if v["exact_equivalent"] else " (not exact)") for v in r["vs_peers"].values()))
    if peer_arms:
        print("peer marks: [=profile] same stock pieces as that profile (flex attention, Liger, padding-free packing, "
              "same recomputation); [~profile] same maths, other kernels")
    with tempfile.NamedTemporaryFile("w", dir=Path(args.out).parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    os.replace(f.name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
