"""bench/kernel_breakdown.py: kernel names to families, and a real torch.profiler trace reduced to shares."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize(("name", "expected"), [
    # kernel names as an H100/H200 trace of a QLoRA step spells them
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "matmul"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("triton_tem_fused_1", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int)",
     "nf4 dequantisation"),
    ("void kOptimizerStatic8bit2StateBlockwise<float, 0, 256, 1>(float*, float*, unsigned char*)", "optimizer"),
    ("_rms_norm_forward_kernel", "liger"),
    ("_swiglu_backward_kernel", "liger"),
    ("liger_cross_entropy_kernel", "liger"),
    ("triton_poi_fused_add_mul_0", "compiled (inductor)"),
    # FP8's activation scaling, fused by inductor: a reduction, not a GEMM, though named after _scaled_mm
    ("triton_red_fused__scaled_mm__to_copy_abs_amax_clamp_div_mul_silu_t_view_9", "compiled (inductor)"),
    ("nvjet_sm90_qqtst_128x128_128x6_1x1_h_bz_coopA_algo2_ovscale_TNT", "matmul"),
    ("Memcpy DtoH (Device -> Pinned)", "copies and fills"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "element-wise"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("aten::mm", "matmul"),
    ("aten::cat", "copies and fills"),
    ("some_kernel_nobody_named", "other"),
])
def test_kernel_names_fall_into_their_family(name, expected, bench_module):
    assert bench_module("kernel_breakdown").family(name) == expected


def test_breakdown_sums_families_and_divides_by_steps(bench_module):
    b = bench_module("kernel_breakdown").breakdown({"nvjet_a": 600.0, "aten::addmm": 200.0, "kDequantizeBlockwise": 150.0,
                             "unknown": 50.0}, steps=2, top=2)
    fams = b["families"]
    assert list(fams) == ["matmul", "nf4 dequantisation", "other"]  # largest first
    assert fams["matmul"]["share"] == pytest.approx(0.8) and fams["matmul"]["ms_per_step"] == pytest.approx(0.4)
    assert b["total_ms_per_step"] == pytest.approx(0.5)
    assert [k["name"] for k in b["top_kernels"]] == ["nvjet_a", "aten::addmm"]


def test_user_annotations_are_not_counted_beside_their_kernels(bench_module):
    """record_function ranges (the optimizer's "Optimizer.step#...") span kernels that are counted on their own;
    counting the range too would count its time twice (the first GPU breakdown did: optimizer 8.6% -> ~0.5%)."""
    mod = bench_module("kernel_breakdown")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        a = torch.randn(128, 128)
        with torch.profiler.record_function("aten::mm_annotation_range"):
            for _ in range(10):
                a = torch.mm(a, a) / 128
    names = set(mod.durations_from_profiler(prof, cuda=False))
    assert "aten::mm" in names
    assert not any("annotation_range" in n for n in names)


def test_step_profiler_traces_only_the_steps_after_its_start(bench_module):
    """A real torch.profiler trace (CPU): steps 1-2 untraced, 3-4 traced (matmuls), step 5 untraced (adds)."""
    mod = bench_module("kernel_breakdown")
    prof = mod.StepProfiler(start_after_step=2, steps=2, cuda=False)
    # Both sides are made lopsided so a loaded machine cannot flip the shares: in a traced step each 256 x 256
    # product (~33 MFLOP) outweighs its division ~100-fold; an untraced step's 2,000 adds (~5 times a traced
    # step's time) would dominate the trace if a wrong step were traced.
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    for step in range(1, 6):
        if step in (3, 4):
            for _ in range(20):
                a = torch.mm(a, a) / 16
        else:
            for _ in range(2000):
                b = torch.add(b, 1.0)
        prof.on_step(step)
    assert prof.result is not None and prof.result["steps"] == 2
    fams = prof.result["families"]
    assert "matmul" in fams and fams["matmul"]["share"] > 0.5
    assert fams.get("element-wise", {"share": 0.0})["share"] < fams["matmul"]["share"]


def test_idle_by_phase_charges_gpu_gaps_to_the_host_phase_they_fall_in(bench_module):
    """GPU busy 0-8 and 12-30 (µs) under host phases forward 0-10, optimizer 10-14, collate 16-20 over 2 steps:
    the idle 8-12 splits 2 to forward and 2 to optimizer; nothing idles in collate; 14-16 lies between phases."""
    mod = bench_module("kernel_breakdown")
    r = mod.idle_by_phase([("hai/forward", 0, 10), ("hai/optimizer", 10, 14), ("hai/collate", 16, 20)],
                          [(12, 20), (0, 5), (4, 8), (20, 30)], steps=2)
    assert r["phases"]["forward"] == {"host_ms_per_step": 0.005, "gpu_idle_ms_per_step": 0.001}
    assert r["phases"]["optimizer"]["gpu_idle_ms_per_step"] == 0.001
    assert r["phases"]["collate"]["gpu_idle_ms_per_step"] == 0.0
    assert r["gpu_idle_ms_per_step"] == pytest.approx(0.002)  # 4 µs of 20, over 2 steps
    assert r["between_phases_idle_ms_per_step"] == pytest.approx(0.0)
    gaps = mod.idle_gaps(mod.merge_intervals([(12, 20), (0, 5), (4, 8)]), 0, 20)
    assert gaps == [(8, 12)]
    ops = mod.host_ops_in_idle([("aten::item", 7, 11), ("cudaLaunchKernel", 0, 8)], gaps, steps=1)
    assert ops == [{"name": "aten::item", "idle_ms_per_step": 0.003}]


def test_trainer_steps_are_traced_as_disjoint_host_phases(tmp_path, tiny_exaone_dir, sample_jsonl, bench_module):
    """The idle analysis charges the GPU's idle time to the trainer's "hai/..." ranges, so every phase of a step
    must appear once per step, and no two may overlap (an overlap would charge the same idle time twice)."""
    from hai_medqa.train.config import TrainConfig
    from hai_medqa.train.trainer import Trainer

    mod = bench_module("kernel_breakdown")
    cfg = TrainConfig(model=str(tiny_exaone_dir), train_file=str(sample_jsonl["train"]), val_file=None,
                      output_dir=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"), profile="plain", max_steps=3, save_steps=10**6,
                      tensorboard=False, tokens_per_micro_batch=512, gradient_accumulation_steps=2)
    trainer = Trainer(cfg, {"profile"})
    trainer.setup()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train()
    phases, _ = mod.phases_and_busy_from_profiler(prof)
    counts: dict[str, int] = {}
    for name, _, _ in phases:
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"hai/collate": 3, "hai/forward": 6, "hai/backward": 6, "hai/loss_sync": 3, "hai/grad_clip": 3,
                      "hai/optimizer": 3, "hai/log": 3}, counts
    spans = sorted((lo, hi) for _, lo, hi in phases)
    assert all(a_hi <= b_lo for (_, a_hi), (b_lo, _) in zip(spans, spans[1:], strict=False)), "phases overlap"
    assert mod.innermost_host_ops(prof), "no host operations traced"


def _spin_in_python(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def _traced_spin_with_stack(mod):
    """Host-own-time pieces of a CPU trace (with Python frames) of a spin loop between two operators. torch's
    profiler now and then fails to decode a Python frame's name (pytorch#136040, open): traced again then."""
    for _ in range(5):
        with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof,
              torch.profiler.record_function("hai/forward")):
            a = torch.randn(64, 64)
            _spin_in_python(300_000)
            torch.mm(a, a)
        try:
            return mod.host_own_time(prof)
        except UnicodeDecodeError:
            continue
    pytest.fail("torch's profiler could not decode its own trace five times in a row")


def test_host_own_time_names_python_code_that_no_operator_covers(bench_module):
    """Python work between operators (a loop here; an offload hook or a guard on a GPU) is nobody's innermost
    operator, so `host_ops_while_idle` cannot see it. Its frame's own time (range less nested events) can: with
    the profiler's stack on, the spinning function's frame must hold the most own time, and be the first name
    charged for an idle GPU over the window."""
    mod = bench_module("kernel_breakdown")
    pieces = _traced_spin_with_stack(mod)
    own: dict[str, float] = {}
    for name, lo, hi in pieces:
        own[name] = own.get(name, 0.0) + hi - lo
    spin = [n for n in own if n.endswith("_spin_in_python")]
    assert spin, sorted(own)[:20]
    assert own[spin[0]] == max(own.values()), sorted(own.items(), key=lambda kv: -kv[1])[:5]
    lo, hi = min(p[1] for p in pieces), max(p[2] for p in pieces)
    assert mod.host_ops_in_idle(pieces, [(lo, hi)], steps=1, top=1)[0]["name"] == spin[0]
