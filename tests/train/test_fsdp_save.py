"""FSDP-QLoRA on two CPU processes (gloo): S_F2.py under the shipped FSDP1 config, like one process.

The frozen 4-bit base is sharded, one FSDP unit per decoder layer plus the root; the LoRA modules are
FSDP-ignored and replicated on every process, their gradients averaged once per optimizer step
(hai_medqa/train/fsdp_lora.py). Checked here: the units (decoder layers + root, no LoRA matrix its own
unit as under PEFT's wrap policy before), identical LoRA gradients on both ranks after the sync, the
losses and the adapter of a one-process run with the same global batch, whole adapters in every folder
(issue 18: FSDP runs once wrote empty ones: PEFT 0.21 walks the module tree, whose names carry
``_fsdp_wrapped_module.``), and kill/resume 2 -> 2, 2 -> 1 and 1 -> 2 processes. The runs use the
one-GPU LoRA forward (``lora_kernel: fused``) and bitsandbytes' 8-bit AdamW, which FSDP no longer
replaces; ``lora_r: 32`` makes the MLP's LoRA matrices 4,096 elements, the size from which
bitsandbytes keeps 8-bit optimizer states.

accelerate turns FSDP off on a CPU, so this file's launcher entry (``__main__``, below) forces it with
hai_medqa/fixtures/fsdp_cpu.py (accelerate's own FSDP plugin from configs/accelerate/fsdp_qlora.yaml's
environment, with the two GPU-only settings off); everything else is the real path. The entry also
writes a probe per rank (FSDP units after wrapping, the LoRA gradients of the first steps before and
after the sync) into $HAI_FSDP_PROBE. Runs take well under a minute each on the 2-core machine.
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
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
TIMEOUT = 420
STEPS = 4
PROBE_ENV = "HAI_FSDP_PROBE"
pytestmark = pytest.mark.slow  # ~2 minutes on the 2-core machine


def _overrides(model, data, out: Path, cache: Path, **extra) -> list[str]:
    keys = {"model": model, "train_file": data["train"], "val_file": data["validation"], "output_dir": out,
            "cache_dir": cache, "max_train_samples": 16, "max_eval_samples": 4, "tokens_per_micro_batch": 1024,
            "max_steps": STEPS, "eval_steps": 2, "save_steps": 2, "save_total_limit": 5, "tensorboard": "false",
            "lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "gradient_accumulation_steps": 1,
            "optimizer": "paged_adamw_8bit", "cpu_threads": 1, **extra}
    return [f"--{k}={v}" for k, v in keys.items()]


def launch_fsdp(args: list[str], *, n_processes: int = 2, expect_ok: bool = True,
                probe: Path | None = None) -> subprocess.CompletedProcess:
    """S_F2.py through `accelerate launch` with the shipped FSDP-QLoRA config, FSDP forced on CPU
    (`probe`: the folder the launcher entry writes its per-rank probe into)."""
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp_qlora.yaml"),
           "--num_processes", str(n_processes), "--main_process_port", "0", str(Path(__file__)),
           "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if probe is not None:
        env[PROBE_ENV] = str(probe)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def launch_one(args: list[str]) -> subprocess.CompletedProcess:
    """The same recipe on one plain process (no FSDP): the adapter every other setup must match. S_F2's
    main runs in this interpreter (no second interpreter's imports), unless a GPU is visible: the FSDP
    runs it is compared with train on the CPU (CUDA_VISIBLE_DEVICES="")."""
    cmd = [sys.executable, str(REPO / "S_F2.py"), "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *args]
    if not torch.cuda.is_available():
        from in_process import run_main  # not at the top: this file is also the FSDP launcher entry

        import S_F2

        return run_main(S_F2.main, cmd[2:])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def cut_at_step_2(run: Path, to: Path) -> Path:
    """A copy of `run` as if it had been killed right after step 2's checkpoint."""
    shutil.copytree(run, to)
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > 2:
            shutil.rmtree(ckpt)
    for name in ("adapter_last", "adapter_best", "summary.json"):
        path = to / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return to


def assert_same_run(a: Path, b: Path) -> None:
    """Same losses at every step and the same final adapter (float tolerance)."""
    assert losses(a) == pytest.approx(losses(b), abs=1e-4)
    x, y = adapter(a / "adapter_last"), adapter(b / "adapter_last")
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def runs(tiny_exaone_dir, sample_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    cache = root / "tok_cache"

    def args(out, **extra):
        return _overrides(tiny_exaone_dir, sample_jsonl, out, cache, **extra)

    fsdp, one, probe = root / "fsdp", root / "one", root / "probe"
    # the same global batch (2 processes x 1 = 1 process x 2), the same LoRA kernel and optimizer
    proc = launch_fsdp(args(fsdp), probe=probe)
    launch_one(args(one, gradient_accumulation_steps=2))
    return {"fsdp": fsdp, "one": one, "args": args, "root": root, "log": proc.stderr, "probe": probe}


def test_two_fsdp_processes_save_every_lora_tensor_like_one_process(runs, tiny_exaone_dir):
    fsdp, one = runs["fsdp"], runs["one"]
    info = json.loads((fsdp / "run_info.json").read_text(encoding="utf-8"))
    assert info["device"]["world_size"] == 2
    log = (fsdp / "train.log").read_text(encoding="utf-8")
    assert "FSDP (version 1): using" not in log  # nothing forced: the one-GPU kernel and optimizer
    summary = json.loads((fsdp / "summary.json").read_text(encoding="utf-8"))
    assert summary["optimizer"] == "paged_adamw_8bit"  # bitsandbytes' (on a CPU without paging)
    assert "lora_kernel: fused" in (fsdp / "resolved_config.yaml").read_text(encoding="utf-8")
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
    assert_same_run(fsdp, one)
    assert any(float(v.abs().max()) > 0 for k, v in adapter(fsdp / "adapter_last").items() if "lora_B" in k)


def test_fsdp_wraps_only_the_decoder_layers_and_replicates_lora(runs, tiny_exaone_dir):
    """One FSDP unit per decoder layer, one for the (untied) input embedding, plus the root; every LoRA tensor
    a whole, unflattened parameter on every rank. (PEFT's wrap policy, used before, made each LoRA matrix a
    unit of its own: 46 here.)"""
    config = json.loads((tiny_exaone_dir / "config.json").read_text(encoding="utf-8"))
    layers = config["num_layers"]
    assert config["tie_word_embeddings"] is False  # like EXAONE-3.5 7.8B and 32B
    for rank in (0, 1):
        probe = json.loads((runs["probe"] / f"units_rank{rank}.json").read_text(encoding="utf-8"))
        assert probe["fsdp_units"] == layers + 2, probe
        assert probe["built_fsdp_units"] == layers + 2
        assert probe["trainable_flat_params"] == 0  # FSDP manages no trained tensor
        assert probe["trainable_params"] == 2 * 7 * layers  # lora_A, lora_B of 7 projections, whole
        assert probe["frozen_flat_params"] == layers + 2  # the base is flattened (sharded) per unit


def test_the_embedding_is_not_held_whole_through_the_backward(runs):
    """In the middle of the backward (the gradient of the middle decoder layer's output), the input embedding's
    full weight is freed on every rank: only its shard stays. In the root unit, as before, FSDP1 kept it
    gathered from the forward to the end of the backward (0.98 GiB per GPU at 32B); the head, which stays in
    the root, is still whole there (the probe reads both, so this test can tell them apart)."""
    for rank in (0, 1):
        seen = json.loads((runs["probe"] / f"mid_backward_rank{rank}.json").read_text(encoding="utf-8"))
        assert seen["embedding_full_elements"] == 0, seen
        assert seen["head_full_elements"] >= seen["head_elements"] > 0, seen  # the root flat parameter: head + norm


def test_lora_gradients_are_identical_on_every_rank_after_the_sync(runs):
    """After the one all-reduce per step, both ranks clip and step with the same gradients (so the
    replicas stay equal); before it, each rank held only its own micro-batch's."""
    probe = runs["probe"]
    for step in (1, 2):
        before = [torch.load(probe / f"grads_step{step}_rank{r}_before.pt") for r in (0, 1)]
        after = [torch.load(probe / f"grads_step{step}_rank{r}_after.pt") for r in (0, 1)]
        assert len(after[0]) == len(after[1]) > 0
        for a, b in zip(after[0], after[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert any(not torch.equal(a, b) for a, b in zip(before[0], before[1], strict=True))  # a real sync
        for g0, g1, avg in zip(before[0], before[1], after[0], strict=True):  # the mean of the two ranks
            torch.testing.assert_close(avg, (g0 + g1) / 2)
        assert any(float(g.abs().max()) > 0 for g in after[0])


def test_an_fsdp_checkpoint_resumes_into_the_sharded_model(runs):
    """Killed after step 2's checkpoint, resumed on two FSDP processes: the run goes on from the
    checkpoint's adapter (not a fresh LoRA) and ends where the uninterrupted run ended."""
    resumed = cut_at_step_2(runs["fsdp"], runs["root"] / "resumed")
    proc = launch_fsdp(runs["args"](resumed, resume="true"))
    assert "resumed from" in proc.stderr
    assert_same_run(resumed, runs["fsdp"])


def test_checkpoints_resume_across_process_counts_and_launchers(runs):
    """An FSDP checkpoint (2 processes) resumes on one plain process with accumulation 2, and a
    one-process checkpoint on two FSDP processes: both end like the uninterrupted runs."""
    root, args = runs["root"], runs["args"]
    to_one = cut_at_step_2(runs["fsdp"], root / "fsdp_to_one")
    proc = launch_one(args(to_one, gradient_accumulation_steps=2, resume="true"))
    assert "written by 2 process(es), continuing on 1" in proc.stderr
    assert_same_run(to_one, runs["one"])
    to_two = cut_at_step_2(runs["one"], root / "one_to_fsdp")
    proc = launch_fsdp(args(to_two, resume="true"))
    assert "written by 1 process(es), continuing on 2" in proc.stderr
    assert_same_run(to_two, runs["fsdp"])


def test_offloaded_activations_train_bitwise_like_kept_ones_under_fsdp(runs):
    """offload_activations on the same two FSDP processes: the checkpointed layers' inputs go to host
    memory (hai_medqa/train/activation_offload.py) and the run's losses and adapter are the plain FSDP
    run's bit for bit (the hooks only copy the inputs out and back; nothing else changes)."""
    out = runs["root"] / "fsdp_offload"
    launch_fsdp(runs["args"](out, offload_activations="true"))
    assert "offload_activations: true" in (out / "resolved_config.yaml").read_text(encoding="utf-8")
    assert "activation offloading: the saved inputs of" in (out / "train.log").read_text(encoding="utf-8")
    assert losses(out) == losses(runs["fsdp"]) and len(losses(out)) == STEPS
    got, ref = adapter(out / "adapter_last"), adapter(runs["fsdp"] / "adapter_last")
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ launcher entry (one FSDP process)
def _force_fsdp_on_cpu() -> None:
    """FSDP1 forced on this CPU process (hai_medqa/fixtures/fsdp_cpu.py), plus the probe when asked."""
    from hai_medqa.fixtures.fsdp_cpu import force_fsdp_on_cpu
    from hai_medqa.train import trainer as trainer_module

    force_fsdp_on_cpu()
    if os.environ.get(PROBE_ENV):
        _install_probe(Path(os.environ[PROBE_ENV]), trainer_module)


def _install_probe(folder: Path, trainer_module) -> None:
    """Write, per rank, the FSDP units and parameters after wrapping (units_rank<r>.json) and the LoRA
    gradients of steps 1 and 2 before and after the all-reduce (grads_step<n>_rank<r>_{before,after}.pt)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp._flat_param import FlatParameter

    from hai_medqa.train import fsdp_lora

    folder.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    real_build, real_average = trainer_module.build_model, fsdp_lora.average_gradients
    calls = {"n": 0}

    def build_model(*a, **kw):
        built = real_build(*a, **kw)
        params = list(built.model.parameters())
        flat = [p for p in params if isinstance(p, FlatParameter)]
        probe = {"fsdp_units": len(FSDP.fsdp_modules(built.model)), "built_fsdp_units": built.fsdp_units,
                 "trainable_flat_params": sum(p.requires_grad for p in flat),
                 "frozen_flat_params": sum(not p.requires_grad for p in flat),
                 "trainable_params": sum(p.requires_grad and not isinstance(p, FlatParameter) for p in params)}
        (folder / f"units_rank{rank}.json").write_text(json.dumps(probe), encoding="utf-8")
        _probe_mid_backward(built.model, folder / f"mid_backward_rank{rank}.json")
        return built

    def average_gradients(params, world_size):
        calls["n"] += 1
        step = calls["n"]
        if step <= 2:
            torch.save([p.grad.detach().clone() for p in params], folder / f"grads_step{step}_rank{rank}_before.pt")
        real_average(params, world_size)
        if step <= 2:
            torch.save([p.grad.detach().clone() for p in params], folder / f"grads_step{step}_rank{rank}_after.pt")

    trainer_module.build_model = build_model
    fsdp_lora.average_gradients = average_gradients


def _probe_mid_backward(model, out: Path) -> None:
    """When the gradient of the middle decoder layer's output is computed (first time only), write how many
    elements the storages behind the input embedding's and the head's weights hold: 0 once FSDP freed the
    gathered weight (FSDP1 with use_orig_params=False leaves the module's weight a view of the full flat
    parameter, whose storage it resizes to 0 on resharding)."""
    inner = model.module if hasattr(model, "module") else model
    embedding, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    layers = [m for m in inner.modules() if type(m).__name__.endswith("DecoderLayer")]  # inside FSDP wrappers
    middle = layers[len(layers) // 2]

    def check(grad):
        if not out.exists():
            out.write_text(json.dumps({
                "embedding_full_elements": embedding.weight.untyped_storage().size() // embedding.weight.element_size(),
                "head_full_elements": head.weight.untyped_storage().size() // head.weight.element_size(),
                "head_elements": head.weight.numel()}), encoding="utf-8")
        return grad

    def on_forward(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden.register_hook(check)

    middle.register_forward_hook(on_forward)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _force_fsdp_on_cpu()
    import S_F2
    from hai_medqa.cli import run_cli

    sys.exit(run_cli(S_F2.main))
