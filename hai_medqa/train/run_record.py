"""What a training run leaves in its folder for people and later stages (names: hai_medqa/run_folder.py).

    record = RunRecord(run_dir, writer=runtime.is_main)
    record.start_logging()                 # train.log (rank 0), warnings only elsewhere
    record.write_start(cfg, ...)           # resolved_config.yaml, run_info.json
    record.open(...); record.log_step(rec, stats); record.log_eval(...)   # metrics.jsonl, trackers, progress
    record.log_samples(step, rows)         # samples.jsonl and the trackers' samples table
    record.finish(summary, ...)            # loss_curve.png, summary.json, run_info.json's resolved choices

Only rank 0 writes (`writer`); on the other processes every call is a no-op apart from the logging
setup and the (disabled) progress bar. A metrics line is one whole ``write`` so a kill never leaves
half a line; `truncate_metrics` drops the lines a resumed run will log again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from tqdm import tqdm

from hai_medqa.config import config_to_dict, dump_config_yaml
from hai_medqa.io_utils import atomic_write_text, sha256_file, write_json
from hai_medqa.logging_setup import setup_logging
from hai_medqa.run_folder import (
    LOSS_CURVE,
    METRICS,
    RESOLVED_CONFIG,
    RUN_INFO,
    SAMPLES,
    SUMMARY,
    git_commit,
    package_versions,
)
from hai_medqa.train.plots import plot_loss_curve, read_metrics
from hai_medqa.train.trackers import Trackers, open_trackers, resolve_report_to

TRAIN_LOG = "train.log"
"""The run's log file (read by people only, so not part of the stage contract in run_folder.py)."""

_TRAIN_STATS = ("records", "unusable_records", "formats", "samples", "truncated", "dropped_overlong",
                "dropped_prompt_too_long", "dropped_turns", "split_sequences", "trained_turns", "tokens", "answer_tokens")


class RunRecord:
    """The run folder's records (see module docstring)."""

    def __init__(self, run_dir: str | Path, *, writer: bool):
        self.dir = Path(run_dir)
        self.writer = writer
        self.info: dict[str, Any] = {}
        self.trackers = Trackers({})
        self._cfg: Any = None
        self._bar: tqdm | None = None

    # ------------------------------------------------------------------ start
    def start_logging(self) -> None:
        """Log to the console and RUN/train.log on rank 0; warnings and errors only elsewhere."""
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            setup_logging(self.dir / TRAIN_LOG)
        else:
            setup_logging(None, level="WARNING")

    def write_start(self, cfg: Any, *, profile: str, explicit: set[str], runtime: Any, model_path: Path,
                    train_ds: Any, val_ds: Any | None, schedule: dict[str, Any]) -> None:
        """resolved_config.yaml (the settled config) and run_info.json (provenance: command, commit,
        versions, device, model, data hashes and counts, profile, schedule)."""
        self._cfg = cfg  # `open` reads report_to from it
        if not self.writer:
            return
        atomic_write_text(self.dir / RESOLVED_CONFIG, dump_config_yaml(cfg))
        data = {"train_file": {"path": str(cfg.train_file), "sha256": sha256_file(cfg.train_file),
                               **{k: train_ds.stats.get(k) for k in _TRAIN_STATS}}}
        if val_ds is not None:
            data["val_file"] = {"path": str(cfg.val_file), "sha256": sha256_file(cfg.val_file),
                                "samples": len(val_ds), "answer_tokens": val_ds.stats.get("answer_tokens")}
        device = {"type": runtime.device.type, "world_size": runtime.world_size}
        if runtime.device.type == "cuda":
            device["name"] = torch.cuda.get_device_name(runtime.device)
            device["memory_gib"] = round(torch.cuda.get_device_properties(runtime.device).total_memory / 2**30, 1)
        else:
            device["cpu_threads"] = torch.get_num_threads()
        self.info = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
            "git_commit": git_commit(),
            "versions": package_versions(),
            "device": device,
            "model": {"requested": cfg.model, "revision": cfg.model_revision, "local_path": str(model_path)},
            "data": data,
            "profile": profile,
            "explicit_keys": sorted(explicit),
            "schedule": schedule,
        }
        write_json(self.dir / RUN_INFO, self.info)

    def truncate_metrics(self, step: int) -> None:
        """Drop the metrics (and sample answers) lines after `step`: the resumed run logs them again."""
        for path in (self.dir / METRICS, self.dir / SAMPLES):
            if not self.writer or not path.is_file():
                continue
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            atomic_write_text(path, "".join(k + "\n" for k in keep))

    # ------------------------------------------------------------------ during training
    def open(self, *, tensorboard: bool, start_step: int, total_steps: int) -> None:
        """Start the progress bar and the trackers of ``report_to`` (continuing after `start_step`;
        `tensorboard` false drops TensorBoard), which get the resolved config and run info."""
        if self.writer:
            report_to = getattr(self._cfg, "report_to", ["tensorboard"])
            names = resolve_report_to(report_to, tensorboard=tensorboard)
            self.trackers = open_trackers(names, run_dir=self.dir, run_name=self.dir.name, start_step=start_step)
            if self._cfg is not None:
                self.trackers.log_config(config_to_dict(self._cfg), self.info)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not self.writer,
                         dynamic_ncols=True)

    def log_step(self, rec: dict[str, Any], stats: dict[str, float], *, total_steps: int, logging_steps: int) -> None:
        """One optimizer step: its metrics line, TensorBoard scalars, the progress bar and, every
        `logging_steps` steps (and the first), a log line. `stats` holds the unrounded values."""
        self._write_metrics(rec)
        step, tok_s = rec["step"], stats["tokens_per_s"]
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{stats['lr']:.2e}")
        if self.writer and (step % logging_steps == 0 or step == 1):
            logger.info(f"step {step}/{total_steps} loss {stats['loss']:.4f} lr {stats['lr']:.3e} "
                        f"grad_norm {stats['grad_norm']:.3f} {tok_s:,.0f} tok/s")

    def log_eval(self, step: int, val_loss: float, val_ppl: float, note: str) -> None:
        """One evaluation: its metrics line (val_loss, val_ppl) and a log line ending in `note`."""
        self._write_metrics({"step": step, "val_loss": round(val_loss, 6), "val_ppl": round(val_ppl, 4)})
        logger.info(f"eval at step {step}: val_loss {val_loss:.4f} val_ppl {val_ppl:.3f}{note}")

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """One evaluation's sample answers (rows of step, question, answer, reference): appended to
        samples.jsonl, one whole line each, and shown in the trackers as a table."""
        if not self.writer or not rows:
            return
        with open(self.dir / SAMPLES, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.trackers.log_table("samples", rows, step)

    def _write_metrics(self, rec: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.dir / METRICS, "a", encoding="utf-8") as f:  # one whole line per write
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        scalars = {("eval/" if k.startswith("val_") else "train/") + k: v for k, v in rec.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.trackers.log_scalars(scalars, rec["step"])

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ end
    def finish(self, summary: dict[str, Any], *, title: str, resolved: dict[str, Any]) -> dict[str, Any]:
        """Add the first and last train loss to `summary`, draw loss_curve.png, close TensorBoard,
        write summary.json and the resolved choices into run_info.json; return `summary`."""
        if not self.writer:
            return summary
        train, _ = read_metrics(self.dir / METRICS)
        if train:
            summary["first_loss"] = train[0]["loss"]
            summary["last_loss"] = train[-1]["loss"]
        plot_loss_curve(self.dir / METRICS, self.dir / LOSS_CURVE, title=title)
        self.trackers.close()
        write_json(self.dir / SUMMARY, summary)
        self.info.update(resolved=resolved)
        write_json(self.dir / RUN_INFO, self.info)
        logger.info(f"training {summary['status']} at step {summary['global_step']}; summary in {self.dir / SUMMARY}")
        return summary
