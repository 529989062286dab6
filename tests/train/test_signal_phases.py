"""A stop signal is acted on within seconds in every phase of a run, not only between steps.

torchrun's agent (``accelerate launch``) and SLURM send SIGKILL 30 s after SIGTERM. On two H200s
(bench/results/2026-11-30-h200x2-session2/e2e78_ddp_killed.log) a SIGTERM that arrived while rank 0
generated the evaluation's sample answers (~1 min at 7.8B) was only read after them: the workers were
SIGKILLed and the run lost every step since its start. Here:

- generation (hai_medqa.model.generate) ends at the next token once `stop()` is true, starts no
  further batch and does not return the batch it cut (counted in model forwards);
- S_F2.py, signalled while it generates the sample answers (point ``train:sample_answers``) or while
  it evaluates (``train:evaluating``), exits 75 quickly with a checkpoint at that step, writes no
  sample rows (and, for the evaluation, no eval line) for it, and ``--resume`` ends with the adapter,
  evaluations and best step of a run never interrupted (an evaluation cut short is done on resume);
- under ``accelerate launch`` with two processes (gloo), a SIGTERM to the whole process group while
  rank 0 alone generates ends both processes with the checkpoint well before the agent's 30 s SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_support import default_sigint

import S_F2
from hai_medqa import chat_format
from hai_medqa.cli import run_cli
from hai_medqa.inference.generation import GenerationSettings, generate_ids, load_for_inference
from hai_medqa.io_utils import FAULT_FILE_ENV, FAULT_PAUSE_ENV, FAULT_POINT_ENV, sha256_file
from hai_medqa.model.generate import iter_generate_ids

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS, EVAL_AT = 3, 2
LONG = 2000
"""sample_max_new_tokens of the signalled runs: the tiny model never stops early, so two such answers
take ~15 s on the 2-core machine and a run that finishes them cannot exit within the bounds below."""
EXIT_BOUND_S = 8.0
"""SIGTERM to exit (less the fault pause), one process. Measured on the 2-core machine beside other jobs:
2.0-2.5 s with the fix (the checkpoint, the summary and its plot, interpreter exit); 16.7-18.8 s before it
(both answers generated first; 8.1-8.7 s with 800-token answers)."""
EXIT_BOUND_2P_S = 12.0
"""The same under ``accelerate launch`` with two processes, to the launcher's exit: 2.3-3.5 s with the
fix, 28.1-28.4 s before it (torchrun's agent would SIGKILL at 30 s)."""
WEIGHTS = "adapter_model.safetensors"


def _argv(tiny_exaone_dir, sample_jsonl, out: Path, cache: Path, *, max_new_tokens: int) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--model", str(tiny_exaone_dir),
            "--train-file", str(sample_jsonl["train"]), "--val-file", str(sample_jsonl["validation"]),
            "--max-eval-samples", "4", "--output-dir", str(out), "--cache-dir", str(cache),
            "--max-steps", str(STEPS), "--eval-steps", str(EVAL_AT), "--save-steps", "100",
            "--tokens-per-micro-batch", "1024", "--logging-steps", "1", "--tensorboard", "false",
            "--sample-questions", "2", "--sample-max-new-tokens", str(max_new_tokens)]


def _lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _evals(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in _lines(out / "metrics.jsonl") if "val_loss" in r]


def _sample_steps(out: Path) -> list[int]:
    return [r["step"] for r in _lines(out / "samples.jsonl")]


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(f): sha256_file(f) for root in roots for f in sorted(Path(root).rglob("*")) if f.is_file()}


# ------------------------------------------------------------------ generation
def _prompts(n: int) -> list[str]:
    questions = ["두통이 심해요", "감기에 걸렸을 때 항생제를 먹어야 하나요?", "고혈압 환자는 염분을 줄여야 하나요?"]
    return [chat_format.render([{"role": "user", "content": q}], add_generation_prompt=True) for q in questions[:n]]


def test_stop_ends_generation_at_the_next_token_and_drops_the_cut_batch(tiny_exaone_dir):
    lm = load_for_inference(str(tiny_exaone_dir), dtype="float32", device="cpu")
    settings = GenerationSettings(max_new_tokens=200)
    forwards: list[int] = []
    handle = lm.model.register_forward_hook(lambda *_: forwards.append(1))
    checks = 0

    def stop() -> bool:  # true from its 6th reading on: before the batch, then once per generated token
        nonlocal checks
        checks += 1
        return checks > 5

    try:
        ids = generate_ids(lm, _prompts(3), settings, batch_size=1, stop=stop)
        assert ids == [[], [], []]  # the cut batch is not returned, the other two never started
        assert len(forwards) == 5  # prefill + 4 decoding steps: the token after the flag turned true was the last
        forwards.clear()

        # a batch that finished before the flag turned is returned whole and equal to an unstopped run;
        # the next batch does not start
        flag: list[bool] = []
        it = iter_generate_ids(lm, _prompts(2), GenerationSettings(max_new_tokens=8), batch_size=1,
                               stop=lambda: bool(flag))
        first = next(it)
        flag.append(True)
        assert list(it) == []
        assert len(forwards) == 8
    finally:
        handle.remove()
    unstopped = generate_ids(lm, _prompts(2), GenerationSettings(max_new_tokens=8), batch_size=1)
    assert len(first) == 1 and first[0][1] == unstopped[first[0][0]] and len(first[0][1]) == 8


# ------------------------------------------------------------------ S_F2.py signalled mid-phase
@pytest.fixture(scope="module")
def reference(tiny_exaone_dir, sample_jsonl, tmp_path_factory) -> dict:
    """A run never interrupted (in-process; short sample answers: their length does not touch training)."""
    cache = tmp_path_factory.mktemp("signal_phases_cache")
    out = tmp_path_factory.mktemp("signal_phases_reference") / "run"
    assert run_cli(S_F2.main, _argv(tiny_exaone_dir, sample_jsonl, out, cache, max_new_tokens=8)) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"cache": cache, "evals": _evals(out), "samples": _sample_steps(out), "best_step": summary["best_step"],
            "weights": sha256_file(out / "adapter_last" / WEIGHTS),
            "best_weights": sha256_file(out / "adapter_best" / WEIGHTS)}


def _signal_at(point: str, pause_s: str, cmd: list[str], tmp_path: Path, **popen) -> tuple[subprocess.Popen, float]:
    """Start `cmd` with the fault hook at `point`; once the point announces itself, SIGTERM the
    child's process group (as a scheduler does). Returns the child and the time of the signal."""
    announce = tmp_path / "paused"
    env = {**os.environ, FAULT_POINT_ENV: point, FAULT_FILE_ENV: str(announce), FAULT_PAUSE_ENV: pause_s,
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 240
    while not announce.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if not announce.exists():
        proc.kill()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{point} never reached (rc {proc.returncode}):\n{err[-3000:]}")
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    return proc, sent


# sample answers: no pause, so the signal lands while the first answer is being generated;
# evaluation: a pause at its first round (it takes ~0.1 s here), where the signal lands
PHASES = {"sample_answers": ("train:sample_answers", "0"), "evaluating": ("train:evaluating", "1")}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_sigterm_during_a_phase_saves_at_once_and_resumes_to_the_uninterrupted_run(
        phase, reference, tiny_exaone_dir, sample_jsonl, tmp_path, capfd):
    point, pause = PHASES[phase]
    out = tmp_path / "run"
    argv = _argv(tiny_exaone_dir, sample_jsonl, out, reference["cache"], max_new_tokens=LONG)
    inputs = _snapshot(tiny_exaone_dir, sample_jsonl["train"].parent)
    proc, sent = _signal_at(point, pause, [sys.executable, "S_F2.py", *argv], tmp_path)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    elapsed = time.monotonic() - sent
    paused = float(pause)
    with capfd.disabled():
        print(f"{phase}: {elapsed:.2f} s from SIGTERM to exit (fault pause {paused} s)")
    assert proc.returncode == 75, err[-3000:]

    assert _snapshot(tiny_exaone_dir, sample_jsonl["train"].parent) == inputs  # 18 files: model and data
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{EVAL_AT:07d}"]  # no partial left
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "checkpoints" / f"step_{EVAL_AT:07d}" / "optimizer.pt").is_file()
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["status"] == "interrupted"
    assert EVAL_AT not in _sample_steps(out)  # no rows for the step whose answers were cut short
    log = (out / "train.log").read_text(encoding="utf-8")
    if phase == "sample_answers":
        assert _evals(out) == reference["evals"][:1]  # the evaluation itself had finished
        assert f"sample answers at step {EVAL_AT} cut short by SIGTERM: none written for this step" in log
        state = json.loads((out / "checkpoints" / f"step_{EVAL_AT:07d}" / "trainer_state.json").read_text())
        assert state["eval_pending"] is False and state["best_step"] == EVAL_AT
    else:
        assert _evals(out) == []  # an interrupted evaluation is not logged ...
        assert not (out / "adapter_best").exists()  # ... and does not touch adapter_best
        assert f"evaluation at step {EVAL_AT} cut short by SIGTERM" in log
        assert "sample answers at step" not in log
    assert elapsed - paused < EXIT_BOUND_S, f"{elapsed:.1f} s from SIGTERM to exit (fault pause {paused} s)"

    capfd.readouterr()
    resumed = [*_argv(tiny_exaone_dir, sample_jsonl, out, reference["cache"], max_new_tokens=8), "--resume"]
    assert run_cli(S_F2.main, resumed) == 0
    # the evaluations, best step and adapters of the run never interrupted (step 2's evaluation is
    # done on resume when the signal cut it short); sample rows at step 2 only where they came back with it
    assert _evals(out) == reference["evals"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "completed" and summary["best_step"] == reference["best_step"]
    assert sha256_file(out / "adapter_last" / WEIGHTS) == reference["weights"]
    assert sha256_file(out / "adapter_best" / WEIGHTS) == reference["best_weights"]
    expected_samples = reference["samples"] if phase == "evaluating" else [s for s in reference["samples"]
                                                                           if s != EVAL_AT]
    assert _sample_steps(out) == expected_samples


# ------------------------------------------------------------------ two processes
def test_two_processes_stop_together_while_rank_0_generates(tiny_exaone_dir, sample_jsonl, reference, tmp_path):
    """Rank 0 generates the sample answers alone while rank 1 waits in the next collective; a SIGTERM
    to the process group (the agent's own SIGTERM to the workers follows it) ends both ranks with one
    checkpoint (both ranks' RNG states in it: both reached the save) within seconds, so torchrun's
    agent never has to SIGKILL them (it reports no worker exit status when it is signalled itself)."""
    out = tmp_path / "run"
    argv = _argv(tiny_exaone_dir, sample_jsonl, out, reference["cache"], max_new_tokens=LONG)
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs" / "accelerate" / "ddp.yaml"),
           "--num_processes", "2", "--main_process_port", "0", str(REPO / "S_F2.py"), *argv]
    inputs = _snapshot(tiny_exaone_dir, sample_jsonl["train"].parent)
    proc, sent = _signal_at("train:sample_answers", "0", cmd, tmp_path)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - sent
    print(f"two processes: {elapsed:.2f} s from SIGTERM to the launcher's exit")
    assert "forcefully exiting via 9" not in err, err[-3000:]
    assert _snapshot(tiny_exaone_dir, sample_jsonl["train"].parent) == inputs
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{EVAL_AT:07d}"]  # no partial left
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    ckpt = out / "checkpoints" / f"step_{EVAL_AT:07d}"
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["status"] == "interrupted"
    assert EVAL_AT not in _sample_steps(out)
    log = (out / "train.log").read_text(encoding="utf-8")
    assert f"sample answers at step {EVAL_AT} cut short by SIGTERM" in log
    assert elapsed < EXIT_BOUND_2P_S, f"{elapsed:.1f} s from SIGTERM to the launcher's exit"
