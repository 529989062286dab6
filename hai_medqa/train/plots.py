"""Loss-curve plot from a run's metrics.jsonl (train loss per step, validation loss per evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

from hai_medqa.io_utils import atomic_path


def read_metrics(metrics_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines) of a metrics.jsonl; unreadable lines are skipped."""
    train, evals = [], []
    path = Path(metrics_path)
    if not path.is_file():
        return train, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write must not break the plot
        if "val_loss" in rec:
            evals.append(rec)
        elif "loss" in rec:
            train.append(rec)
    return train, evals


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path, title: str | None = None) -> Path | None:
    """Write a PNG of train loss (raw and smoothed) and validation loss against the optimizer step.

    Returns the PNG path, or None when the metrics hold no train loss yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(metrics_path)
    if not train:
        return None
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    if len(losses) >= 5:
        # exponential moving average: a readable trend under noisy per-step losses
        beta, avg, smooth = 0.9, losses[0], []
        for v in losses:
            avg = beta * avg + (1 - beta) * v
            smooth.append(avg)
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (EMA 0.9)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                linewidth=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over answer tokens)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png
