"""Plot the JSON written by bench/train_throughput.py: per-step loss of every variant, and real tokens/s.

The loss panel is what shows that the training result does not depend on the profile (the curves lie on
top of each other); the bar panel is the speed ladder at a glance. Several JSON files of one shape (for
example a run and a later run of one more variant) are merged; a variant name seen twice keeps the last.

    python bench/plot_throughput.py bench/results/2026-11-23-h100/train_throughput_7.8b_deca95e.json \
        bench/results/2026-11-23-h100/train_throughput_7.8b_plain_deca95e.json --out loss_7.8b.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hai_medqa.io_utils import atomic_path  # noqa: E402


def load_results(paths: list[Path]) -> tuple[str, str, dict[str, dict]]:
    """(shape, device, results by variant name) from one or more train_throughput JSON files."""
    shapes, devices, results = set(), set(), {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"error: {path}: not a readable train_throughput JSON ({exc})") from None
        shapes.add(data.get("shape", "?"))
        devices.add(data.get("device", "?"))
        for r in data.get("results", []):
            results[r["name"]] = r
    if len(shapes) > 1:
        raise SystemExit(f"error: the files mix model shapes {sorted(shapes)}; plot one shape at a time")
    if not results:
        raise SystemExit("error: no results in " + ", ".join(map(str, paths)))
    return shapes.pop(), " / ".join(sorted(devices)), results


def plot(paths: list[Path], out: Path) -> Path:
    """Write the two-panel PNG to `out` (atomically) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, device, results = load_results(paths)
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=120,
                                            gridspec_kw={"width_ratios": [3, 2]})
    # "auto" is labelled with the profile it chose
    labels = {n: n if results[n].get("profile") in (None, n) else f"{n} ({results[n]['profile']})" for n in results}
    names = list(results)
    for name in names:
        losses = results[name].get("losses") or []
        style = ":" if results[name].get("profile") == "seed-style" else "-"
        ax_loss.plot(range(1, len(losses) + 1), losses, style, marker=".", linewidth=1.5, label=labels[name])
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (log scale)")
    ax_loss.set_title("per-step loss (the seed-style baseline batches other samples per step)")
    ax_loss.grid(alpha=0.3, which="both")
    ax_loss.legend(fontsize=8)

    speeds = [results[n].get("real_tokens_per_s") or 0.0 for n in names]
    bars = ax_speed.barh([labels[n] for n in names], speeds, color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        r = results[name]
        ax_speed.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                      f" {bar.get_width():,.0f} tok/s, {r.get('peak_reserved_gib', float('nan')):.1f} GiB",
                      va="center", fontsize=8)
    ax_speed.invert_yaxis()
    ax_speed.set_xlim(0, max(speeds) * 1.6 if max(speeds) > 0 else 1)
    ax_speed.set_xlabel("real (non-padding) tokens/s")
    ax_speed.set_title("speed and peak reserved GPU memory")
    fig.suptitle(f"{shape} shape on {device}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="train_throughput JSON file(s) of one shape")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    print(plot(args.json, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
