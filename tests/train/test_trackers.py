"""report_to: each tracker writes a readable run (offline) with the scalars of metrics.jsonl, the
resolved config and the run info; a tracker whose package is missing is one line naming it.

wandb runs offline (WANDB_MODE=offline), mlflow into a file store in the run folder. trackio is not
installed in the project's venv (it would downgrade pillow there), so its run test skips when absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from hai_medqa.config import ConfigError, load_config
from hai_medqa.train.config import TrainConfig
from hai_medqa.train.trainer import run_training

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("wandb", "mlflow", "trackio")}
STEPS = 4


@pytest.fixture(scope="module")
def tracked_run(repo_root, tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    """One tiny run reporting to every tracker installed here."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    report_to = ["tensorboard"] + [n for n in ("wandb", "mlflow", "trackio") if HAVE[n]]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(out.parent / "trackio")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, explicit = load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", {
            "model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]),
            "val_file": str(sample_jsonl["validation"]), "max_eval_samples": "4", "output_dir": str(out),
            "cache_dir": str(out.parent / "cache"), "max_steps": str(STEPS), "eval_steps": "2", "save_steps": "100",
            "tokens_per_micro_batch": "1024", "report_to": ",".join(report_to)})
        summary = run_training(cfg, explicit)
    finally:
        torch.set_num_threads(threads)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert summary["status"] == "completed"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = {r["step"]: r for r in lines if "loss" in r}
    evals = {r["step"]: r for r in lines if "val_loss" in r}
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(evals) == [2, 4]
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


@pytest.mark.skipif(not HAVE["wandb"], reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_metrics_config_and_run_info(tracked_run):
    out, train, evals = tracked_run
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # the offline run's record log (protobuf): keys and values appear verbatim
    for needle in ("train/loss", "train/grad_norm", "eval/val_loss", "eval/val_ppl", "lora_r", "learning_rate",
                   "run_info", "git_commit", "schedule", out.name):
        assert needle.encode() in data, needle


@pytest.mark.skipif(not HAVE["mlflow"], reason="mlflow is not installed (pip install mlflow-skinny)")
def test_mlflow_file_store_holds_metrics_config_and_run_info(tracked_run, tmp_path):
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


@pytest.mark.skipif(not HAVE["trackio"], reason="trackio is not installed here (it would downgrade pillow in the "
                                                "project's venv); pip install trackio")
def test_trackio_local_run_exists(tracked_run):
    out, _, _ = tracked_run
    assert any((out.parent / "trackio").rglob("*")), "trackio wrote nothing under TRACKIO_DIR"


@pytest.mark.parametrize("name", ["wandb", "mlflow", "trackio"])
def test_missing_tracker_package_is_one_line_naming_it(name):
    if HAVE[name]:
        pytest.skip(f"{name} is installed here")
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
