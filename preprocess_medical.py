#!/usr/bin/env python
"""AI Hub healthcare QA (초거대AI 헬스케어 질의응답) -> instruction jsonl. See `--help` and docs/data_structure.md.

Example: python preprocess_medical.py --input TL.zip --output data/train.jsonl
"""

import sys

from hai_medqa.cli import run_cli
from hai_medqa.data.cli import run

if __name__ == "__main__":
    sys.exit(run_cli(run))
