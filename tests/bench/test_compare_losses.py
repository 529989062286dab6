"""bench/compare_losses.py: loss parity between arms of two result files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, arms: list[dict]) -> Path:
    path.write_text(json.dumps({"results": arms}), encoding="utf-8")
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "compare_losses.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_arms_of_two_files_compare_like_loss_parity(tmp_path):
    digests = [f"d{i}" for i in range(4)]
    ref = _write(tmp_path / "ref.json", [{"name": "plain", "losses": [2.0, 2.0, 1.0, 1.0], "batch_digests": digests}])
    other = _write(tmp_path / "other.json", [
        {"name": "fast", "losses": [2.2, 2.2, 1.0, 1.0], "batch_digests": digests},
        {"name": "lean", "losses": [2.0, 2.0, 1.5, 1.5], "batch_digests": digests}])
    out = _run(ref, other, "--arm", "lean")
    assert out.returncode == 0, out.stderr
    assert "same batches: True" in out.stdout
    assert "mean relative difference 25.00% (steps 3-4: 50.00%)" in out.stdout  # (0 + 0 + .5 + .5) / 4
    both = _run(ref, other)  # two arms, none named: refused in one line
    assert both.returncode != 0 and both.stderr.strip().count("\n") == 0
    assert "more than one arm" in both.stderr and "fast, lean" in both.stderr
