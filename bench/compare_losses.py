"""Loss parity between arms of two bench/train_throughput.py result files (runs that could not share one
invocation, e.g. on two GPUs at once), with the same rule as its --loss-parity (`loss_parity`).

    python bench/compare_losses.py REF.json OTHER.json [--ref-arm NAME] [--arm NAME]

Each file must hold one project arm, or name it. Prints the whole-run comparison and the one over the
second half of the steps; `same_batches` false means the two runs did not train on the same samples step
for step, and the comparison means nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import loss_parity  # noqa: E402


def pick_arm(path: Path, name: str | None) -> dict:
    """The arm called `name` of a result file, or its only arm with losses."""
    data = json.loads(path.read_text(encoding="utf-8"))
    arms = [r for r in (data if isinstance(data, list) else data.get("results", [])) if isinstance(r, dict)
            and r.get("losses")]
    chosen = [r for r in arms if name is None or r["name"] == name]
    if len(chosen) != 1:
        names = ", ".join(r["name"] for r in arms) or "none"
        raise SystemExit(f"error: {path}: {'no' if not chosen else 'more than one'} arm to compare "
                         f"({'--arm/--ref-arm ' + name if name else 'name one with --arm/--ref-arm'}); arms: {names}")
    return chosen[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("other", type=Path)
    ap.add_argument("--ref-arm")
    ap.add_argument("--arm")
    args = ap.parse_args()
    ref, other = pick_arm(args.ref, args.ref_arm), pick_arm(args.other, args.arm)
    half = len(ref["losses"]) // 2
    second = loss_parity({**ref, "losses": ref["losses"][half:], "batch_digests": None},
                         {**other, "losses": other["losses"][half:], "batch_digests": None})
    whole = loss_parity(ref, other)
    print(f"{other['name']} against {ref['name']}: {whole['steps']} steps, same batches: {whole['same_batches']}")
    print(f"  mean relative difference {whole['mean_rel_diff']:.2%} (steps {half + 1}-{len(ref['losses'])}: "
          f"{second['mean_rel_diff']:.2%}); {whole['window']}-step means {whole['window_mean_rel_diff']:.2%}; "
          f"max {whole['max_rel_diff']:.2%} at step {whole['max_rel_diff_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
