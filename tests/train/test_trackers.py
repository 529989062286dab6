"""report_to: each tracker writes a readable run (offline) with the scalars of metrics.jsonl, the
resolved config, the run info and the sample answers table; a tracker whose package is missing is one
line naming it.

One tiny run (a subprocess) reports to every tracker available: wandb offline (WANDB_MODE=offline),
mlflow into a file store in the run folder, trackio into its local database (TRACKIO_DIR). `make test`
installs wandb and mlflow-skinny into the venv (requirements-trackers.txt) and trackio into its own
folder (requirements-trackio.txt: it pins pillow<13, the venv has 13), named by HAI_TRACKIO_PATH, which
only the subprocess puts on PYTHONPATH. Where a tracker is missing its test skips, except under CI=true,
where it fails: CI must exercise all three.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from hai_medqa.config import ConfigError, load_config
from hai_medqa.train.config import TrainConfig

TRACKIO_PATH = os.environ.get("HAI_TRACKIO_PATH", "")
"""A --target folder holding trackio (the Makefile's test target sets it); empty: the venv's own."""

HAVE = {"wandb": importlib.util.find_spec("wandb") is not None,
        "mlflow": importlib.util.find_spec("mlflow") is not None,
        "trackio": (Path(TRACKIO_PATH) / "trackio" / "__init__.py").is_file() if TRACKIO_PATH
        else importlib.util.find_spec("trackio") is not None}
STEPS = 4
SAMPLES = 1

_RUN = """
import json, sys, torch
from hai_medqa.config import load_config
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.trainer import run_training
torch.set_num_threads(1)
cfg, explicit = load_config(TrainConfig, sys.argv[1], json.loads(sys.argv[2]))
print("SUMMARY " + json.dumps(run_training(cfg, explicit)))
"""


def need(name: str) -> None:
    """Skip a test whose tracker is missing here; under CI=true fail it instead (CI installs all)."""
    if HAVE[name]:
        return
    why = (f"{name} is not installed: `make test` installs it (requirements-trackers.txt, or "
           "requirements-trackio.txt into HAI_TRACKIO_PATH)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def tracked_run(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    """One tiny run (a subprocess) reporting to every tracker available here, with sample answers."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    report_to = ["tensorboard"] + [n for n in ("wandb", "mlflow", "trackio") if HAVE[n]]
    overrides = {
        "model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]),
        "val_file": str(sample_jsonl["validation"]), "max_eval_samples": "4", "output_dir": str(out),
        "cache_dir": str(out.parent / "cache"), "max_steps": str(STEPS), "eval_steps": "2", "save_steps": "100",
        "tokens_per_micro_batch": "1024", "report_to": ",".join(report_to), "sample_questions": str(SAMPLES),
        "sample_max_new_tokens": "4"}
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(out.parent / "trackio"),
           "PYTHONPATH": os.pathsep.join(x for x in (TRACKIO_PATH, os.environ.get("PYTHONPATH", "")) if x)}
    for k in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "TRACKIO_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(k, None)  # the defaults this test reads back
    proc = subprocess.run([sys.executable, "-c", _RUN, str(repo_root / "configs" / "tiny_cpu.yaml"),
                           json.dumps(overrides)], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["status"] == "completed"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = {r["step"]: r for r in lines if "loss" in r}
    evals = {r["step"]: r for r in lines if "val_loss" in r}
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(evals) == [2, 4]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in samples] == [2, 4]
    return out, train, evals


def test_tensorboard_has_the_metrics_config_and_run_info(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, train, evals = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("eval/val_loss")} == pytest.approx(
        {s: r["val_loss"] for s, r in evals.items()}, rel=1e-6)
    tags = set(acc.Tags()["tensors"])  # text summaries
    assert {"config/text_summary", "run_info/text_summary"} <= tags
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lora_r": 16' in config_text and '"report_to"' in config_text


def test_wandb_offline_run_holds_metrics_config_and_run_info(tracked_run):
    need("wandb")
    out, train, evals = tracked_run
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # the offline run's record log (protobuf): keys and values appear verbatim
    for needle in ("train/loss", "train/grad_norm", "eval/val_loss", "eval/val_ppl", "lora_r", "learning_rate",
                   "run_info", "git_commit", "schedule", "samples", out.name):
        assert needle.encode() in data, needle


def test_mlflow_file_store_holds_metrics_config_and_run_info(tracked_run, tmp_path):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    out, train, evals = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("hai-medqa")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert history == pytest.approx({s: r["loss"] for s, r in train.items()}, rel=1e-6)
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_val_loss")}
    assert val == pytest.approx({s: r["val_loss"] for s, r in evals.items()}, rel=1e-6)
    assert run.data.params["lora_r"] == "16" and run.data.params["max_steps"] == str(STEPS)
    local = Path(client.download_artifacts(run.info.run_id, "run_info.json", str(tmp_path)))
    info = json.loads(local.read_text(encoding="utf-8"))
    assert info["schedule"]["total_steps"] == STEPS and "git_commit" in info
    table = Path(client.download_artifacts(run.info.run_id, f"samples/step_{STEPS:08d}.json", str(tmp_path)))
    rows = json.loads(table.read_text(encoding="utf-8"))
    last = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()][-SAMPLES:]
    assert rows == last


def test_trackio_local_run_holds_metrics_config_run_info_and_samples(tracked_run):
    need("trackio")
    out, train, evals = tracked_run
    db = out.parent / "trackio" / "hai-medqa.db"  # trackio's local store: one SQLite file per project
    assert db.is_file(), sorted(p.name for p in db.parent.iterdir())
    con = sqlite3.connect(db)
    try:
        metrics = con.execute("select step, metrics from metrics where run_name = ? order by id",
                              (out.name,)).fetchall()
        (config,) = con.execute("select config from configs where run_name = ?", (out.name,)).fetchone()
    finally:
        con.close()
    logged: dict[int, dict] = {}
    for step, text in metrics:
        logged.setdefault(step, {}).update(json.loads(text))
    assert {s: logged[s]["train/loss"] for s in train} == pytest.approx({s: r["loss"] for s, r in train.items()},
                                                                        rel=1e-6)
    assert {s: logged[s]["eval/val_loss"] for s in evals} == pytest.approx(
        {s: r["val_loss"] for s, r in evals.items()}, rel=1e-6)
    last = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()][-SAMPLES:]
    assert json.dumps(last[0]["question"], ensure_ascii=False)[1:-1] in json.dumps(logged[STEPS]["samples"],
                                                                                  ensure_ascii=False)
    config = json.loads(config)
    assert config["lora_r"] == 16 and config["max_steps"] == STEPS
    assert config["run_info"]["schedule"]["total_steps"] == STEPS and "git_commit" in config["run_info"]


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_missing_tracker_package_is_one_line_naming_it(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # Python's own "not importable" mark: find_spec gives None
    with pytest.raises(ConfigError, match=rf"report_to: {name} needs the {name} package.*pip install {name}") as e:
        load_config(TrainConfig, None, {"report_to": name})
    assert "\n" not in str(e.value)


def test_report_to_none_cannot_be_combined_and_none_writes_no_tracker():
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        load_config(TrainConfig, None, {"report_to": "none,tensorboard"})
    from hai_medqa.train.trackers import resolve_report_to

    assert resolve_report_to(["none"]) == []
    assert resolve_report_to(["tensorboard", "wandb"], tensorboard=False) == ["wandb"]
    cfg, _ = load_config(TrainConfig, None, {"report_to": "[mlflow, tensorboard]"} if HAVE["mlflow"] else {})
    assert resolve_report_to(cfg.report_to) == (["tensorboard", "mlflow"] if HAVE["mlflow"] else ["tensorboard"])
