#!/usr/bin/env python3
"""Chat with the fine-tuned model. Examples:

    python chat.py --model outputs/merged                       # interactive consultation
    python chat.py --model LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct --adapter runs/exp1 --load-4bit
    python chat.py --model outputs/merged --prompt "두통이 자주 생기는데 어떤 검사를 받아야 하나요?"
    python chat.py --model outputs/merged --input questions.jsonl --output answers.jsonl
    python chat.py --model outputs/merged --input questions.jsonl --output answers.jsonl --resume  # after an interrupt

See `python chat.py --help` and hai_medqa/inference/.
"""

import sys

from hai_medqa.cli import run_cli
from hai_medqa.inference.chat_cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
