"""bench/train_throughput.py's own arms on the tiny model on the CPU: what they train with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_project_arms_train_at_a_constant_learning_rate_like_the_peers(tmp_path):
    """The peers and the seed-style baseline train at a constant learning rate; the project's arms must too, or
    their loss curves are not comparable step for step, and a step's rate would depend on how many steps the arm
    runs (--kernel-profile adds traced steps after the timed ones)."""
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "train_throughput.py"), "--shape", "tiny",
                           "--variants", "plain:lora_dropout=0", "--records", "40", "--warmup", "1", "--steps", "3",
                           "--lr", "1e-3", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (arm,) = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert arm["config"]["lr_scheduler"] == "constant" and len(arm["losses"]) == 4
    (run_dir,) = [p.parent for p in (tmp_path / "work").glob("run*/metrics.jsonl")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert len(lrs) == 4 and all(lr == 1e-3 for lr in lrs), lrs
