"""Where a training step's GPU time goes, by kernel family (issue 17, deliverable 2).

`bench/train_throughput.py --kernel-profile N` traces N optimizer steps of each project arm with
torch.profiler *after* its timed steps (so the profiler's overhead never enters the tok/s figure) and
stores the result of `breakdown()` in the arm's JSON. The profiler inflates absolute times; the shares
are what to read.

    >>> family("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN")
    'matmul'
    >>> family("triton_tem_fused_flex_attention_backward_0")
    'attention'
    >>> family("_rms_norm_backward_kernel")
    'liger'

On a machine without CUDA (the tests) the same table is built from the CPU operators' own time
(``aten::mm`` -> matmul, ...), so the mechanics are checked there.
"""

from __future__ import annotations

import re
from collections import defaultdict

# First match wins: the order matters (an inductor kernel named after a GEMM template is still a GEMM).
FAMILIES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
    ("communication", r"nccl|allreduce|all_reduce|allgather|all_gather|reduce_scatter|reducescatter|broadcast"),
    ("attention", r"flex_attention|flash|fmha|attention|sdpa|triton_tem_fused_(flex|.*attn)"),
    # inductor's fused point-wise/reduction kernels (FP8's activation scaling too, though named after _scaled_mm)
    ("compiled (inductor)", r"^triton_(poi|red|per)_"),
    ("matmul", r"nvjet|gemm|cutlass|xmma|sm90_|sm80_|cublas|ampere_|hopper_|_scaled_mm|\bmm\b|addmm|bmm|"
               r"matmul|linear|triton_tem_fused_(mm|addmm|bmm)"),
    ("attention", r"^triton_tem_fused"),  # flex attention's compiled templates (GEMM templates matched above)
    ("nf4 dequantisation", r"kdequantize|dequantize|dequant"),
    ("optimizer", r"koptimizer|optimizer|adam|kpreconditionoptimizer|percentile_clipping"),
    ("liger", r"liger|_rms_norm_|_swiglu_|_geglu_|_triton_rope|rope_|cross_entropy|element_mul_kernel|"
              r"fused_linear"),
    ("copies and fills", r"memcpy|memset|copy|fill|\bcat\b|cat_|catarray|index|gather|scatter|zero_|clone|contiguous|to_copy"),
    ("element-wise", r"elementwise|vectorized|unrolled|reduce_kernel|add|mul|silu|sigmoid|neg|pow|rsqrt|mean|sum|"
                     r"where|clamp|exp|sqrt|div|sub|softmax"),
))


def family(kernel_name: str) -> str:
    """The family a kernel (CUDA) or operator (CPU) name belongs to; 'other' when no pattern matches.

    >>> family("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>")
    'element-wise'
    >>> family("aten::addmm")
    'matmul'
    """
    name = kernel_name.removeprefix("aten::")
    for fam, pattern in FAMILIES:
        if pattern.search(name):
            return fam
    return "other"


def breakdown(durations_us: dict[str, float], *, steps: int, top: int = 15) -> dict:
    """Total time per family and the largest kernels, from {kernel name: summed microseconds}.

    >>> b = breakdown({"nvjet_a": 700.0, "nvjet_b": 100.0, "kDequantizeBlockwise": 200.0}, steps=2)
    >>> b["families"]["matmul"]["share"], b["families"]["nf4 dequantisation"]["ms_per_step"]
    (0.8, 0.1)
    """
    total = sum(durations_us.values())
    fams: dict[str, float] = defaultdict(float)
    for name, us in durations_us.items():
        fams[family(name)] += us
    order = sorted(fams, key=lambda f: -fams[f])
    biggest = sorted(durations_us.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": steps, "total_ms_per_step": total / 1e3 / steps,
        "families": {f: {"ms_per_step": fams[f] / 1e3 / steps, "share": fams[f] / total if total else 0.0}
                     for f in order},
        "top_kernels": [{"name": n[:160], "family": family(n), "ms_per_step": us / 1e3 / steps,
                         "share": us / total if total else 0.0} for n, us in biggest],
    }


def durations_from_profiler(prof, *, cuda: bool) -> dict[str, float]:
    """{name: microseconds} from a finished torch.profiler.profile: the GPU kernels (and memcpy/memset) on
    CUDA; on a CPU-only machine the operators' self CPU time (nested operators are not counted twice)."""
    from torch.autograd import DeviceType

    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):
            continue  # record_function ranges (e.g. "Optimizer.step#...") span kernels counted on their own
        if cuda and e.device_type == DeviceType.CUDA:
            out[e.name] += e.device_time_total
        elif not cuda and e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            out[e.name] += e.self_cpu_time_total
    return dict(out)


class StepProfiler:
    """Trace the optimizer steps after `start_after_step` for `steps` steps; `.result` holds the breakdown.

    Called from the Trainer's step callback (which runs after each step): `on_step(step)`.
    """

    def __init__(self, start_after_step: int, steps: int, *, cuda: bool):
        self.start_after, self.steps, self.cuda = start_after_step, steps, cuda
        self.prof = None
        self.result: dict | None = None

    def on_step(self, step: int) -> None:
        import torch

        if self.steps <= 0:
            return
        if step == self.start_after:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
        elif self.prof is not None and step == self.start_after + self.steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.stop()
            self.result = breakdown(durations_from_profiler(self.prof, cuda=self.cuda), steps=self.steps)
            self.prof = None


def format_breakdown(b: dict, *, width: int = 4) -> str:
    """One line per family: '  matmul 71.8% (402.1 ms/step)'."""
    pad = " " * width
    return "\n".join(f"{pad}{f:<22} {v['share']:6.1%} ({v['ms_per_step']:.1f} ms/step)"
                     for f, v in b["families"].items())
