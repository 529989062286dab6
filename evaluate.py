#!/usr/bin/env python3
"""Evaluate the fine-tune (and compare it with the base model). Examples:

    python evaluate.py --model outputs/merged --data outputs/data/val.jsonl --samples 200
    python evaluate.py --model LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct --load-4bit \\
        --compare base runs/exp1 --labels base finetune --data outputs/data/val.jsonl \\
        --kormedmcqa ~/data/KorMedMCQA --output-dir outputs/eval/base_vs_ft

Metrics and their pitfalls: docs/evaluation.md.
"""

import sys

from hai_medqa.cli import run_cli
from hai_medqa.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
