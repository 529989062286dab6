"""FSDP-QLoRA saves whole adapters (issue 18): S_F2.py under FSDP1 on two CPU processes (gloo).

On two H200s an FSDP run trained well and wrote adapters with no tensor at all: PEFT 0.21 picks an
adapter's tensors by walking the module tree, and under FSDP every wrapped layer's name carries
``_fsdp_wrapped_module.`` (the gathered state dict's names do not), so nothing matched. Resuming
then loaded that empty adapter without a word and restarted from the initial LoRA.

accelerate turns FSDP off on a CPU, so this file's launcher entry (``__main__``, below) forces it:
accelerate's own FSDP plugin, read from configs/accelerate/fsdp_qlora.yaml's environment, with the
two settings a CPU cannot do off (``sync_module_states`` and ``cpu_ram_efficient_loading`` need a
GPU; every rank loads the same file and seed, so nothing needs broadcasting). Everything else is
the real path: the trainer, accelerate's FSDP1 wrapping with PEFT's wrap policy, the 4-bit NF4 base
in fp32 storage, the saves and the resume. Runs take ~1-2 minutes on the 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMEOUT = 420
STEPS = 4
pytestmark = pytest.mark.slow  # ~2 minutes on the 2-core machine


def _overrides(model, data, out: Path, cache: Path, **extra) -> list[str]:
    keys = {"model": model, "train_file": data["train"], "val_file": data["validation"], "output_dir": out,
            "cache_dir": cache, "max_train_samples": 16, "max_eval_samples": 4, "tokens_per_micro_batch": 1024,
            "max_steps": STEPS, "eval_steps": 2, "save_steps": 2, "save_total_limit": 5, "tensorboard": "false",
            "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "gradient_accumulation_steps": 1,
            "optimizer": "adamw_torch", "cpu_threads": 1, **extra}
    return [f"--{k}={v}" for k, v in keys.items()]


def launch_fsdp(args: list[str], *, n_processes: int = 2, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """S_F2.py through `accelerate launch` with the shipped FSDP-QLoRA config, FSDP forced on CPU."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp_qlora.yaml"),
           "--num_processes", str(n_processes), "--main_process_port", "0", str(Path(__file__)),
           "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def launch_one(args: list[str]) -> None:
    """The same recipe on one plain process (no FSDP): the adapter every other setup must match."""
    cmd = [sys.executable, str(REPO / "S_F2.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "tok_cache"

    def args(out, **extra):
        return _overrides(tiny_exaone_dir, sample_jsonl, out, cache, **extra)

    fsdp, one = root / "fsdp", root / "one"
    # the same global batch (2 processes x 1 = 1 process x 2); FSDP switches lora_kernel to peft (logged)
    proc = launch_fsdp(args(fsdp))
    launch_one(args(one, lora_kernel="peft", gradient_accumulation_steps=2))
    return {"fsdp": fsdp, "one": one, "args": args, "root": root, "log": proc.stderr}


def test_two_fsdp_processes_save_every_lora_tensor_like_one_process(runs, tiny_exaone_dir):
    fsdp, one = runs["fsdp"], runs["one"]
    info = json.loads((fsdp / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 2
    assert "FSDP (version 1): using {'lora_kernel': 'peft'}" in (fsdp / "train.log").read_text(encoding="utf-8")
    reference = adapter(one / "adapter_last")
    layers = json.loads((tiny_exaone_dir / "config.json").read_text(encoding="utf-8"))["num_layers"]
    assert len(reference) == 2 * 7 * layers  # lora_A and lora_B on the 7 projections of every layer
    folders = [fsdp / "adapter_last", fsdp / "adapter_best", *sorted((fsdp / "checkpoints").iterdir())]
    assert len(folders) == 4  # adapter_last, adapter_best, checkpoints at steps 2 and 4
    for folder in folders:
        got = adapter(folder)
        assert got.keys() == reference.keys(), folder.name
        for k, v in got.items():
            assert v.shape == reference[k].shape, k
    # whole tensors, and trained: the final adapter is the one-process run's (same global batch)
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-4)
    last = adapter(fsdp / "adapter_last")
    for k in reference:
        torch.testing.assert_close(last[k], reference[k], rtol=1e-3, atol=1e-5, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in last.items() if "lora_B" in k)  # B starts at zero


def test_an_fsdp_checkpoint_resumes_into_the_sharded_model(runs):
    """Killed after step 2's checkpoint, resumed on two FSDP processes: the run goes on from the
    checkpoint's adapter (not a fresh LoRA) and ends where the uninterrupted run ended."""
    root, fsdp = runs["root"], runs["fsdp"]
    resumed = root / "resumed"
    shutil.copytree(fsdp, resumed)
    for ckpt in (resumed / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > 2:
            shutil.rmtree(ckpt)
    for name in ("adapter_last", "adapter_best", "summary.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = launch_fsdp(runs["args"](resumed, resume="true"))
    assert "resumed from" in proc.stderr
    assert losses(resumed) == pytest.approx(losses(fsdp), abs=1e-4)
    a, b = adapter(resumed / "adapter_last"), adapter(fsdp / "adapter_last")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)


# ------------------------------------------------------------------ launcher entry (one FSDP process)
def _force_fsdp_on_cpu() -> None:
    """Make this process's Runtime FSDP1 as `accelerate launch` with fsdp_qlora.yaml gives on GPUs.

    accelerate leaves FSDP off on a CPU (a gloo MULTI_CPU run); here its FSDP plugin is built from the
    launcher's environment (the shipped config) and put in place, with the two GPU-only settings off."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"  # else ranks > 0 load the model on `meta`
    os.environ["FSDP_SYNC_MODULE_STATES"] = "false"  # FSDP refuses to broadcast CPU tensors

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hai_medqa.train import runtime as runtime_module
    from hai_medqa.train import trainer as trainer_module

    def detect_fsdp_runtime():
        rt = runtime_module.detect_runtime()
        assert rt.world_size > 1 and rt.fsdp_version is None, "expected accelerate's CPU (gloo) launch"
        state = rt.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* set by accelerate launch
        state.distributed_type = DistributedType.FSDP
        state.device = torch.device("cpu")  # FSDP's device_id; gloo ranks are "cpu:N", which FSDP calls another device
        return dataclasses.replace(rt, fsdp_version=state.fsdp_plugin.fsdp_version)

    trainer_module.detect_runtime = detect_fsdp_runtime


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _force_fsdp_on_cpu()
    import S_F2
    from hai_medqa.cli import run_cli

    sys.exit(run_cli(S_F2.main))
