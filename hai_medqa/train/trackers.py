"""Experiment trackers behind one small interface: ``report_to`` (tensorboard, wandb, trackio, mlflow, none).

    trackers = open_trackers(["tensorboard", "wandb"], run_dir=RUN, run_name="medqa", start_step=0)
    trackers.log_config(config_dict, run_info)     # once, at the start
    trackers.log_scalars({"train/loss": 1.2}, step)
    trackers.log_table("samples", rows, step)       # sample answers (hai_medqa/train/sample_answers.py)
    trackers.close()

Every tracker but TensorBoard is optional: its package is imported only when asked for, and a missing
one is a one-line ConfigError naming the pip package (`check_report_to`, called when the config is
validated, before any heavy work). Offline use: WANDB_MODE=offline writes under RUN/wandb, mlflow
logs to RUN/mlruns unless MLFLOW_TRACKING_URI is set, trackio keeps its local database
(TRACKIO_DIR). Only rank 0 creates trackers (run_record.RunRecord).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hai_medqa.config import ConfigError
from hai_medqa.run_folder import TENSORBOARD_DIR

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
"""The trackers `report_to` may name (besides ``none``)."""

PIP_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""The pip package each tracker needs."""

_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def resolve_report_to(report_to: Sequence[str], *, tensorboard: bool = True) -> list[str]:
    """The trackers a run uses: `report_to` without ``none`` (and without TensorBoard when the legacy
    ``tensorboard: false`` is set), in a fixed order, each once."""
    names = set(report_to)
    if "none" in names:
        return []
    if not tensorboard:
        names.discard("tensorboard")
    return [n for n in TRACKERS if n in names]


def check_report_to(report_to: Sequence[str]) -> None:
    """Raise ConfigError (one line) for an unusable `report_to`: ``none`` with a tracker, or a
    tracker whose package is not installed."""
    if "none" in report_to and len(set(report_to)) > 1:
        raise ConfigError(f"report_to: 'none' cannot be combined with trackers, got {list(report_to)}")
    for name in resolve_report_to(report_to):
        if importlib.util.find_spec(_MODULE[name]) is None:
            raise ConfigError(f"report_to: {name} needs the {PIP_PACKAGE[name]} package, which is not installed: "
                              f"pip install {PIP_PACKAGE[name]} (or leave {name} out of report_to)")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b": scalar or JSON text} (what mlflow params and TensorBoard text take)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
        else:
            out[key] = json.dumps(v, ensure_ascii=False, default=str)
    return out


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


class _TensorBoard:
    def __init__(self, run_dir: Path, run_name: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def log_config(self, config: dict[str, Any], run_info: dict[str, Any]) -> None:
        self.w.add_text("config", "```yaml\n" + json.dumps(config, indent=1, ensure_ascii=False, default=str) + "\n```", 0)
        self.w.add_text("run_info", "```json\n" + json.dumps(run_info, indent=1, ensure_ascii=False, default=str)
                        + "\n```", 0)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.w.add_scalar(k, v, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        self.w.add_text(name, _markdown_table(rows), step)

    def close(self) -> None:
        self.w.close()


class _Wandb:
    def __init__(self, run_dir: Path, run_name: str, start_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "hai-medqa"), name=run_name, dir=str(run_dir),
                              resume="allow" if start_step else None, reinit="finish_previous")

    def log_config(self, config: dict[str, Any], run_info: dict[str, Any]) -> None:
        self.run.config.update({**config, "run_info": run_info}, allow_val_change=True)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            cols = list(rows[0])
            self.run.log({name: self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])},
                         step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, run_dir: Path, run_name: str, start_step: int):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "hai-medqa"), name=run_name,
                                resume="allow" if start_step else "never")

    def log_config(self, config: dict[str, Any], run_info: dict[str, Any]) -> None:
        self.run.config.update({**config, "run_info": run_info})

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows and hasattr(self.trackio, "Table"):
            cols = list(rows[0])
            self.trackio.log({name: self.trackio.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])},
                             step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Mlflow:
    def __init__(self, run_dir: Path, run_name: str, start_step: int):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # No server named: a file store in the run folder (mlflow 3 asks for an explicit opt-in to it)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "hai-medqa"))
        self.run = mlflow.start_run(run_name=run_name)

    def log_config(self, config: dict[str, Any], run_info: dict[str, Any]) -> None:
        params = {k: ("" if v is None else str(v))[:500] for k, v in _flat(config).items()}
        self.mlflow.log_params(params)
        self.mlflow.log_dict(run_info, "run_info.json")

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            self.mlflow.log_dict(rows, f"{name}/step_{step:08d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _Mlflow}


class Trackers:
    """The run's trackers; every call goes to each of them (none: every call does nothing)."""

    def __init__(self, backends: dict[str, Any]):
        self.backends = backends

    @property
    def names(self) -> list[str]:
        return list(self.backends)

    def log_config(self, config: dict[str, Any], run_info: dict[str, Any]) -> None:
        """The resolved config and the run info (command, commit, versions, device, data, schedule)."""
        for b in self.backends.values():
            b.log_config(config, run_info)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Scalars named ``train/loss``, ``eval/val_loss``, ... at optimizer step `step`."""
        for b in self.backends.values():
            b.log_scalars(scalars, step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A table (a list of same-keyed dicts) at step `step`: TensorBoard text, a wandb/trackio Table,
        an mlflow JSON artifact."""
        for b in self.backends.values():
            b.log_table(name, rows, step)

    def close(self) -> None:
        for b in self.backends.values():
            b.close()
        self.backends = {}


def open_trackers(names: Sequence[str], *, run_dir: str | Path, run_name: str, start_step: int = 0) -> Trackers:
    """Start each named tracker (`resolve_report_to`'s output) for the run folder `run_dir`."""
    check_report_to(list(names))
    run_dir = Path(run_dir)
    return Trackers({n: _BACKENDS[n](run_dir, run_name, start_step) for n in names})
