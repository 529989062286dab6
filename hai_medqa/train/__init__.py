"""Training stage: QLoRA fine-tuning of EXAONE-3.5 (as a native Llama model) on the SFT jsonl.

    config.py    TrainConfig (every key, default and check) and the speed/memory profiles
    sft_data.py  jsonl -> chat messages -> token ids with answer-only labels, cached on disk
    packing.py   micro-batch plans (padding-free packing or padded) and their tensors
    backends.py  attention / Liger / dtype / optimizer choices with logged fallbacks
    fast_lora.py fused LoRA forward and dequantised-weight cache (speed options)
    trainer.py   Trainer (setup, train_step, evaluate, checkpoints, resume, signals), run_training
    plots.py     loss-curve PNG from metrics.jsonl

The command-line entry point is S_F2.py at the repository root; docs/training.md explains the run.
"""
