#!/usr/bin/env python
"""QLoRA fine-tuning of EXAONE-3.5 on the medical QA jsonl (step F2 of the pipeline).

    python S_F2.py --config configs/exaone35_7.8b_qlora.yaml [--train-file F] [--val-file F]
                   [--output-dir D] [--model M] [--resume] [--<any config key> VALUE ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 S_F2.py --config ...  # DDP
    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 S_F2.py ...   # FSDP-QLoRA

Every key of hai_medqa/train/config.py:TrainConfig can be set in the YAML file or overridden here
(``--lora-r 8`` or ``--lora_r=8``), also by its Hugging Face/TRL name
(``--num_train_epochs 2``; docs/coming_from.md). ``--help`` lists every key with its meaning,
default and allowed values. Exit codes: 0 finished, 1 error (one line on stderr),
75 interrupted by SIGINT/SIGTERM/SIGHUP during training after saving a checkpoint (continue with
--resume); an interrupt during start-up, or a second Ctrl-C, exits 128 + the signal number with a
line saying which (hai_medqa.cli.run_cli, as every entry point). --resume without a checkpoint in
output_dir is an error naming the folder.
"""

from __future__ import annotations

import argparse
import sys

# Importing torch/transformers takes seconds; keep --help and config errors instant.


def _keys_help() -> str:
    from hai_medqa.config import format_keys_help
    from hai_medqa.train.config import TrainConfig

    return ("config keys (set in the YAML file or override as --key value; Hugging Face/TRL names in parentheses\n"
            "are accepted too: docs/coming_from.md; docs/training.md):\n" + format_keys_help(TrainConfig))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="QLoRA fine-tuning of EXAONE-3.5 on the medical QA jsonl.",
        epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/exaone35_7.8b_qlora.yaml", help="YAML config file")
    args, rest = parser.parse_known_args(argv)

    from hai_medqa.config import load_config, parse_cli_overrides
    from hai_medqa.train.config import TrainConfig

    cfg, explicit = load_config(TrainConfig, args.config, parse_cli_overrides(rest))

    from hai_medqa.train.trainer import EXIT_INTERRUPTED, run_training

    try:
        summary = run_training(cfg, explicit)
    except KeyboardInterrupt as e:  # the trainer notes when (start-up, a second Ctrl-C); anything else:
        if not getattr(e, "__notes__", None):
            e.add_note("nothing after the last checkpoint was saved")
        raise
    return EXIT_INTERRUPTED if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    from hai_medqa.cli import run_cli

    sys.exit(run_cli(main))  # errors: one line, exit 1; interrupts: 128 + signal
