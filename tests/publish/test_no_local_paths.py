"""No local path in anything published or shared: the whole pipeline (bundled sample -> preprocess ->
tiny EXAONE -> S_F2.py -> merge_and_upload.py --dry-run, merged and adapter-only) runs under a folder
whose path holds a unique marker, and no byte of any file the upload would send, nor of any file the
run folder's adapters carry (RUN/adapter_best, RUN/adapter_last), contains it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import merge_and_upload
from hai_medqa.publish import release_files

MARKER = "MARKER-q7x3-private-user"
BASE_ID = "LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct"


def _offenders(folder) -> list[str]:
    return [rel for rel, _ in release_files(folder) if MARKER.encode() in (folder / rel).read_bytes()]


def test_published_files_hold_no_local_path(repo_root, tiny_exaone_dir, tmp_path, monkeypatch):
    from hai_medqa.data import run_preprocess
    from hai_medqa.fixtures.aihub_sample import SAMPLE_DIR
    from hai_medqa.model.identity import eval_model_identity

    home = tmp_path / MARKER
    data, model, run, cache = home / "data", home / "models" / "tiny_exaone", home / "run", home / "cache"
    monkeypatch.setenv("HAI_MEDQA_CACHE", str(cache))  # conversions land under the marker too
    run_preprocess([SAMPLE_DIR / "TL.zip"], data / "train.jsonl", progress=False)
    run_preprocess([SAMPLE_DIR / "VL.zip"], data / "val.jsonl", progress=False)
    shutil.copytree(tiny_exaone_dir, model)
    cmd = [sys.executable, str(repo_root / "S_F2.py"), "--config", str(repo_root / "configs" / "tiny_cpu.yaml"),
           "--model", str(model), "--train-file", str(data / "train.jsonl"), "--val-file", str(data / "val.jsonl"),
           "--output-dir", str(run), "--max-steps", "4", "--eval-steps", "2", "--save-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert MARKER in (run / "run_info.json").read_text(encoding="utf-8")  # the local records do hold it
    # The run's adapters are shared as they are (copied, uploaded by hand): every file of them is path-free.
    for name in ("adapter_best", "adapter_last"):
        files = sorted(p for p in (run / name).rglob("*") if p.is_file())
        assert {"adapter_config.json", "adapter_model.safetensors", "hai_medqa_training.json", "README.md"} <= {
            p.name for p in files}
        assert [p.name for p in files if MARKER.encode() in p.read_bytes()] == [], name

    # An evaluation of this run's adapter as evaluate.py records it (local paths included).
    evals = {"model": "finetune", "evaluated_model": eval_model_identity(str(model), run),
             "model_info": {"model": str(model), "adapter": str(run / "adapter_best"), "resolved_model_dir": str(cache)},
             "samples": 35, "seed": 0, "system_prompt": "x",
             "data": {"path": str(data / "val.jsonl"), "sha256": "ab" * 32, "records": 35, "evaluated": 35},
             "metrics": {"rougeL": 0.1}, "metrics_stderr": {"rougeL": 0.01},
             "kormedmcqa": {"doctor": 0.3}, "kormedmcqa_detail": {"path": str(home / "kormedmcqa"), "split": "test"}}
    (run / "eval_results.json").write_text(json.dumps(evals), encoding="utf-8")

    common = ["--base", str(model), "--adapter", str(run), "--repo-id", "someone/EXAONE-3.5-tiny-test", "--push",
              "--dry-run", "--log-file", str(home / "merge.log")]
    assert merge_and_upload.main([*common, "--output", str(home / "merged")]) == 0
    assert merge_and_upload.main([*common, "--output", str(home / "adapter_release"), "--adapter-only"]) == 0

    merged, adapter_release = home / "merged", home / "adapter_release"
    assert {"README.md", "merge_info.json", "release_info.json", "eval_results.json", "training/run_info.json",
            "training/resolved_config.yaml", "training/summary.json", "training/hai_medqa_training.json"} <= {
        rel for rel, _ in release_files(merged)}
    assert {"README.md", "adapter_config.json", "llama/adapter_config.json", "eval_results.json",
            "training/run_info.json"} <= {rel for rel, _ in release_files(adapter_release)}
    assert _offenders(merged) == [] and _offenders(adapter_release) == []
    # The card still says what was trained on: the bundled synthetic sample, read from the record.
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "bundled synthetic sample" in card or "synthetic sample" in card
