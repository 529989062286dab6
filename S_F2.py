#!/usr/bin/env python
"""QLoRA fine-tuning of EXAONE-3.5 on the medical QA jsonl (step F2 of the pipeline).

    python S_F2.py --config configs/exaone35_7.8b_qlora.yaml [--train-file F] [--val-file F]
                   [--output-dir D] [--model M] [--resume] [--<any config key> VALUE ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 S_F2.py --config ...  # DDP
    accelerate launch --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 2 S_F2.py ...   # FSDP-QLoRA

Every key of hai_medqa/train/config.py:TrainConfig can be set in the YAML file or overridden here
(``--lora-r 8`` or ``--lora_r=8``). Exit codes: 0 finished, 1 error (one line on stderr),
75 interrupted by SIGINT/SIGTERM/SIGHUP during training after saving a checkpoint (continue with
--resume); an interrupt before training starts, or a second Ctrl-C, exits 128 + the signal number
(hai_medqa.cli.run_cli, as every entry point).
"""

from __future__ import annotations

import argparse
import sys

# Importing torch/transformers takes seconds; keep --help and config errors instant.


def _keys_help() -> str:
    import dataclasses

    from hai_medqa.train.config import TrainConfig

    lines = ["config keys (set in the YAML file or override as --key value; docs/training.md):"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name.replace('_', '-'):<28} default: {default!r}")
    return "\n".join(lines)


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
    except KeyboardInterrupt as e:  # before training started, or a second Ctrl-C: no checkpoint for this step
        e.add_note("nothing after the last checkpoint was saved")
        raise
    return EXIT_INTERRUPTED if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    from hai_medqa.cli import run_cli

    sys.exit(run_cli(main))  # errors: one line, exit 1; interrupts: 128 + signal
