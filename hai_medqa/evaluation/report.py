"""Side-by-side comparison of two evaluations (e.g. base vs fine-tune): JSON, markdown table, PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hai_medqa.evaluation.metrics import stderr_of_mean
from hai_medqa.io_utils import atomic_path, atomic_write_text, write_json

# metric -> (display name, higher is better)
_METRICS = {
    "rouge1": ("ROUGE-1 (morpheme)", True),
    "rouge2": ("ROUGE-2 (morpheme)", True),
    "rougeL": ("ROUGE-L (morpheme)", True),
    "char_rougeL": ("ROUGE-L (character)", True),
    "answer_ppl": ("answer perplexity", False),
}


# Two models answered the same samples: a difference is "within noise" when the 95% interval of the mean paired
# difference (normal approximation: 1.96 standard errors) covers zero.
NOISE_Z = 1.96


def paired_differences(samples_a: Sequence[Mapping[str, Any]], samples_b: Sequence[Mapping[str, Any]],
                       mcq_a: Sequence[Mapping[str, Any]] = (), mcq_b: Sequence[Mapping[str, Any]] = (),
                       ) -> dict[str, list[float]]:
    """Per-sample differences (B - A) of every per-sample score, for the noise of a comparison.

    `samples_*`: the predictions rows of two evaluations of the same samples (matched by their ``line``; a
    score is taken where both rows have it); `mcq_*`: their KorMedMCQA items, in the same order (1 for a
    correct answer, 0 otherwise), per subset and pooled (``micro``). Perplexity is one figure over all
    answer tokens: it has no per-sample differences.

    >>> paired_differences([{"line": 1, "rougeL": 0.5}, {"line": 2, "rougeL": 0.25}],
    ...                    [{"line": 2, "rougeL": 0.5}, {"line": 1, "rougeL": 0.5}])
    {'rougeL': [0.0, 0.25]}
    """
    by_line = {row["line"]: row for row in samples_b}
    diffs: dict[str, list[float]] = {}
    for row in samples_a:
        other = by_line.get(row["line"])
        if other is None:
            continue
        for key in _METRICS:
            if isinstance(row.get(key), (int, float)) and isinstance(other.get(key), (int, float)):
                diffs.setdefault(key, []).append(float(other[key]) - float(row[key]))
    if mcq_a and len(mcq_a) == len(mcq_b):
        for ia, ib in zip(mcq_a, mcq_b, strict=True):
            if ia["subset"] != ib["subset"] or ia.get("source") != ib.get("source"):
                return diffs  # not the same items: no paired comparison
            d = float(ib["pred"] == ib["gold"]) - float(ia["pred"] == ia["gold"])
            diffs.setdefault(ia["subset"], []).append(d)
            diffs.setdefault("micro", []).append(d)
    return diffs


def comparison_rows(a: Mapping[str, Any], b: Mapping[str, Any],
                    paired: Mapping[str, Sequence[float]] | None = None) -> list[dict[str, Any]]:
    """One row per metric present in either result: name, both values, delta (b - a), better side.

    With `paired` (`paired_differences` of the two evaluations) a row also holds ``delta_stderr``, the standard
    error of the mean paired difference, and ``within_noise``: whether the 95% interval of the difference
    covers zero (then ``better`` is None: neither model is shown to be better). Without it, or for a metric
    without per-sample scores (perplexity, KorMedMCQA's macro average), both are None and ``better`` is
    only the direction of the difference."""
    paired = paired or {}
    rows = []
    keys: list[tuple[str, str, str, bool]] = [("metrics", k, name, hib) for k, (name, hib) in _METRICS.items()]
    mcq_keys = list(dict.fromkeys([*(a.get("kormedmcqa") or {}), *(b.get("kormedmcqa") or {})]))
    keys += [("kormedmcqa", k, f"KorMedMCQA {k}", True) for k in mcq_keys]
    for group, key, name, higher_is_better in keys:
        va = (a.get(group) or {}).get(key)
        vb = (b.get(group) or {}).get(key)
        if va is None and vb is None:
            continue
        delta = vb - va if va is not None and vb is not None else None
        stderr = stderr_of_mean(paired.get(key) or ()) if delta is not None else None
        within = None if stderr is None else abs(delta) <= NOISE_Z * stderr
        better = None
        if delta is not None and delta != 0 and not within:
            better = "B" if (delta > 0) == higher_is_better else "A"
        rows.append({"group": group, "metric": key, "name": name, "a": va, "b": vb, "delta": delta,
                     "delta_stderr": stderr, "within_noise": within,
                     "higher_is_better": higher_is_better, "better": better})
    return rows


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def markdown_table(rows: list[dict], label_a: str, label_b: str) -> str:
    """A GitHub markdown table of `comparison_rows`: the better value in bold (not where the difference is within
    noise), and the 95% noise of each paired difference."""
    lines = [f"| metric | {label_a} | {label_b} | Δ ({label_b} − {label_a}) | noise (95%, paired) |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        va, vb = _fmt(r["a"]), _fmt(r["b"])
        if r["better"] == "A":
            va = f"**{va}**"
        elif r["better"] == "B":
            vb = f"**{vb}**"
        arrow = "↑" if r["higher_is_better"] else "↓"
        delta = "—" if r["delta"] is None else f"{r['delta']:+.4f}"
        stderr = r.get("delta_stderr")
        noise = "—" if stderr is None else (f"±{NOISE_Z * stderr:.4f}: "
                                            + ("within noise" if r["within_noise"] else "a real difference"))
        lines.append(f"| {r['name']} {arrow} | {va} | {vb} | {delta} | {noise} |")
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], label_a: str, label_b: str, out_png: str | Path) -> Path:
    """Grouped bars: scores in [0, 1] on the left, perplexity (own scale) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [r for r in rows if r["metric"] != "answer_ppl"]
    ppl = [r for r in rows if r["metric"] == "answer_ppl"]
    widths = [max(len(scores), 1), 1] if ppl else [1]
    fig, axes = plt.subplots(1, len(widths), figsize=(2 + 1.1 * sum(widths), 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    w = 0.38

    def bars(ax, subset, title):
        xs = range(len(subset))
        for offset, side, label, color in ((-w / 2, "a", label_a, "#8c8c8c"), (w / 2, "b", label_b, "#2a7ab9")):
            vals = [r[side] if r[side] is not None else 0.0 for r in subset]
            drawn = ax.bar([x + offset for x in xs], vals, w, label=label, color=color)
            ax.bar_label(drawn, labels=[_fmt(r[side]) for r in subset], fontsize=7, padding=2, rotation=90)
        names = [r["metric"] if r["group"] == "metrics" else f"MCQA {r['metric']}" for r in subset]
        ax.set_xticks(list(xs), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.margins(y=0.25)

    if scores:
        bars(axes[0][0], scores, "higher is better")
        axes[0][0].set_ylim(0, 1.15)
        axes[0][0].legend(fontsize=8, loc="upper right")
    if ppl:
        bars(axes[0][-1], ppl, "lower is better")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return out_png


COMPARE_JSON, COMPARE_MD, COMPARE_PNG = "compare.json", "compare.md", "compare.png"


def comparison_files(out_dir: str | Path) -> list[Path]:
    """The files `write_comparison` writes into `out_dir`."""
    return [Path(out_dir) / name for name in (COMPARE_JSON, COMPARE_MD, COMPARE_PNG)]


def write_comparison(out_dir: str | Path, result_a: Mapping, result_b: Mapping, label_a: str, label_b: str,
                     paired: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Write compare.json, compare.md and compare.png into `out_dir`; return the paths. `paired`: the
    evaluations' `paired_differences`, for each difference's noise."""
    out_dir = Path(out_dir)
    rows = comparison_rows(result_a, result_b, paired)
    write_json(out_dir / COMPARE_JSON, {"a": label_a, "b": label_b, "rows": rows, "noise_z": NOISE_Z,
                                        "results": {label_a: result_a, label_b: result_b}})
    header = (f"# {label_a} vs {label_b}\n\nSame {result_a.get('samples', 0)} validation samples (seed "
              f"{result_a.get('seed')}), same generation settings. ↑ higher is better, ↓ lower is better; "
              "the better value is bold unless the difference is within noise (the 95% interval of the mean "
              "per-sample difference covers zero).\n\n")
    atomic_write_text(out_dir / COMPARE_MD, header + markdown_table(rows, label_a, label_b))
    png = plot_comparison(rows, label_a, label_b, out_dir / COMPARE_PNG)
    return {"json": out_dir / COMPARE_JSON, "markdown": out_dir / COMPARE_MD, "png": png}
