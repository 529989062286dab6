"""Every setting of a fine-tuning run, with its default and its meaning, in one dataclass.

Defaults are the issue's: QLoRA (NF4 + double quantisation, bf16 compute), LoRA r=16 / alpha=32 /
dropout 0.05 on all seven projections of every layer, non-reentrant gradient checkpointing, paged
8-bit AdamW, cosine schedule with warmup, gradient clipping, padding-free packing.

`profile` names a bundle of speed/memory settings (see PROFILES). A profile only fills keys the
user did not set; anything written in the YAML file or on the command line wins.

A run's configuration is settled once, before training starts (`settle_config`: the profile, `auto`
included, the FSDP requirements and whether it resumes), and is frozen from then on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from loguru import logger

from hai_medqa.config import ConfigError
from hai_medqa.model.exaone_layout import LLAMA_PROJECTIONS

# Every attention and MLP projection of a Llama-layout decoder layer (the converted EXAONE names).
LORA_TARGET_MODULES = list(LLAMA_PROJECTIONS)

AttnImpl = Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"]


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train on
    model: str = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"
    """Hub id or local folder (EXAONE or Llama layout); resolved by hai_medqa.model.acquire."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) of model; null = the default branch."""
    train_file: str = "data/train.jsonl"
    """Training jsonl (any format of hai_medqa/conversations.py)."""
    val_file: str | None = "data/val.jsonl"
    """Validation jsonl for loss, perplexity, early stopping and sample answers; null = none."""
    output_dir: str = "runs/exaone35-7.8b-medqa"
    """The run folder: metrics, checkpoints, adapter_best/ and adapter_last/."""
    cache_dir: str | None = None
    """Tokenisation cache; default: <parent of output_dir>/.tokenized_cache."""
    system_prompt: str | None = None
    """None = hai_medqa.chat_format.DEFAULT_SYSTEM_PROMPT; "" = the empty system turn; a name of
    chat_format.SYSTEM_PROMPTS ("default", "original": the original project's prompt) = that prompt."""
    train_turns: Literal["all", "last"] = "all"
    """Which assistant turns of a multi-turn record carry loss: every one (each answer and its
    [|endofturn|]), or only the last (the earlier answers are context). Single-turn records: the same."""
    max_length: int = 2048
    """Token cap of one training sample (prompt + answers); see overlong."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Samples longer than max_length: cut the answer (keeping [|endofturn|]) or drop the sample."""
    max_train_samples: int | None = None
    """Use only the first N training samples (null = all)."""
    max_eval_samples: int | None = None
    """Use only the first N validation samples (null = all)."""
    seed: int = 42
    """Seed of data order, LoRA initialisation and dropout."""
    cpu_threads: int | None = None
    """torch threads when training on CPU (null = torch's default); 1 is fastest for the tiny model."""

    # --- speed / memory bundle (fills the keys below that are not set explicitly)
    profile: Literal["auto", "fast", "lean", "plain"] = "auto"
    """Speed/memory bundle filling the keys left unset (PROFILES); auto: fastest that fits the GPU, plain on CPU."""

    # --- model
    quantize_4bit: bool = True
    """Load the base model in 4-bit NF4 with double quantisation (QLoRA); false = compute dtype."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto: bfloat16 on GPU, float32 on CPU."""
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """Storage dtype of the packed 4-bit weights (bitsandbytes bnb_4bit_quant_storage). auto: the compute
    dtype under FSDP (FSDP shards only floating-point tensors, uniform per wrapped layer), else uint8.
    The stored bits, and so the model, are the same either way."""
    attn_implementation: AttnImpl = "auto"
    """Attention kernel; auto: the profile's choice (flex_attention on GPU, sdpa on CPU)."""
    liger_kernel: bool | Literal["auto"] = "auto"
    """Liger's fused kernels (RMSNorm, SwiGLU, chunked cross-entropy); auto: on GPU when installed."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant): less memory, slower."""
    checkpoint_every_n_layers: int = 1
    """1 = recompute every decoder layer; n > 1 = only every n-th (selective: faster, more memory)."""
    offload_activations: bool = False
    """With gradient_checkpointing: keep each checkpointed layer's saved input (tokens x hidden) in pinned
    host memory instead of on the GPU, copied out on a side CUDA stream in the forward and prefetched back
    one layer ahead in the backward (hai_medqa/train/activation_offload.py). Same numerics; frees ~64 MiB
    (7.8B) / ~80 MiB (32B) per checkpointed layer at 8,192 tokens. On by default in ``lean`` on a GPU
    (GPU_PROFILE_KEYS), where it measured faster as well as smaller; set false to keep the inputs on the GPU."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scale numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    """Llama-layout projections that get LoRA (default: all seven of every layer)."""
    lora_kernel: Literal["fused", "fused_nf4", "peft"] = "fused"
    """fused: the project's LoRA forward (same maths as PEFT's, bf16 compute from fp32 master weights,
    scale and add in one GEMM; hai_medqa/train/fast_lora.py); fused_nf4: the same, with the LoRA term added
    into an NF4 base layer's output in place instead of into a copy of it (the same forward bit for bit,
    gradients to rounding); the default of ``fast`` and ``lean`` on a GPU (GPU_PROFILE_KEYS); layers it
    cannot take (FP8, cached or FSDP-sharded weights, a bias, inference) run ``fused``; peft: PEFT's own forward."""
    dequantize_cache: bool = False
    """Keep a compute-dtype copy of every frozen NF4 weight, dequantised once (exactly the QLoRA
    forward, no per-step dequantisation; +2 bytes per base parameter of GPU memory)."""
    base_precision: Literal["nf4", "fp8"] = "nf4"
    """Frozen base projections: nf4 (QLoRA, as quantize_4bit says) or fp8 (opt-in; GPUs of compute
    capability >= 8.9 such as H100/H200): float8 e4m3 weights with per-output-channel scales made from the
    bf16 checkpoint, forward and input-gradient matmuls in FP8 with row-wise scales (torch._scaled_mm);
    LoRA stays bf16/fp32. Changes the numerics (hai_medqa/train/fp8_base.py; docs/training.md)."""
    fp8_emulate: bool = False
    """base_precision fp8 only: the same FP8 quantisation with the matmuls emulated (both FP8 operands
    dequantised to float32 and multiplied) instead of torch._scaled_mm, so it runs on any device, CPUs
    included, and several times slower: for checking FP8's numerics (loss curves, answers) on a machine
    without FP8 tensor cores. Never a speed-up."""
    compile_layers: bool = False
    """torch.compile every decoder layer as one region while training, so inductor fuses the residual adds,
    norms, RoPE, SwiGLU and LoRA glue around the projections (hai_medqa/train/compile_regions.py): the same
    mathematics, fused rounding; Liger keeps only its fused cross-entropy. Compiles during the first steps;
    evaluation runs uncompiled. On by default in ``fast`` and ``lean`` on a GPU (GPU_PROFILE_KEYS), where it
    measured faster at the same loss; set false to run the layers eagerly. Not under FSDP."""

    # --- batching
    batching: Literal["packed", "padded"] = "packed"
    """packed: padding-free rows of whole samples up to tokens_per_micro_batch; padded: micro_batch_size samples."""
    tokens_per_micro_batch: int = 8192
    """packed: token budget of one micro-batch row (several whole samples)."""
    pad_to_fixed_length: bool = False
    """packed: pad every row to tokens_per_micro_batch with inert filler (one shape for compiled kernels). On in
    ``fast``, and in ``lean`` on a GPU (GPU_PROFILE_KEYS), where it measured faster and smaller."""
    micro_batch_size: int = 8
    """padded: samples per micro-batch."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step on each process."""

    # --- optimisation
    optimizer: Literal["paged_adamw_8bit", "adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    """paged_adamw_8bit / adamw_8bit: bitsandbytes 8-bit AdamW (torch AdamW on CPU if unavailable); adamw_torch."""
    learning_rate: float = 2e-4
    """Peak learning rate (after warm-up)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming the learning rate up, in [0, 1)."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    num_epochs: int = 2
    """Passes over the training data (unless max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides num_epochs when set."""

    # --- evaluation, saving, logging
    eval_steps: int = 200
    """Evaluate (validation loss, sample answers) every N optimizer steps and at the end."""
    early_stopping_patience: int | None = 5
    """Evaluations without improvement before stopping; null disables early stopping."""
    early_stopping_min_delta: float = 0.0
    """Smallest val_loss decrease that counts as an improvement."""
    save_steps: int = 200
    """Write a resumable checkpoint every N optimizer steps."""
    save_total_limit: int = 3
    """Checkpoints kept (the oldest are deleted)."""
    logging_steps: int = 10
    """Log a console line every N optimizer steps (metrics.jsonl gets every step)."""
    tensorboard: bool = True
    """Write TensorBoard events to RUN/tensorboard/ (false removes tensorboard from report_to)."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "none"]] = field(
        default_factory=lambda: ["tensorboard"])
    """Experiment trackers for the metrics, config and run info (hai_medqa/train/trackers.py); none = only metrics.jsonl."""
    sample_questions: int | None = None
    """Validation questions answered greedily at each evaluation (RUN/samples.jsonl); null = 4 on GPU, 0 on CPU; 0 = off."""
    sample_max_new_tokens: int = 128
    """Token cap of each sample answer (the cost of sampling is sample_questions x this)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""

    # Names users know from Hugging Face TrainingArguments / TRL SFTConfig and ModelConfig that mean
    # exactly the project key (hai_medqa.config.load_config; docs/coming_from.md).
    KEY_ALIASES: ClassVar[dict[str, str]] = {
        "num_train_epochs": "num_epochs",
        "optim": "optimizer",
        "lr_scheduler_type": "lr_scheduler",
        "model_name_or_path": "model",
        "load_in_4bit": "quantize_4bit",
        "bnb_4bit_compute_dtype": "compute_dtype",
        "bnb_4bit_quant_storage": "quant_storage",
        "use_liger_kernel": "liger_kernel",
        "resume_from_checkpoint": "resume",
    }
    # Names from other tools that mean something else here: (tool, what to use instead).
    PEER_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "per_device_train_batch_size": ("Hugging Face/TRL", "a count of samples; here a micro-batch is a token budget: "
                                        "use tokens_per_micro_batch (batching: packed) or micro_batch_size with batching: padded"),
        "per_device_eval_batch_size": ("Hugging Face/TRL", "evaluation uses the training micro-batch "
                                       "(tokens_per_micro_batch, or micro_batch_size with batching: padded)"),
        "max_seq_length": ("TRL", "use max_length (the cap of one sample) and tokens_per_micro_batch (a packed row)"),
        "packing": ("TRL", "use batching: packed (the default, padding-free) or batching: padded"),
        "warmup_steps": ("Hugging Face/TRL", "use warmup_ratio (a fraction of the optimizer steps)"),
        "bf16": ("Hugging Face/TRL", "use compute_dtype: bfloat16 (auto: bfloat16 on GPU)"),
        "fp16": ("Hugging Face/TRL", "use compute_dtype: float16"),
        "eval_strategy": ("Hugging Face/TRL", "evaluation is by steps: set eval_steps (and val_file: null for none)"),
        "save_strategy": ("Hugging Face/TRL", "checkpoints are by steps: set save_steps"),
        "use_peft": ("TRL", "LoRA is always on: set lora_r, lora_alpha, lora_dropout, lora_target_modules"),
        "gradient_checkpointing_kwargs": ("Hugging Face/TRL", "checkpointing is always non-reentrant: use "
                                          "gradient_checkpointing and checkpoint_every_n_layers"),
        "completion_only_loss": ("TRL", "the loss always covers the answers only: use train_turns (all or last)"),
        "assistant_only_loss": ("TRL", "the loss always covers the answers only: use train_turns (all or last)"),
    }

    def validate(self) -> None:
        """Raise ConfigError for values that are individually typed right but unusable together."""
        positive = ["max_length", "tokens_per_micro_batch", "micro_batch_size", "gradient_accumulation_steps",
                    "lora_r", "lora_alpha", "eval_steps", "checkpoint_every_n_layers", "save_steps", "logging_steps",
                    "save_total_limit", "num_epochs"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_samples", "max_eval_samples", "cpu_threads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be positive or null, got {v}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.batching == "packed" and self.max_length > self.tokens_per_micro_batch:
            raise ConfigError(
                f"max_length ({self.max_length}) exceeds tokens_per_micro_batch ({self.tokens_per_micro_batch}): "
                "a packed row must hold at least one whole sample"
            )
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ConfigError("early_stopping_patience must be positive or null (disabled)")
        unknown = sorted(set(self.lora_target_modules) - set(LORA_TARGET_MODULES))
        if unknown:
            raise ConfigError(
                f"lora_target_modules has {unknown}; Llama-layout projections are {LORA_TARGET_MODULES}"
            )
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty")
        if self.fp8_emulate and self.base_precision != "fp8":
            raise ConfigError("fp8_emulate emulates the FP8 base's matmuls; it needs base_precision: fp8")
        if self.base_precision == "fp8":
            if self.dequantize_cache:
                raise ConfigError("dequantize_cache applies to the NF4 base; with base_precision fp8 set it to false")
            if self.compute_dtype not in ("auto", "bfloat16"):
                raise ConfigError(f"base_precision fp8 computes in bfloat16 (torch._scaled_mm's row-wise output); "
                                  f"compute_dtype {self.compute_dtype} cannot be used with it (use auto or bfloat16)")
        check_offload_activations(self)
        if self.sample_questions is not None and self.sample_questions < 0:
            raise ConfigError(f"sample_questions must be >= 0 or null (auto), got {self.sample_questions}")
        if self.sample_max_new_tokens <= 0:
            raise ConfigError(f"sample_max_new_tokens must be positive, got {self.sample_max_new_tokens}")
        # A tracker whose package is missing is one line here, before any heavy work.
        from hai_medqa.train.trackers import check_report_to

        check_report_to(self.report_to)


def check_offload_activations(cfg: TrainConfig) -> None:
    """ConfigError when offload_activations is on without gradient checkpointing (nothing would be offloaded)."""
    if cfg.offload_activations and not cfg.gradient_checkpointing:
        raise ConfigError("offload_activations: true needs gradient_checkpointing: true (it offloads the inputs "
                          "that checkpointed layers keep; profile fast turns checkpointing off: use profile lean)")


# Named bundles of speed/memory settings, as measured on an H100 by bench/train_throughput.py
# (docs/performance.md, EXAONE-3.5-7.8B shape, 8192 tokens per micro-batch):
#   plain: the portable reference path (sdpa, no Liger, PEFT's LoRA forward would be 3.4k tok/s) - CPUs;
#   lean:  flex attention + Liger + fused LoRA, checkpointing: 8.7k tok/s in 9.5 GiB (fits 16 GB cards);
#   fast:  the same without checkpointing, fixed row shape: 13.0k tok/s in 41.5 GiB.
# LoRA dropout costs a full-width mask per projection (and its memory), so the GPU profiles leave it off
# unless the config sets it; the loss curves of plain (dropout 0.05) and lean match (docs/performance.md).
PROFILES: dict[str, dict[str, Any]] = {
    "plain": {"attn_implementation": "sdpa", "liger_kernel": False, "gradient_checkpointing": True,
              "pad_to_fixed_length": False},
    "lean": {"attn_implementation": "flex_attention", "liger_kernel": "auto", "gradient_checkpointing": True,
             "lora_dropout": 0.0, "pad_to_fixed_length": False},
    "fast": {"attn_implementation": "flex_attention", "liger_kernel": "auto", "gradient_checkpointing": False,
             "lora_dropout": 0.0, "pad_to_fixed_length": True},
}

# Profile keys applied on a GPU only (docs/performance.md, H200, 2026-11-30):
# - `lean` offloads its checkpointed layer inputs to pinned host memory (activation_offload.py): faster and
#   smaller (7.8B: 8,651 -> 9,636 tok/s, 11.5 -> 9.5 GiB reserved; 32B: 2,474 -> 2,629 tok/s, 28.0 -> 23.6
#   GiB; session 5), for ~2 GiB (7.8B) to ~8 GiB (32B) of pinned host memory. On a CPU it would only copy.
# - `fast` and `lean` compile each decoder layer as one region (compile_regions.py): `fast` 13,253 -> 14,120
#   tok/s in the same invocation, `lean` 9,853 (with offloading); 200-step loss within 0.82% / 0.94% (mean)
#   of `plain` with its dropout off (session 6). ~20 s of compilation in the first steps; on a CPU inductor
#   would only add that. FSDP turns it off again (FSDP_REQUIRED).
# - `fast` and `lean` add the LoRA term into bitsandbytes' NF4 output in place (lora_kernel: fused_nf4), which
#   drops a copy of every projection's output: device-to-device copies 12.2 -> 1.7 ms (fast) and 96.9 -> 75.9 ms
#   (lean) per step, 15,938 -> 16,221 and 10,850 -> 11,113 tok/s in the same invocation; loss 0.74% (mean)
#   from `fused`, closer than lean is to fast (H200, 2026-11-30; docs/performance.md, eighth session on two
#   H200s). Measured on GPUs only.
# - `lean` pads its packed rows to the token budget, as `fast` does everywhere: its compiled layers then see one
#   shape. Unpadded, the layer region was compiled for varying lengths (and again whenever a new length came):
#   flex attention 71.0 -> 48.2 ms per step, traced step 716.7 -> 699.6 ms, 10,789 -> 11,273 tok/s and 10.0 ->
#   7.9 GiB reserved in the same invocation (the allocator no longer splits blocks of ever-changing sizes; H200,
#   2026-11-30, docs/performance.md, ninth session on two H200s). The filler is inert: the same loss.
GPU_PROFILE_KEYS: dict[str, dict[str, Any]] = {
    "lean": {"offload_activations": True, "compile_layers": True, "lora_kernel": "fused_nf4",
             "pad_to_fixed_length": True},
    "fast": {"compile_layers": True, "lora_kernel": "fused_nf4"},
}

# Fast-profile activation memory per (layer x token x (hidden + intermediate)), in bytes: 8.1 measured
# on the 7.8B shape (41.5 GiB reserved at 8192 tokens, 4.9 GiB of it weights), rounded up for headroom.
_FAST_ACTIVATION_BYTES = 9.0
_FAST_MEMORY_FRACTION = 0.85  # leave room for fragmentation, evaluation and other processes


# Bytes per frozen projection parameter: NF4 with double quantisation, FP8 e4m3 (+ a 4-byte scale per row,
# negligible; the transposed copy made for each backward is one layer at a time).
BASE_BYTES_PER_PARAM = {"nf4": 0.5625, "fp8": 1.0}


def estimate_fast_peak_gib(model_config: dict[str, Any], tokens_per_micro_batch: int, base_precision: str = "nf4",
                           ) -> float:
    """Peak GPU memory of the fast profile for a Llama-layout config: the frozen projections (NF4: 0.5625
    bytes per parameter with double quantisation; FP8: 1 byte), bf16 embeddings and head, and activations
    kept for the backward pass (no checkpointing)."""
    h, inter = model_config["hidden_size"], model_config["intermediate_size"]
    layers, vocab = model_config["num_hidden_layers"], model_config["vocab_size"]
    heads = model_config["num_attention_heads"]
    kv = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or h // heads
    linear = layers * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter)
    embeddings = vocab * h * (1 if model_config.get("tie_word_embeddings") else 2)
    weights = BASE_BYTES_PER_PARAM[base_precision] * linear + 2 * embeddings
    activations = _FAST_ACTIVATION_BYTES * layers * tokens_per_micro_batch * (h + inter)
    return (weights + activations) / 2**30


def choose_gpu_profile(model_config: dict[str, Any], tokens_per_micro_batch: int, gpu_memory_bytes: int,
                       base_precision: str = "nf4") -> str:
    """The fastest profile whose estimated peak fits the GPU: fast when it fits, else lean."""
    fits = (estimate_fast_peak_gib(model_config, tokens_per_micro_batch, base_precision)
            <= _FAST_MEMORY_FRACTION * gpu_memory_bytes / 2**30)
    return "fast" if fits else "lean"


def resolve_profile(cfg: TrainConfig, explicit: set[str], *, on_gpu: bool, model_config: dict[str, Any] | None = None,
                    gpu_memory_bytes: int | None = None, compile_available: bool = True) -> tuple[TrainConfig, str]:
    """Apply the chosen profile to every key the user left at its default; return (config, profile used).

    On a GPU the profile's GPU_PROFILE_KEYS are applied too (``lean``: offload_activations, compile_layers,
    lora_kernel fused_nf4 and pad_to_fixed_length; ``fast``: compile_layers and lora_kernel fused_nf4), each
    unless set explicitly; offloading also not when checkpointing is off, and compiling also not where it
    cannot run (`compile_available` false: no working Triton for this GPU; a line says so).

    ``auto`` means ``plain`` on a CPU; on a GPU the fastest profile that fits it (`choose_gpu_profile`,
    given the model's config and the GPU's memory), or ``lean`` when those are not known yet; ``lean``
    also when offload_activations is on (it needs the checkpointing that ``fast`` turns off).
    """
    name = cfg.profile
    if name == "auto":
        if not on_gpu:
            name = "plain"
        elif model_config is not None and gpu_memory_bytes:
            tokens = cfg.tokens_per_micro_batch
            name = choose_gpu_profile(model_config, tokens, gpu_memory_bytes, cfg.base_precision)
        else:
            name = "lean"
        if name == "fast" and cfg.offload_activations:  # offloading is for checkpointed layers: fast has none
            name = "lean"
    updates = {k: v for k, v in PROFILES[name].items() if k not in explicit}
    if on_gpu:
        gpu_keys = {k: v for k, v in GPU_PROFILE_KEYS.get(name, {}).items() if k not in explicit}
        if not updates.get("gradient_checkpointing", cfg.gradient_checkpointing):
            gpu_keys.pop("offload_activations", None)  # needs the checkpointing a user may have turned off
        if not compile_available and gpu_keys.pop("compile_layers", False):
            logger.info(f"profile {name}: decoder layers run eagerly (torch.compile's inductor finds no working "
                        "Triton for this GPU); same training, without the compiled layers' speed")
        updates.update(gpu_keys)
    return dataclasses.replace(cfg, **updates), name


# What FSDP-QLoRA still needs (fsdp_version 1, the path bitsandbytes' 4-bit weights shard on). The LoRA
# modules are replicated, not sharded (fsdp_lora.py): they are ordinary whole tensors on every process, as
# under DDP, so the fused LoRA forward (lora_kernel) and bitsandbytes' 8-bit optimizers (optimizer) are
# allowed; tests/train/test_fsdp_save.py runs both under FSDP on two CPU processes. What stays forced is
# about the sharded base:
FSDP_REQUIRED: dict[str, Any] = {
    "dequantize_cache": False,  # a whole dequantised bf16 copy of the base on every process defeats the sharding
    "base_precision": "nf4",  # FP8 weights are not sharded (fp8_base.py swaps the projections for FP8 modules)
    "compile_layers": False,  # FSDP1 swaps the flattened base parameters under the layers at every unit's forward
    "lora_kernel": "fused",  # fused_nf4 reads bitsandbytes' uint8 packing; FSDP stores it as floats (fast_lora.py)
}


def check_fsdp_requirements(cfg: TrainConfig, explicit: set[str], fsdp_version: int | None) -> None:
    """Raise ConfigError when the config cannot run under this FSDP launch (checked before any model
    is fetched); nothing to check without FSDP."""
    if fsdp_version is None:
        return
    if fsdp_version != 1:
        raise ConfigError(f"FSDP-QLoRA needs fsdp_version 1, got {fsdp_version} (FSDP2 turns bitsandbytes' 4-bit "
                          "weights into plain tensors and loses their quantisation state); launch with "
                          "configs/accelerate/fsdp_qlora.yaml")
    for key, value in FSDP_REQUIRED.items():
        if key in explicit and getattr(cfg, key) != value:
            raise ConfigError(f"{key}: {getattr(cfg, key)!r} does not work under FSDP; use {value!r} (or leave it unset)")
    if cfg.quantize_4bit and cfg.quant_storage == "uint8":
        raise ConfigError("quant_storage: uint8 cannot be sharded by FSDP; use auto (the compute dtype)")


def apply_fsdp_requirements(cfg: TrainConfig, explicit: set[str], fsdp_version: int | None) -> tuple[TrainConfig, dict]:
    """Under FSDP, set the keys FSDP-QLoRA needs (FSDP_REQUIRED) where the user left them at their
    default; return (config, {key: value changed}). A conflicting explicit setting is a ConfigError."""
    check_fsdp_requirements(cfg, explicit, fsdp_version)
    if fsdp_version is None:
        return cfg, {}
    changed = {k: v for k, v in FSDP_REQUIRED.items() if getattr(cfg, k) != v}
    return dataclasses.replace(cfg, **changed), changed


def recorded_base_precision(cfg: TrainConfig) -> str:
    """What the frozen base is, for the run's TrainingRecord: "fp8", "nf4" (QLoRA) or "none" (unquantised)."""
    if cfg.base_precision == "fp8":
        return "fp8"
    return "nf4" if cfg.quantize_4bit else "none"


def check_run_paths(cfg: TrainConfig) -> None:
    """One line (hai_medqa.guards.PathError or ConfigError), before the run folder is created or any
    model loads, for paths a run cannot use: a folder given as train_file/val_file, an output_dir that
    is a file or lies below one, and the same file as training and validation data (resolved:
    symlinks, hard links and case included)."""
    from hai_medqa.guards import check_input_kinds, check_output_paths, same_path

    check_input_kinds(files={"train_file": cfg.train_file, "val_file": cfg.val_file})
    check_output_paths({}, {"output_dir": cfg.output_dir}, folders={"output_dir"})
    if cfg.val_file and cfg.train_file and same_path(cfg.train_file, cfg.val_file):
        raise ConfigError(f"val_file {cfg.val_file} is the train_file {cfg.train_file}: validation on the training "
                          "data measures nothing; give a separate file, or val_file: null to skip validation")


def check_compile_layers(cfg: TrainConfig, explicit: set[str], compile_available: bool) -> None:
    """ConfigError (one line, before the model is fetched) for an explicit compile_layers: true where the layers
    cannot compile; a profile's compile_layers is dropped there instead (resolve_profile)."""
    if cfg.compile_layers and "compile_layers" in explicit and not compile_available:
        raise ConfigError("compile_layers: true needs torch.compile's inductor, which finds no working Triton for "
                          "this GPU; install the triton release matching your torch, or set compile_layers: false")


def keep_recorded_gpu_keys(cfg: TrainConfig, explicit: set[str], recorded: dict[str, Any], *,
                           compile_available: bool = True) -> tuple[TrainConfig, dict]:
    """For a resumed run: the GPU profile keys (GPU_PROFILE_KEYS) the user did not set keep the values the
    run started with (its resolved_config.yaml), so a run begun before a profile gained a key resumes as it
    was instead of being refused as another recipe. Compiled layers are not kept where they cannot compile
    (the checkpoint then refuses the change in one line). Returns (config, {key: recorded value kept}).

    >>> cfg = TrainConfig(profile="fast", compile_layers=True)
    >>> keep_recorded_gpu_keys(cfg, {"profile"}, {"compile_layers": False})[1]
    {'compile_layers': False}
    """
    keys = {k for bundle in GPU_PROFILE_KEYS.values() for k in bundle} - explicit
    if not compile_available and recorded.get("compile_layers"):
        keys.discard("compile_layers")
    kept = {k: recorded[k] for k in sorted(keys) if k in recorded and recorded[k] != getattr(cfg, k)}
    return dataclasses.replace(cfg, **kept), kept


def settle_config(requested: TrainConfig, explicit: set[str], *, on_gpu: bool, fsdp_version: int | None,
                  resume: bool, model_config: dict[str, Any] | None = None,
                  gpu_memory_bytes: int | None = None, recorded: dict[str, Any] | None = None,
                  compile_available: bool = True) -> tuple[TrainConfig, str]:
    """The run's final configuration and the profile it uses, decided once before training starts.

    The profile fills the keys the user did not set (``auto``: the fastest that fits this GPU, given
    the model's config and the GPU's memory; ``plain`` on CPU); when resuming, the GPU profile keys the
    user did not set keep the `recorded` values of the run folder (keep_recorded_gpu_keys);
    FSDP-QLoRA's requirements follow, and `resume` is what the run folder allows
    (`checkpoint.decide_resume`). The result is frozen: nothing changes it afterwards.

    >>> cfg, profile = settle_config(TrainConfig(resume=True), set(), on_gpu=False, fsdp_version=None, resume=False)
    >>> profile, cfg.attn_implementation, cfg.resume
    ('plain', 'sdpa', False)
    """
    cfg, profile = resolve_profile(requested, explicit, on_gpu=on_gpu, model_config=model_config,
                                   gpu_memory_bytes=gpu_memory_bytes, compile_available=compile_available)
    if requested.profile == "auto" and on_gpu and model_config is not None and gpu_memory_bytes:
        logger.info(f"profile auto -> {profile} (fast profile needs ~"
                    f"{estimate_fast_peak_gib(model_config, cfg.tokens_per_micro_batch, cfg.base_precision):.0f} GiB; "
                    f"GPU has {gpu_memory_bytes / 2**30:.0f} GiB"
                    f"{'; offload_activations needs checkpointing' if cfg.offload_activations else ''})")
    if resume and recorded:
        cfg, kept = keep_recorded_gpu_keys(cfg, explicit, recorded, compile_available=compile_available)
        if kept:
            logger.info(f"resume: keeping {kept} as the run started (the profile sets otherwise now; "
                        "set a key explicitly to change it, which the checkpoint then refuses)")
    check_offload_activations(cfg)  # after the profile, which may turn checkpointing off
    cfg, changed = apply_fsdp_requirements(cfg, explicit, fsdp_version)
    if changed:
        logger.info(f"FSDP (version {fsdp_version}): using {changed} (FSDP-QLoRA needs them)")
    return dataclasses.replace(cfg, resume=resume), profile
