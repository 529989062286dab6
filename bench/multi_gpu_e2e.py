"""End to end on several GPUs: S_F2.py under `accelerate launch` with evaluation, saving, a SIGTERM
mid-run, `--resume` on N and on 1 process, then merge and chat (issue 18, item 3).

For one launcher (ddp or fsdp) and one model (the tiny stand-in or a real shape), in one invocation:
  1. reference  - N processes, uninterrupted, `--steps` optimizer steps, evaluation and checkpoints;
  2. killed     - the same command, sent SIGTERM (what a job scheduler sends) once step `--kill-at` is
                  logged; it must exit 75 after saving a checkpoint;
  3. resumed_N  - `--resume` of that run on N processes;
  4. resumed_1  - `--resume` of a copy of the killed run on 1 process with accumulation x N (same global
                  batch, so the same steps);
  5. the final adapters of 3 and 4 against 1: max |difference| over every LoRA tensor;
  6. merge_and_upload.py --dry-run on the reference adapter, then chat.py answers one question.
Writes a JSON report (timings, exit codes, differences, the runs' summaries with peak memory).

    python bench/multi_gpu_e2e.py --launcher ddp --shape tiny --steps 60 --kill-at 25 --out $OUT/e2e_ddp_tiny.json
    python bench/multi_gpu_e2e.py --launcher fsdp --shape 7.8b --steps 200 --kill-at 90 --out $OUT/e2e_fsdp_78.json

On a machine without GPUs it runs the same sequence with gloo processes on the CPU (`--shape tiny` only),
which is how the script itself is checked (`--launcher fsdp` through hai_medqa/fixtures/fsdp_cpu.py, which
forces FSDP1 on there as accelerate does not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hai_medqa import run_folder  # noqa: E402

EXIT_INTERRUPTED = 75
LAUNCH_CONFIG = {"ddp": REPO / "configs" / "accelerate" / "ddp.yaml",
                 "fsdp": REPO / "configs" / "accelerate" / "fsdp_qlora.yaml"}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    # NVLink multicast stays off on shared hosts (device tool's rule); harmless elsewhere.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


def s_f2_command(n: int, launcher: str, config: Path, overrides: dict) -> list[str]:
    script = REPO / "S_F2.py"
    if launcher == "fsdp" and n > 1 and not _has_gpu():
        # accelerate turns FSDP off on a CPU: S_F2.py with FSDP1 forced on the gloo processes
        script = REPO / "hai_medqa" / "fixtures" / "fsdp_cpu.py"
    args = [str(script), "--config", str(config), *[f"--{k}={v}" for k, v in overrides.items()]]
    if n == 1:
        return [sys.executable, *args]
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher_cmd = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate.exists():
        launcher_cmd.append("launch")
    return [*launcher_cmd, "--config_file", str(LAUNCH_CONFIG[launcher]), "--num_processes", str(n),
            "--main_process_port", "0", *args]


def parse_keys(items: list[str]) -> dict[str, str]:
    """S_F2.py overrides from ``KEY=VALUE`` items (a value may hold commas); ValueError names a bad item.

    >>> parse_keys(["base_precision=fp8", "lora_target_modules=q_proj,v_proj"])
    {'base_precision': 'fp8', 'lora_target_modules': 'q_proj,v_proj'}
    """
    keys = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        keys[key] = value
    return keys


def _logged_step(run: Path) -> int:
    path = run / run_folder.METRICS
    if not path.is_file():
        return 0
    step = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = max(step, int(json.loads(line).get("step", 0)))
        except (json.JSONDecodeError, ValueError):
            continue
    return step


def launch(name: str, cmd: list[str], log: Path, *, kill_at: int | None = None, run: Path | None = None,
           timeout: float = 3600, env: dict[str, str] | None = None) -> dict:
    """Run one command (its own process group), optionally SIGTERM it once `run` logged step `kill_at`.
    `env`: variables set for this command only (e.g. CUDA_VISIBLE_DEVICES)."""
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env={**_env(), **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed_at = None
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                raise SystemExit(f"{name}: timed out after {timeout:.0f} s (log {log})")
            if kill_at is not None and killed_at is None and run is not None and _logged_step(run) >= kill_at:
                killed_at = _logged_step(run)
                os.killpg(proc.pid, signal.SIGTERM)  # the whole job, as a scheduler does
            time.sleep(0.5)
    res = {"name": name, "exit_code": proc.returncode, "seconds": round(time.time() - t0, 1), "log": log.name}
    if killed_at is not None:
        res["sigterm_after_step"] = killed_at
    print(f"{name}: exit {proc.returncode} in {res['seconds']} s", flush=True)
    return res


def adapter_difference(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta = load_file(str(a / run_folder.ADAPTER_WEIGHTS))
    tb = load_file(str(b / run_folder.ADAPTER_WEIGHTS))
    if set(ta) != set(tb):
        return {"same_keys": False}
    diffs = {k: (ta[k].float() - tb[k].float()).abs().max().item() for k in ta}
    scale = max(ta[k].float().abs().max().item() for k in ta)
    return {"same_keys": True, "tensors": len(ta), "max_abs_diff": max(diffs.values()),
            "max_abs_value": scale, "bitwise_equal": all(v == 0 for v in diffs.values())}


def prepare_model_and_data(shape: str, work: Path, storage_dtype: str | None) -> tuple[Path, Path, Path]:
    from hai_medqa.fixtures.tiny_model import build_exaone_checkpoint, build_tiny_exaone, build_tokenizer

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    if shape == "tiny":
        model = work / "tiny_exaone"
        if not (model / "config.json").exists():
            build_tiny_exaone(model)
        sample = REPO / "hai_medqa" / "resources" / "aihub_sample"
        for split, zipname in (("train", "TL.zip"), ("val", "VL.zip")):
            if not (data / f"{split}.jsonl").exists():
                subprocess.run([sys.executable, str(REPO / "preprocess_medical.py"), "--input", str(sample / zipname),
                                "--output", str(data / f"{split}.jsonl"), "--no-progress"], check=True, cwd=REPO)
        return model, data / "train.jsonl", data / "val.jsonl"
    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import write_synthetic_jsonl

    from hai_medqa.model.load import load_tokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        build_tokenizer(tok_dir)
    model = work / f"exaone-{shape}"
    if not (model / "config.json").exists():
        import torch

        build_exaone_checkpoint(model, shape, tokenizer_dir=tok_dir, device="cuda" if torch.cuda.is_available() else "cpu",
                                dtype=storage_dtype)
    tok = load_tokenizer(tok_dir)
    write_synthetic_jsonl(data / "train.jsonl", tok, 4000, seed=0)
    write_synthetic_jsonl(data / "val.jsonl", tok, 64, seed=1)
    return model, data / "train.jsonl", data / "val.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--launcher", choices=sorted(LAUNCH_CONFIG), default="ddp")
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "2.4b", "7.8b", "32b"])
    ap.add_argument("--storage-dtype", default=None, help="on-disk dtype of a random real-shape checkpoint")
    ap.add_argument("--profile", default=None, help="training profile (default: the config's; tiny: plain)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kill-at", type=int, default=25, help="SIGTERM once this step is logged")
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--save-steps", type=int, default=20)
    ap.add_argument("--accumulation", type=int, default=1, help="gradient accumulation per process on N processes")
    ap.add_argument("--workdir", default=os.environ.get("BENCH_WORKDIR", "/tmp/hai_e2e"))
    ap.add_argument("--skip-single", action="store_true", help="skip the resume on 1 process (model too large)")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--repeat-reference", action="store_true",
                    help="run the uninterrupted reference twice: their difference is the run-to-run tolerance")
    ap.add_argument("--export-merged", default=None,
                    help="also pack the merged folder into this .tar (to chat with it on another machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="any other TrainConfig key for every run, e.g. --set sample_max_new_tokens=48")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "multi_gpu_e2e.json"))
    args = ap.parse_args(argv)
    try:
        extra = parse_keys(args.overrides)
    except ValueError as e:
        ap.error(f"--set {e}")

    import torch

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HAI_MEDQA_CACHE", str(work / "cache"))
    out_dir = Path(args.out).parent
    model, train, val = prepare_model_and_data(args.shape, work, args.storage_dtype)
    on_gpu = torch.cuda.is_available()
    config = REPO / "configs" / ("tiny_cpu.yaml" if args.shape == "tiny" else "exaone35_7.8b_qlora.yaml")
    n = args.num_processes
    common = {"model": model, "train_file": train, "val_file": val, "max_steps": args.steps,
              "eval_steps": args.eval_steps, "save_steps": args.save_steps, "save_total_limit": 3,
              "cache_dir": work / "tok_cache", "tensorboard": "false"}
    if args.shape == "tiny":
        common.update(max_eval_samples=16, lora_dropout=0.05)
        if on_gpu:
            common.update(compute_dtype="bfloat16", cpu_threads="null")
    if args.profile:
        common["profile"] = args.profile
    common.update(extra)
    report: dict = {"argv": sys.argv[1:], "launcher": args.launcher, "num_processes": n, "shape": args.shape,
                    "gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "runs": []}

    def run_dir(name: str) -> Path:
        path = work / f"{args.launcher}_{name}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    ref, killed = run_dir("reference"), run_dir("killed")
    acc = {"gradient_accumulation_steps": args.accumulation}
    report["runs"].append(launch("reference", s_f2_command(n, args.launcher, config, {**common, **acc, "output_dir": ref}),
                                 out_dir / f"{args.launcher}_reference.log"))
    if args.repeat_reference:
        again = run_dir("reference_again")
        report["runs"].append(launch("reference_again",
                                     s_f2_command(n, args.launcher, config, {**common, **acc, "output_dir": again}),
                                     out_dir / f"{args.launcher}_reference_again.log"))
    report["runs"].append(launch("killed", s_f2_command(n, args.launcher, config, {**common, **acc, "output_dir": killed}),
                                 out_dir / f"{args.launcher}_killed.log", kill_at=args.kill_at, run=killed))
    # Under `accelerate launch`, torchrun's agent forwards SIGTERM to the workers (which save and exit 75)
    # and then exits 1 with its own SignalException: the checkpoint saved after the signal is what counts.
    killed_run = report["runs"][-1]
    saved = run_folder.list_checkpoints(killed)
    killed_run["saved_step_after_signal"] = (int(saved[-1].name[len(run_folder.CHECKPOINT_PREFIX):])
                                             if saved else None)
    single = work / f"{args.launcher}_resumed_1"
    shutil.rmtree(single, ignore_errors=True)
    if not args.skip_single:
        shutil.copytree(killed, single)
    report["runs"].append(launch(f"resumed_{n}", s_f2_command(n, args.launcher, config,
                                                              {**common, **acc, "output_dir": killed, "resume": "true"}),
                                 out_dir / f"{args.launcher}_resumed_{n}.log"))
    if not args.skip_single:
        # One process: accumulation x N keeps the global batch, so the steps are the same.
        # FSDP forces nothing a one-GPU run would choose otherwise (config.FSDP_REQUIRED holds only defaults),
        # so the same overrides resume on one process.
        one = {**common, "gradient_accumulation_steps": args.accumulation * n, "output_dir": single, "resume": "true"}
        report["runs"].append(launch("resumed_1", s_f2_command(1, args.launcher, config, one),
                                     out_dir / f"{args.launcher}_resumed_1.log"))
    ref_adapter = ref / run_folder.ADAPTER_LAST
    report["comparisons"] = {}
    pairs = [(f"resumed_{n}", killed), ("resumed_1", single)]
    if args.repeat_reference:  # the same command twice: what GPU non-determinism alone gives
        pairs.insert(0, ("reference_again", work / f"{args.launcher}_reference_again"))
    for name, folder in pairs:
        if (folder / run_folder.ADAPTER_LAST).is_dir() and ref_adapter.is_dir():
            report["comparisons"][f"{name}_vs_reference"] = adapter_difference(folder / run_folder.ADAPTER_LAST,
                                                                                ref_adapter)
    for name, folder in (("reference", ref), (f"resumed_{n}", killed), ("resumed_1", single)):
        summary = folder / run_folder.SUMMARY
        if summary.is_file():
            report.setdefault("summaries", {})[name] = json.loads(summary.read_text(encoding="utf-8"))
    if not args.skip_merge and ref_adapter.is_dir():
        merged = work / f"{args.launcher}_merged"
        shutil.rmtree(merged, ignore_errors=True)
        report["runs"].append(launch("merge", [sys.executable, str(REPO / "merge_and_upload.py"), "--base", str(model),
                                               "--adapter", str(ref), "--output", str(merged), "--repo-id",
                                               "your-hf-id/EXAONE-3.5-MedQA-e2e", "--dry-run"],
                                     out_dir / f"{args.launcher}_merge.log"))
        chat_log = out_dir / f"{args.launcher}_chat.log"
        report["runs"].append(launch("chat", [sys.executable, str(REPO / "chat.py"), "--model", str(merged),
                                              "--prompt", "두통이 자주 생기는데 어떻게 관리해야 하나요?",
                                              "--max-new-tokens", "24"], chat_log))
        report["chat_output_tail"] = chat_log.read_text(encoding="utf-8", errors="replace")[-600:]
        if args.export_merged and merged.is_dir():
            import tarfile

            with tarfile.open(args.export_merged, "w") as tar:
                tar.add(merged, arcname=merged.name)
    expected = {"reference": 0, "reference_again": 0, "killed": EXIT_INTERRUPTED if n == 1 else killed_run["exit_code"], f"resumed_{n}": 0,
                "resumed_1": 0, "merge": 0, "chat": 0}
    report["ok"] = all(r["exit_code"] == expected[r["name"]] for r in report["runs"]) and (
        killed_run.get("saved_step_after_signal") or 0) >= killed_run.get("sigterm_after_step", 0)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("ok", "comparisons")}, indent=2), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
