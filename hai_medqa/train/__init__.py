"""Training stage: QLoRA fine-tuning of EXAONE-3.5 (as a native Llama model) on the SFT jsonl.

In the order a run uses them:
    config.py      TrainConfig (every key, default and check), the speed/memory profiles, settle_config
    runtime.py     where the run executes (device, rank, processes, FSDP)
    sft_data.py    jsonl -> chat messages -> token ids with answer-only labels, cached on disk
    packing.py     micro-batch plans (padding-free packing or padded) and their tensors
    model_build.py 4-bit base + LoRA on the chosen kernels, wrapped for DDP/FSDP; optimizer and schedule
    backends.py    attention / Liger / dtype / optimizer choices with logged fallbacks
    fast_lora.py   fused LoRA forward and dequantised-weight cache (speed options)
    fsdp_lora.py   FSDP-QLoRA: decoder layers as units (base sharded), LoRA replicated, its gradients averaged
    trainer.py     Trainer: the recipe (setup, the loop, train_step, evaluate), run_training
    checkpoint.py  save / restore (RNG, optimizer, scheduler), resume checks, adapters
    adapter_folder.py  an adapter others may receive: base by Hub id, data provenance, the project's card
    run_record.py  resolved_config.yaml, run_info.json, metrics.jsonl, TensorBoard, summary.json
    plots.py       loss-curve PNG from metrics.jsonl
    signals.py     SIGINT/SIGTERM -> checkpoint and exit 75
    errors.py      TrainingError, TrainingDataError, NonFiniteLossError

The command-line entry point is S_F2.py at the repository root; docs/training.md explains the run.
"""
