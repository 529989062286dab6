"""Several processes: S_F2.py under `accelerate launch` with the shipped DDP config, on CPU (gloo).

The proof that data parallelism is right: a 2-process run and a 1-process run with the same global
batch (same micro-batches per optimizer step: 2 processes x accumulation 1 = 1 process x accumulation 2)
take the same steps and end with the same adapter, LoRA dropout included; only rank 0 writes; a
checkpoint resumes on the other process count and still reaches the same adapter. The data is cut so
an epoch has an odd number of micro-batches: the last step of each epoch leaves rank 1 without one.
The same with four processes (4 x 1 = 1 x 4; the last ranks join the short last step with zero weight), and a
4-process checkpoint resumed through the multi-node recipe: configs/accelerate/ddp_multinode.yaml started
twice on this host (--machine_rank 0 and 1), one process each. Eight processes (8 x 1 = 1 x 8, without
validation, to keep it short; tests/train/test_process_counts.py covers validation and 1/2/4/8 processes without
launching them).

Also (no second process needed): the FSDP-QLoRA config through accelerate's own launcher code, the
settings FSDP forces, and the bf16 storage of the 4-bit weights that lets FSDP shard them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from in_process import run_main
from safetensors.torch import load_file

import S_F2

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
SAVE_STEPS, SAVE_TOTAL_LIMIT = 3, 5
TIMEOUT = 240


def _overrides(tiny_exaone_dir, sample_jsonl, out: Path, cache: Path, **extra) -> list[str]:
    keys = {"model": tiny_exaone_dir, "train_file": sample_jsonl["train"], "val_file": sample_jsonl["validation"],
            "output_dir": out, "cache_dir": cache, "max_eval_samples": 12,
            "tokens_per_micro_batch": 1024, "max_steps": "null", "num_epochs": 2, "eval_steps": 100,
            "save_steps": SAVE_STEPS, "save_total_limit": SAVE_TOTAL_LIMIT, "tensorboard": "false", "lora_dropout": 0.05,
            "optimizer": "adamw_torch", "cpu_threads": 1, **extra}
    return [f"--{k}={v}" for k, v in keys.items()]


def launch(n_processes: int, args: list[str], *, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """S_F2.py on n processes: through `accelerate launch` and configs/accelerate/ddp.yaml when n > 1.
    One process runs S_F2's main in this interpreter (no second interpreter's imports), unless a GPU is
    visible: the multi-process runs it is compared with train on the CPU (CUDA_VISIBLE_DEVICES="")."""
    cmd = [sys.executable, str(REPO / "S_F2.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
    if n_processes == 1 and not torch.cuda.is_available():
        return run_main(S_F2.main, cmd[2:], expect_ok=expect_ok)
    if n_processes > 1:
        cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
               "--num_processes", str(n_processes), "--main_process_port", "0", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_training(a: Path, b: Path, *, steps: int) -> None:
    """Same steps, data order and schedule, the same losses and the same final adapter."""
    (train_a, val_a), (train_b, val_b) = metrics(a), metrics(b)
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == list(range(1, steps + 1))
    assert [r["batch_digest"] for r in train_a] == [r["batch_digest"] for r in train_b]
    assert [r["lr"] for r in train_a] == pytest.approx([r["lr"] for r in train_b], rel=1e-9, abs=1e-12)
    assert [r["tokens"] for r in train_a] == [r["tokens"] for r in train_b]
    # Dropout masks differ by ~5e-4 in the loss when they follow the process instead of the micro-batch.
    assert [r["loss"] for r in train_a] == pytest.approx([r["loss"] for r in train_b], abs=2e-5)
    assert [r["grad_norm"] for r in train_a] == pytest.approx([r["grad_norm"] for r in train_b], rel=1e-4)
    assert [r["val_loss"] for r in val_a] == pytest.approx([r["val_loss"] for r in val_b], abs=1e-5)
    wa, wb = adapter(a / "adapter_last"), adapter(b / "adapter_last")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)


@pytest.fixture(scope="module")
def odd_epoch(tiny_exaone_dir, sample_jsonl, tmp_path_factory) -> tuple[int, int]:
    """(max_train_samples, micro-batches per epoch): the fewest samples (>= 12) whose two epochs both pack
    into the same odd number (>= 7) of 1,024-token micro-batches, found with the trainer's own
    tokenisation and plan (as Trainer._load_data and epoch_steps call them), so the tests keep a short
    last step whatever the bundled sample's records become."""
    from hai_medqa import chat_format
    from hai_medqa.config import load_config
    from hai_medqa.model.acquire import resolve_model
    from hai_medqa.model.load import load_tokenizer
    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.packing import plan_epoch
    from hai_medqa.train.sft_data import load_tokenized

    keys = dict(a[2:].split("=", 1) for a in _overrides(tiny_exaone_dir, sample_jsonl, Path("unused"), Path("unused")))
    cfg, _ = load_config(TrainConfig, REPO / "configs" / "tiny_cpu.yaml", keys)
    model_path = Path(resolve_model(cfg.model))
    tokenizer = load_tokenizer(model_path)
    chat_ids = chat_format.apply_tokenizer_rule(tokenizer, source=str(model_path), repair_template=True)
    cache = tmp_path_factory.mktemp("odd_epoch_cache")
    for n in range(12, 41):
        ds = load_tokenized(cfg.train_file, tokenizer, max_samples=n, what="train_file", max_length=cfg.max_length,
                            overlong=cfg.overlong, system_prompt=cfg.system_prompt, cache_dir=cache,
                            eot_id=chat_ids.eot_id, train_turns=cfg.train_turns)
        counts = {len(plan_epoch(ds.lengths, seed=cfg.seed, epoch=e, batching=cfg.batching,
                                 tokens_per_micro_batch=cfg.tokens_per_micro_batch)) for e in (0, 1)}
        if len(counts) == 1 and (c := counts.pop()) % 2 == 1 and c >= 7:
            return n, c
    pytest.fail("no max_train_samples in 12..40 gives an odd number (>= 7) of micro-batches in both epochs")


def saved_checkpoints(total_steps: int) -> list[str]:
    """The checkpoints a completed run keeps: every SAVE_STEPS, the final step, the newest SAVE_TOTAL_LIMIT."""
    steps = [*range(SAVE_STEPS, total_steps, SAVE_STEPS), total_steps]
    return [f"step_{s:07d}" for s in steps[-SAVE_TOTAL_LIMIT:]]


@pytest.fixture(scope="module")
def runs(tiny_exaone_dir, sample_jsonl, odd_epoch, tmp_path_factory):
    """The same recipe on 2 processes (accumulation 1) and on 1 process (accumulation 2)."""
    root = tmp_path_factory.mktemp("distributed")
    cache = root / "tok_cache"
    n_samples, n_mb = odd_epoch

    def args(out, **extra):
        return _overrides(tiny_exaone_dir, sample_jsonl, out, cache, max_train_samples=n_samples, **extra)

    two, one = root / "two", root / "one"
    launch(2, args(two, gradient_accumulation_steps=1))
    launch(1, args(one, gradient_accumulation_steps=2))
    assert micro_batches_per_epoch(two) == micro_batches_per_epoch(one) == n_mb
    steps = 2 * -(-n_mb // 2)
    return {"two": two, "one": one, "args": args, "root": root, "micro_batches": n_mb, "steps": steps}


def test_two_processes_train_exactly_like_one_with_the_same_global_batch(runs):
    two, n_mb = runs["two"], runs["micro_batches"]
    info = json.loads((two / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 2  # really two processes
    assert info["schedule"]["steps_per_epoch"] == [-(-n_mb // 2)] * 2  # the odd micro-batch is trained, not dropped
    assert_same_training(two, runs["one"], steps=runs["steps"])


def test_lean_gpu_settings_train_like_eager_kept_inputs_under_ddp(runs, monkeypatch):
    """On a GPU `lean` offloads the checkpointed layer inputs and compiles the decoder layers
    (config.GPU_PROFILE_KEYS), DDP included: the offloading hooks, the compiled regions (compiled in place
    before DDP wraps the model) and DDP's gradient hooks meet in one backward. Two processes with both
    (compile backend aot_eager: dynamo and AOTAutograd's graphs with eager kernels, so the comparison is exact)
    train as the two without either (the FSDP counterpart of offloading: test_fsdp_save.py)."""
    from hai_medqa.train import compile_regions

    monkeypatch.setenv(compile_regions.BACKEND_ENV, "aot_eager")  # inherited by the launched processes
    out = runs["root"] / "two_offloaded_compiled"
    launch(2, runs["args"](out, gradient_accumulation_steps=1, offload_activations="true",
                           gradient_checkpointing="true", compile_layers="true"))
    resolved = (out / "resolved_config.yaml").read_text(encoding="utf-8")
    assert all(f"{k}: true" in resolved for k in ("offload_activations", "gradient_checkpointing", "compile_layers"))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["compile"]["region_graphs"] >= 1 and summary["compile"]["region_graph_breaks"] == 0
    assert_same_training(out, runs["two"], steps=runs["steps"])


def test_only_rank_0_writes(runs):
    two, total = runs["two"], runs["steps"]
    train, val = metrics(two)
    assert len(train) == total and len(val) == 1  # one line per step, not one per process
    log = (two / "train.log").read_text(encoding="utf-8")
    assert log.count(f"training completed at step {total}") == 1
    assert log.count("checkpoint saved:") == len(range(SAVE_STEPS, total, SAVE_STEPS)) + 1  # and the final one
    ckpt_root = two / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == saved_checkpoints(total)
    for ckpt in ckpt_root.iterdir():  # one adapter and optimizer, every rank's RNG state
        assert sorted(p.name for p in ckpt.glob("*.pt")) == ["optimizer.pt", "rng_state_0.pt", "rng_state_1.pt",
                                                              "scheduler.pt"]
    assert sorted(p.name for p in two.iterdir() if not p.name.startswith(".")) == [
        "adapter_best", "adapter_last", "checkpoints", "loss_curve.png", "metrics.jsonl", "resolved_config.yaml",
        "run_info.json", "summary.json", "train.log"]


def _copy_at_step(run: Path, dst: Path, step: int) -> Path:
    """A run folder as it was when the job died right after the checkpoint of `step`."""
    shutil.copytree(run, dst)
    for ckpt in (dst / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    for name in ("adapter_last", "adapter_best", "summary.json"):
        path = dst / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dst


def test_resume_on_another_process_count_reaches_the_same_adapter(runs):
    root, args = runs["root"], runs["args"]
    # a 2-process checkpoint continued on 1 process, and a 1-process checkpoint on 2
    to_one = _copy_at_step(runs["two"], root / "two_then_one", 3)
    proc = launch(1, args(to_one, gradient_accumulation_steps=2, resume="true"))
    assert "was written by 2 process(es), continuing on 1" in proc.stderr
    to_two = _copy_at_step(runs["one"], root / "one_then_two", 3)
    launch(2, args(to_two, gradient_accumulation_steps=1, resume="true"))
    assert_same_training(to_one, runs["two"], steps=runs["steps"])
    assert_same_training(to_two, runs["one"], steps=runs["steps"])


def test_resume_refuses_another_global_batch(runs):
    """2 processes x 1 resumed on 1 process x 1 would change every step: refused, with the fix."""
    from hai_medqa.config import load_config
    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.errors import TrainingError
    from hai_medqa.train.trainer import run_training

    out = _copy_at_step(runs["two"], runs["root"] / "wrong_batch", 3)
    overrides = dict(a[2:].split("=", 1) for a in runs["args"](out, gradient_accumulation_steps=1, resume="true"))
    cfg, explicit = load_config(TrainConfig, REPO / "configs" / "tiny_cpu.yaml", overrides)
    with pytest.raises(TrainingError, match=r"step_0000003 took 2 micro-batches per optimizer step .*this run 1 .*"
                                            r"set --gradient-accumulation-steps 2"):
        run_training(cfg, explicit)


# ------------------------------------------------------------------ four processes, and two machines
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_machines(args: list[str], *, processes_per_machine: int) -> list[subprocess.CompletedProcess]:
    """The multi-node recipe, both "machines" on this host: configs/accelerate/ddp_multinode.yaml
    started twice, --machine_rank 0 and 1, meeting at 127.0.0.1."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = []
    for machine_rank in (0, 1):
        cmd = [str(ACCELERATE), "launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "ddp_multinode.yaml"),
               "--num_processes", str(2 * processes_per_machine), "--machine_rank", str(machine_rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               str(REPO / "S_F2.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return done


def micro_batches_per_epoch(run: Path) -> int:
    """From the run's own log line "... -> N micro-batches/epoch"."""
    import re

    found = re.search(r"-> (\d+) micro-batches/epoch", (run / "train.log").read_text(encoding="utf-8"))
    assert found, f"no plan line in {run / 'train.log'}"
    return int(found.group(1))


@pytest.fixture(scope="module")
def runs4(tiny_exaone_dir, sample_jsonl, odd_epoch, tmp_path_factory):
    """The same recipe on 4 processes (accumulation 1) and on 1 process (accumulation 4)."""
    root = tmp_path_factory.mktemp("distributed4")
    cache = root / "tok_cache"

    def args(out, **extra):
        return _overrides(tiny_exaone_dir, sample_jsonl, out, cache, max_train_samples=odd_epoch[0], **extra)

    four, one = root / "four", root / "one"
    launch(4, args(four, gradient_accumulation_steps=1))
    launch(1, args(one, gradient_accumulation_steps=4))
    n_mb = micro_batches_per_epoch(four)
    assert n_mb == micro_batches_per_epoch(one) == odd_epoch[1]
    steps = 2 * -(-n_mb // 4)
    return {"four": four, "one": one, "args": args, "root": root, "micro_batches": n_mb, "steps": steps}


@pytest.mark.slow
def test_four_processes_train_exactly_like_one_with_the_same_global_batch(runs4):
    """4 x 1 == 1 x 4, LoRA dropout on; each epoch's last step is short, so the last ranks join it with
    zero weight."""
    four, n_mb = runs4["four"], runs4["micro_batches"]
    assert n_mb % 4 != 0, f"{n_mb} micro-batches per epoch: no short last step to test; change max_train_samples"
    info = json.loads((four / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 4
    assert info["schedule"]["steps_per_epoch"] == [-(-n_mb // 4)] * 2  # the short last step is trained
    assert_same_training(four, runs4["one"], steps=runs4["steps"])
    for ckpt in (four / "checkpoints").iterdir():
        assert sorted(p.name for p in ckpt.glob("rng_state_*.pt")) == [f"rng_state_{r}.pt" for r in range(4)]


@pytest.mark.slow
def test_a_four_process_checkpoint_resumes_on_two_machines_of_one_process(runs4):
    """Written by 4 processes x 1 at step 3, continued through the multi-node recipe (ddp_multinode.yaml,
    2 "machines" on this host, 1 process each, accumulation 2): the same adapter as the uninterrupted
    4-process run."""
    assert runs4["steps"] > 3
    to_two = _copy_at_step(runs4["four"], runs4["root"] / "four_then_two_machines", 3)
    main, other = launch_two_machines(runs4["args"](to_two, gradient_accumulation_steps=2, resume="true"),
                                      processes_per_machine=1)
    assert "was written by 4 process(es), continuing on 2" in main.stderr
    info = json.loads((to_two / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 2
    assert_same_training(to_two, runs4["four"], steps=runs4["steps"])


@pytest.mark.slow
def test_eight_processes_train_exactly_like_one_with_the_same_global_batch(runs4):
    """8 x 1 == 1 x 8: one step per epoch holding every micro-batch (an odd number), so rank 7 joins each
    with zero weight. No validation file, to keep it short (evaluation with fewer validation micro-batches
    than processes: tests/train/test_process_counts.py). No warm-up, so both steps update."""
    root, n_mb = runs4["root"], runs4["micro_batches"]
    assert n_mb < 8
    eight, one = root / "eight", root / "one_x8"
    launch(8, runs4["args"](eight, gradient_accumulation_steps=1, val_file="null", warmup_ratio=0))
    launch(1, runs4["args"](one, gradient_accumulation_steps=8, val_file="null", warmup_ratio=0))
    info = json.loads((eight / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 8 and info["schedule"]["steps_per_epoch"] == [1, 1]
    train, _ = metrics(eight)
    assert train[0]["loss"] != train[1]["loss"]  # the first step changed the adapter
    assert_same_training(eight, one, steps=2)


def test_the_multinode_config_starts_its_share_on_each_machine():
    """ddp_multinode.yaml (and fsdp_qlora.yaml with the same flags) through accelerate's own launcher
    code: num_processes is the total over machines, each machine starts its share under torchrun's
    static rendezvous at the main machine's address."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    def torchrun_args(config: str, *flags: str):
        args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / config),
                                                   *flags, "S_F2.py"])
        args, _, _ = _validate_launch_command(args)
        env = prepare_multi_gpu_env(args)
        return args, env

    args, _ = torchrun_args("ddp_multinode.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert args.multi_gpu and not args.use_fsdp
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.rdzv_endpoint, args.rdzv_backend) == ("10.1.2.3:29500", "static")
    args, env = torchrun_args("fsdp_qlora.yaml", "--num_machines", "2", "--num_processes", "16", "--machine_rank",
                              "1", "--main_process_ip", "10.1.2.3", "--main_process_port", "29500")
    assert args.use_fsdp and env["FSDP_VERSION"] == "1"
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "10.1.2.3:29500"


# ------------------------------------------------------------------ FSDP-QLoRA (what a CPU can check)
def test_fsdp_qlora_config_reaches_accelerate_as_fsdp1_with_the_documented_keys():
    """The shipped file through accelerate's own launch-argument code, to the env its FSDP plugin reads."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(REPO / "configs" / "accelerate" / "fsdp_qlora.yaml"), "S_F2.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.use_fsdp and args.num_processes == 2
    expected = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
                "FSDP_USE_ORIG_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
                "FSDP_SYNC_MODULE_STATES": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                "ACCELERATE_MIXED_PRECISION": "no"}
    assert {k: env.get(k) for k in expected} == expected

    ddp = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
                                              "S_F2.py"])
    ddp, _, _ = _validate_launch_command(ddp)
    assert ddp.multi_gpu and not ddp.use_fsdp


def test_the_llama_decoder_layer_named_for_wrapping_is_what_the_model_loads_as(tiny_llama_dir):
    from hai_medqa.model.load import load_causal_lm

    model = load_causal_lm(tiny_llama_dir, dtype=torch.float32)
    assert "LlamaDecoderLayer" in model._no_split_modules  # what the FSDP wrap policy wraps (fsdp_lora.py)
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"


def test_fsdp_forces_what_fsdp_qlora_needs_and_refuses_conflicts():
    from hai_medqa.config import ConfigError
    from hai_medqa.train.config import TrainConfig, apply_fsdp_requirements

    # The LoRA weights are replicated (fsdp_lora.py): the defaults, fused kernel and 8-bit optimizer included, stay
    cfg, changed = apply_fsdp_requirements(TrainConfig(), set(), fsdp_version=1)
    assert changed == {} and cfg == TrainConfig()
    chosen = TrainConfig(lora_kernel="fused", optimizer="paged_adamw_8bit")
    assert apply_fsdp_requirements(chosen, {"lora_kernel", "optimizer"}, fsdp_version=1) == (chosen, {})
    cfg, changed = apply_fsdp_requirements(TrainConfig(dequantize_cache=True), set(), fsdp_version=1)
    assert changed == {"dequantize_cache": False} and cfg.dequantize_cache is False  # left at a profile's choice
    assert apply_fsdp_requirements(TrainConfig(), set(), fsdp_version=None) == (TrainConfig(), {})  # DDP: untouched
    with pytest.raises(ConfigError, match="dequantize_cache: True does not work under FSDP; use False"):
        apply_fsdp_requirements(TrainConfig(dequantize_cache=True), {"dequantize_cache"}, fsdp_version=1)
    with pytest.raises(ConfigError, match="needs fsdp_version 1, got 2"):
        apply_fsdp_requirements(TrainConfig(), set(), fsdp_version=2)
    with pytest.raises(ConfigError, match="uint8 cannot be sharded"):
        apply_fsdp_requirements(TrainConfig(quant_storage="uint8"), {"quant_storage"}, fsdp_version=1)


def test_quant_storage_auto_is_bf16_only_under_fsdp():
    from hai_medqa.config import ConfigError
    from hai_medqa.train.backends import resolve_quant_storage

    assert resolve_quant_storage("auto", torch.bfloat16, fsdp=True) == torch.bfloat16
    assert resolve_quant_storage("auto", torch.bfloat16, fsdp=False) is None  # bitsandbytes' uint8
    assert resolve_quant_storage("uint8", torch.bfloat16, fsdp=False) is None
    assert resolve_quant_storage("bfloat16", torch.float32, fsdp=False) == torch.bfloat16
    with pytest.raises(ConfigError, match="must match"):
        resolve_quant_storage("float16", torch.bfloat16, fsdp=True)


def test_bf16_quant_storage_reaches_bitsandbytes_and_keeps_the_model(tiny_llama_dir):
    """The storage dtype reaches BitsAndBytesConfig and the Params4bit tensors (so FSDP can shard
    them) while the stored bits, hence the logits, stay exactly those of the uint8 storage."""
    from hai_medqa.model.load import load_causal_lm

    ids = torch.arange(1, 40)[None]
    logits = {}
    for storage in (None, "bfloat16"):
        model = load_causal_lm(tiny_llama_dir, quantize_4bit=True, dtype=torch.bfloat16, device_map={"": "cpu"},
                               quant_storage=storage)
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert type(weight).__name__ == "Params4bit"
        want = torch.bfloat16 if storage else torch.uint8
        assert weight.dtype == want and model.config.quantization_config.bnb_4bit_quant_storage == want
        with torch.no_grad():
            logits[storage] = model(ids).logits.float()
    torch.testing.assert_close(logits["bfloat16"], logits[None], rtol=0, atol=0)
