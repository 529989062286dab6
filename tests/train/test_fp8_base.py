"""The opt-in FP8 base (`base_precision: fp8`, hai_medqa/train/fp8_base.py) on the CPU.

The quantisation math is checked on random data against float64 references: the exact-quantisation
reference (the same FP8 operands dequantised) bounds the matmul itself, the unquantised one bounds what
e4m3's 3 mantissa bits cost. Both the emulation (dequantise + matmul) and the real `torch._scaled_mm`
run here (torch's CPU build has row-wise-scaled `_scaled_mm`). Only a GPU can show the speed and the
Hopper kernels' numerics (bench/train_throughput.py --loss-parity).
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from hai_medqa.config import ConfigError, load_config, parse_cli_overrides, save_config
from hai_medqa.run_folder import TrainingRecord, read_training_record, write_training_record
from hai_medqa.train import fp8_base
from hai_medqa.train.config import (
    TrainConfig,
    check_fsdp_requirements,
    estimate_fast_peak_gib,
    recorded_base_precision,
    settle_config,
)
from hai_medqa.train.fp8_base import (
    FP8_DTYPE,
    FP8_MAX,
    Fp8BaseLinear,
    convert_base_to_fp8,
    dequantize_rows,
    fp8_support_problem,
    quantize_rows,
)

IMPLS = ["emulate"] + (["scaled_mm"] if fp8_base.probe_rowwise_scaled_mm(torch.device("cpu")) is None else [])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _data(m=48, k=128, n=80, seed=0):
    """Activations and weights whose rows span several orders of magnitude (what per-row scales are for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    w = torch.randn(n, k, generator=g) * 0.02 * torch.logspace(-1, 1, n)[:, None]
    dy = torch.randn(m, n, generator=g) * torch.logspace(-3, 0, m)[:, None]
    return x, w, dy


# ------------------------------------------------------------------------------------ quantisation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_quantisation_round_trip_is_within_e4m3_rounding(dtype):
    x, _, _ = _data()
    x = torch.cat([x, torch.zeros(1, x.shape[1])]).to(dtype)  # an all-zero row must stay finite
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.shape == (x.shape[0], 1)
    assert scale.dtype == torch.float32
    amax = x.float().abs().amax(dim=1, keepdim=True)
    assert torch.allclose(scale[:-1], amax[:-1] / FP8_MAX, rtol=1e-6)  # one scale per row: rowmax / 448
    assert torch.all(q[:-1].float().abs().amax(dim=1) == FP8_MAX)  # each row uses the full e4m3 range
    deq = dequantize_rows(q, scale)
    assert torch.isfinite(deq).all() and torch.all(deq[-1] == 0)
    # e4m3: 3 mantissa bits -> |error| <= 2^-4 |x| for normal numbers, <= half the subnormal step (2^-10 of
    # the row's scale) below them
    err = (deq - x.float()).abs()
    bound = 2.0**-4 * x.float().abs() + 2.0**-10 * scale + 1e-30
    assert torch.all(err <= bound * (1 + 1e-6))
    per_row = (deq - x.float()).norm(dim=1)[:-1] / x.float().norm(dim=1)[:-1]
    assert per_row.max() < 0.04  # ~2.5% typical for gaussian rows, whatever the row's magnitude


def test_weight_scales_are_per_output_channel():
    _, w, _ = _data()
    layer = Fp8BaseLinear.from_linear(_linear(w))
    assert layer.weight_fp8.dtype == torch.uint8 and layer.weight_fp8.shape == w.shape
    scale = layer.weight_scale.view(torch.float32)
    assert scale.shape == (w.shape[0],)
    assert torch.allclose(scale, w.abs().amax(dim=1) / FP8_MAX, rtol=1e-6)
    assert _rel(layer.dequantized_weight(), w) < 0.04
    assert not any(p.requires_grad for p in layer.parameters())


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


# --------------------------------------------------------------------------- forward and dX
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_match_the_references(impl, dtype):
    x, w, dy = _data()
    layer = Fp8BaseLinear.from_linear(_linear(w), impl=impl)
    xin = x.to(dtype).requires_grad_(True)
    y = layer(xin)
    y.backward(dy.to(dtype))
    assert y.dtype == dtype and xin.grad.dtype == dtype

    # exact-quantisation reference: the same FP8 operands, dequantised, multiplied in float64
    w_deq = layer.dequantized_weight().double()
    x_q, x_s = quantize_rows(x.to(dtype))
    y_ref_q = dequantize_rows(x_q, x_s).double() @ w_deq.t()
    w_scale = layer.weight_scale.view(torch.float32)
    g_q, g_s = quantize_rows(dy.to(dtype), col_scale=w_scale)
    dx_ref_q = dequantize_rows(g_q, g_s).double() @ layer.weight_fp8.view(FP8_DTYPE).double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # accumulation order / bf16 output rounding (2^-9)
    assert _rel(y, y_ref_q) < tol
    assert _rel(xin.grad, dx_ref_q) < tol
    # against the unquantised maths: what e4m3 costs (both operands rounded, ~2.5% each, independent)
    assert _rel(y, x.double() @ w.double().t()) < 0.06
    assert _rel(xin.grad, dy.double() @ w.double()) < 0.06


@pytest.mark.skipif("scaled_mm" not in IMPLS, reason="torch._scaled_mm with row-wise scales not available on this CPU")
def test_real_scaled_mm_equals_the_emulation():
    x, w, dy = _data(seed=3)
    out = {}
    for impl in ("emulate", "scaled_mm"):
        layer = Fp8BaseLinear.from_linear(_linear(w), impl=impl)
        xin = x.to(torch.bfloat16).requires_grad_(True)
        y = layer(xin)
        y.backward(dy.to(torch.bfloat16))
        out[impl] = (y.detach(), xin.grad)
    assert _rel(out["scaled_mm"][0], out["emulate"][0]) < 1e-2
    assert _rel(out["scaled_mm"][1], out["emulate"][1]) < 1e-2


# ------------------------------------------------------------------------ on a PEFT model
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(path, *, init_lora_weights=True, seed=0):
    from peft import LoraConfig, get_peft_model

    from hai_medqa.model.load import load_causal_lm
    from hai_medqa.train.fast_lora import fuse_lora_forward

    model = load_causal_lm(path, dtype=torch.float32, device_map="cpu")
    model.config.use_cache = False
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                             init_lora_weights=init_lora_weights, task_type="CAUSAL_LM"))
    fuse_lora_forward(model)
    return model


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(5, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids.clone()}


def test_lora_gradients_flow_and_the_fp8_base_gets_none(tiny_llama_dir, batch):
    from peft.utils import get_peft_model_state_dict

    model = _peft_model(tiny_llama_dir, init_lora_weights=False)  # B != 0, so A gets a gradient too
    adapter_keys = set(get_peft_model_state_dict(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = model.config.num_hidden_layers
    conv = convert_base_to_fp8(model, "cpu", impl="emulate")
    assert conv.layers == 7 * layers
    fp8_layers = [m for m in model.modules() if isinstance(m, Fp8BaseLinear)]
    assert len(fp8_layers) == 7 * layers
    lm_head = model.get_base_model().lm_head
    assert type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.float32  # lm_head stays
    assert set(model._ddp_params_and_buffers_to_ignore) == set(conv.param_names)
    # LoRA's parameters and the saved adapter's tensors are unchanged by the conversion
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert set(get_peft_model_state_dict(model)) == adapter_keys
    model.train()
    out = model(**batch, use_cache=False)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # a generic dtype cast cannot touch the FP8 bits or their scales
    before = fp8_layers[0].weight_fp8.clone(), fp8_layers[0].weight_scale.clone()
    model.to(torch.bfloat16)
    assert torch.equal(fp8_layers[0].weight_fp8, before[0]) and torch.equal(fp8_layers[0].weight_scale, before[1])


def test_tiny_training_steps_track_the_unquantised_base(tiny_llama_dir, batch):
    """Three AdamW steps of LoRA on the tiny model: the FP8 base's losses (emulated, and through the real
    _scaled_mm where the CPU has it) are finite, fall, and stay within 2% of the same steps on the
    unquantised base (same LoRA init and data)."""
    losses = {}
    for mode in ("plain", *IMPLS):
        model = _peft_model(tiny_llama_dir, seed=0)
        if mode != "plain":
            convert_base_to_fp8(model, "cpu", impl=mode)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[mode] = []
        for _ in range(3):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item())
    ref = losses["plain"]
    for impl in IMPLS:
        got = losses[impl]
        assert all(torch.isfinite(torch.tensor(got)))
        assert got[-1] < got[0]  # the adapter learns through the FP8 base
        rel = [abs(a - b) / b for a, b in zip(got, ref, strict=True)]
        assert max(rel) < 0.02, (impl, ref, got)
        assert rel[0] > 0  # the FP8 path really ran (the unquantised base would give the same loss exactly)


# ------------------------------------------------------------------------------------ refusal
@pytest.mark.parametrize(("facts", "expect"), [
    (("cpu", None, None, None), ["on cpu", "nf4"]),
    (("cuda", "NVIDIA A100-SXM4-80GB", (8, 0), None), ["NVIDIA A100-SXM4-80GB", "compute capability 8.0", ">= 8.9"]),
    (("cuda", "NVIDIA GeForce RTX 3090", (8, 6), None), ["RTX 3090", "8.6"]),
    (("cuda", "NVIDIA H100", (9, 0), "RuntimeError: rowwise scaling unsupported\nmore"),
     ["NVIDIA H100", "9.0", "rowwise scaling unsupported", "_scaled_mm"]),
])
def test_refusal_names_the_device_and_its_capability(facts, expect):
    msg = fp8_support_problem(*facts)
    assert msg is not None and "\n" not in msg
    for part in expect:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("facts", [("cuda", "NVIDIA L40S", (8, 9), None), ("cuda", "NVIDIA H200", (9, 0), None),
                                   ("cuda", "NVIDIA B200", (10, 0), None)])
def test_fp8_capable_gpus_are_accepted(facts):
    assert fp8_support_problem(*facts) is None


def test_this_cpu_is_refused_before_any_weight_is_read(tmp_path):
    from hai_medqa.train.model_build import build_model

    fp8_base.check_base_precision(TrainConfig(), torch.device("cpu"))  # nf4: nothing to check
    cfg = TrainConfig(base_precision="fp8")
    with pytest.raises(ConfigError, match=r"base_precision fp8 needs an NVIDIA GPU .* on cpu"):
        fp8_base.check_base_precision(cfg, torch.device("cpu"))
    fp8_base.check_base_precision(TrainConfig(base_precision="fp8", fp8_emulate=True), torch.device("cpu"))
    runtime = types.SimpleNamespace(device=torch.device("cpu"), fsdp_version=None)
    with pytest.raises(ConfigError, match="base_precision fp8 needs"):  # not "no such folder": nothing was read
        build_model(cfg, tmp_path / "no_model_here", runtime)


def test_an_emulated_fp8_base_trains_through_the_trainer_on_this_cpu(repo_root, tiny_exaone_dir, sample_jsonl,
                                                                     tmp_path):
    """`fp8_emulate: true` runs the whole training path on the CPU: the FP8 base is made from the bf16
    checkpoint, its losses track the unquantised base's (same data, seed and LoRA init) without equalling
    them, and the run's record and adapter card say which base it trained against."""
    from hai_medqa.train.trainer import run_training

    def run(name, **keys):
        overrides = {"model": str(tiny_exaone_dir), "train_file": str(sample_jsonl["train"]), "val_file": "null",
                     "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), "max_steps": "6",
                     "tensorboard": "false", "lora_dropout": "0", "compute_dtype": "auto", "warmup_ratio": "0",
                     **keys}
        run_training(*load_config(TrainConfig, repo_root / "configs" / "tiny_cpu.yaml", overrides))
        lines = (tmp_path / name / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]

    with pytest.raises(ConfigError, match="fp8_emulate .* needs base_precision: fp8"):
        TrainConfig(fp8_emulate=True).validate()
    ref = run("bf16_base", quantize_4bit="false")
    fp8 = run("fp8_emulated", base_precision="fp8", fp8_emulate="true")
    assert len(fp8) == len(ref) == 6 and fp8[-1] < fp8[0]
    rel = [abs(a - b) / b for a, b in zip(fp8, ref, strict=True)]
    assert rel[0] > 0 and max(rel) < 0.05, (ref, fp8)  # the FP8 base really ran, and tracks the exact one
    assert read_training_record(tmp_path / "fp8_emulated" / "adapter_last").base_precision == "fp8"
    card = (tmp_path / "fp8_emulated" / "adapter_last" / "README.md").read_text(encoding="utf-8")
    assert "base in FP8 e4m3" in card


# ------------------------------------------------------------------------------------ config
def test_base_precision_on_the_command_line_and_in_the_resolved_config(tmp_path):
    cfg, explicit = load_config(TrainConfig, None, parse_cli_overrides(["--base-precision", "fp8"]))
    assert cfg.base_precision == "fp8" and explicit == {"base_precision"}
    assert TrainConfig().base_precision == "nf4"
    with pytest.raises(ConfigError, match="base.precision"):
        load_config(TrainConfig, None, parse_cli_overrides(["--base-precision", "fp16"]))
    save_config(cfg, tmp_path / "resolved.yaml")
    again, _ = load_config(TrainConfig, tmp_path / "resolved.yaml")
    assert again == cfg
    settled, _ = settle_config(cfg, {"base_precision"}, on_gpu=True, fsdp_version=None, resume=False)
    assert settled.base_precision == "fp8"  # no profile touches it


def test_base_precision_conflicts_are_one_line_errors():
    with pytest.raises(ConfigError, match="dequantize_cache"):
        TrainConfig(base_precision="fp8", dequantize_cache=True).validate()
    with pytest.raises(ConfigError, match="compute_dtype float16"):
        TrainConfig(base_precision="fp8", compute_dtype="float16").validate()
    TrainConfig(base_precision="fp8", compute_dtype="bfloat16").validate()
    with pytest.raises(ConfigError, match="base_precision: 'fp8' does not work under FSDP"):
        check_fsdp_requirements(TrainConfig(base_precision="fp8"), {"base_precision"}, 1)


def test_training_record_carries_the_base_precision(tmp_path):
    assert [recorded_base_precision(TrainConfig(base_precision=p, quantize_4bit=q))
            for p, q in (("fp8", True), ("nf4", True), ("nf4", False))] == ["fp8", "nf4", "none"]
    rec = TrainingRecord(base_model="x/y", step=3, base_precision="fp8")
    path = write_training_record(tmp_path, rec)
    assert json.loads(path.read_text())["base_precision"] == "fp8"
    assert read_training_record(tmp_path) == rec
    old = TrainingRecord(base_model="x/y", step=3)  # records from before the field: unchanged on disk
    path = write_training_record(tmp_path, old)
    assert "base_precision" not in json.loads(path.read_text())
    assert read_training_record(tmp_path).base_precision is None
    # the adapter card's precision row says which base the adapter was trained against
    from hai_medqa.train.adapter_folder import training_settings

    rows = dict(training_settings(config={"base_precision": "fp8", "quantize_4bit": True, "compute_dtype": "auto"}))
    assert rows["precision"].startswith("base in FP8 e4m3")
    assert dict(training_settings(config={"base_precision": "nf4", "quantize_4bit": True}))["precision"] == \
        "base in 4-bit NF4 (QLoRA)"


def test_fast_profile_estimate_counts_a_byte_per_fp8_weight():
    cfg = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 102400, "tie_word_embeddings": False}
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    diff = estimate_fast_peak_gib(cfg, 8192, "fp8") - estimate_fast_peak_gib(cfg, 8192)
    assert diff == pytest.approx((1.0 - 0.5625) * linear / 2**30)


# ------------------------------------------------------------------- the bench's parity report
def test_bench_loss_parity_and_its_variant_key():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    v = bench.parse_variant("lean:base_precision=fp8,tokens_per_micro_batch=2048")
    assert v["profile"] == "lean" and v["overrides"] == {"base_precision": "fp8", "tokens_per_micro_batch": 2048}
    TrainConfig(**v["overrides"]).validate()  # the bench builds TrainConfig(**overrides)

    ref = {"name": "plain", "losses": [2.0, 1.0, 0.5, 0.4], "batch_digests": ["a", "b", "c", "d"]}
    other = {"name": "fp8", "losses": [2.02, 1.0, 0.49, 0.42], "batch_digests": ["a", "b", "c", "d"]}
    lp = bench.loss_parity(ref, other, window=2)
    assert lp["same_batches"] and lp["steps"] == 4
    assert lp["mean_rel_diff"] == pytest.approx((0.01 + 0 + 0.02 + 0.05) / 4)
    assert lp["max_rel_diff"] == pytest.approx(0.05) and lp["max_rel_diff_step"] == 4
    assert lp["window_mean_rel_diff"] == pytest.approx((0.01 / 1.5 + 0.005 / 0.45) / 2)  # means of 2 steps
    assert lp["met"]  # mean 2.0% <= 2%
    assert not bench.loss_parity(ref, {**other, "batch_digests": ["a", "b", "x", "d"]})["met"]  # other data
    assert not bench.loss_parity(ref, {**other, "losses": [2.2, 1.1, 0.55, 0.44]})["met"]  # 10% off
