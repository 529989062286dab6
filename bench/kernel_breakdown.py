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

On a GPU the result also holds ``idle``: how long the GPU sat idle while the host was in each phase of
the trainer's step (its ``record_function("hai/<phase>")`` ranges: collate, forward, backward, grad_clip,
loss_sync, optimizer, step_sync, log; `idle_by_phase`) and the innermost host operations that ran
meanwhile (`host_ops_while_idle`), and every host event's own time (its range less the events nested in
it: Python between operators counts too) that overlapped the GPU's idle time (`host_own_time_while_idle`;
with ``--kernel-profile-stack`` the Python frames are named). The profiler slows the host, so a host-bound
phase looks worse traced than it is; compare an arm's traced step with its untraced one (tok/s) before
reading idle time as lost.
"""

from __future__ import annotations

import bisect
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


PHASE_PREFIX = "hai/"  # the trainer's record_function ranges (hai_medqa/train/trainer.py)


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted union of [start, end) intervals.

    >>> merge_intervals([(5, 7), (0, 2), (1, 3), (7, 8)])
    [(0, 3), (5, 8)]
    """
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _covered(merged: list[tuple[float, float]], starts: list[float], lo: float, hi: float) -> float:
    """Length of [lo, hi) covered by `merged` (sorted, disjoint; `starts` its start points)."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    total = 0.0
    while i < len(merged) and merged[i][0] < hi:
        a, b = merged[i]
        total += max(0.0, min(b, hi) - max(a, lo))
        i += 1
    return total


def idle_by_phase(phases: list[tuple[str, float, float]], busy: list[tuple[float, float]], *, steps: int) -> dict:
    """How long the GPU sat idle while the host was in each phase of the step (microseconds in, ms/step out).

    `phases`: (name, start, end) host ranges (the trainer's "hai/..." ranges); `busy`: (start, end) of every
    GPU kernel and copy. The GPU runs behind the host, so idle time inside a phase is time that phase's
    host work (or its wait) cost the step. Idle outside every phase is reported as "between phases".

    >>> r = idle_by_phase([("hai/forward", 0, 10), ("hai/optimizer", 10, 20)], [(2, 12), (15, 16)], steps=1)
    >>> r["phases"]["optimizer"], round(r["gpu_idle_ms_per_step"] * 1e3, 1)
    ({'host_ms_per_step': 0.01, 'gpu_idle_ms_per_step': 0.007}, 9.0)
    """
    merged = merge_intervals(busy)
    starts = [a for a, _ in merged]
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, lo, hi in phases:
        idle = (hi - lo) - _covered(merged, starts, lo, hi)
        key = name.removeprefix(PHASE_PREFIX)
        per[key][0] += hi - lo
        per[key][1] += idle
    window = [(lo, hi) for _, lo, hi in phases]
    w_lo, w_hi = (min(a for a, _ in window), max(b for _, b in window)) if window else (0.0, 0.0)
    total_idle = (w_hi - w_lo) - _covered(merged, starts, w_lo, w_hi)
    attributed = sum(idle for _, idle in per.values())
    out = {k: {"host_ms_per_step": round(v[0] / 1e3 / steps, 3), "gpu_idle_ms_per_step": round(v[1] / 1e3 / steps, 3)}
           for k, v in sorted(per.items(), key=lambda kv: -kv[1][1])}
    return {"window_ms_per_step": (w_hi - w_lo) / 1e3 / steps, "gpu_idle_ms_per_step": total_idle / 1e3 / steps,
            "between_phases_idle_ms_per_step": (total_idle - attributed) / 1e3 / steps, "phases": out}


def idle_gaps(merged: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    """The parts of [lo, hi) that `merged` (sorted, disjoint) leaves uncovered.

    >>> idle_gaps([(1, 2), (4, 5)], 0, 6)
    [(0, 1), (2, 4), (5, 6)]
    """
    gaps, cursor = [], lo
    for a, b in merged:
        if b <= cursor or a >= hi:
            continue
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < hi:
        gaps.append((cursor, hi))
    return gaps


def host_ops_in_idle(ops: list[tuple[str, float, float]], gaps: list[tuple[float, float]], *, steps: int,
                     top: int = 12) -> list[dict]:
    """The innermost host operations running while the GPU sat idle, by overlap (ms/step), largest first.

    >>> host_ops_in_idle([("aten::item", 0, 4), ("cudaLaunchKernel", 5, 6)], [(1, 3), (5, 9)], steps=1)
    [{'name': 'aten::item', 'idle_ms_per_step': 0.002}, {'name': 'cudaLaunchKernel', 'idle_ms_per_step': 0.001}]
    """
    starts = [a for a, _ in gaps]
    per: dict[str, float] = defaultdict(float)
    for name, lo, hi in ops:
        covered = _covered(gaps, starts, lo, hi)
        if covered > 0:
            per[name] += covered
    return [{"name": n[:120], "idle_ms_per_step": round(us / 1e3 / steps, 3)}
            for n, us in sorted(per.items(), key=lambda kv: -kv[1])[:top]]


def phases_and_busy_from_profiler(prof) -> tuple[list[tuple[str, float, float]], list[tuple[float, float]]]:
    """The trainer's host phase ranges and the GPU's busy intervals (kernels, copies) of a finished trace."""
    from torch.autograd import DeviceType

    phases, busy = [], []
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name.startswith(PHASE_PREFIX):
            phases.append((e.name, e.time_range.start, e.time_range.end))
        elif e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            busy.append((e.time_range.start, e.time_range.end))
    return phases, busy


def innermost_host_ops(prof) -> list[tuple[str, float, float]]:
    """(name, start, end) of every host event with no host event nested inside it: where the host really was."""
    from torch.autograd import DeviceType

    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == DeviceType.CPU and not e.cpu_children and not e.name.startswith(PHASE_PREFIX)]


def own_time_pieces(events: list[tuple[str, float, float, list[tuple[float, float]]]]) -> list[tuple[str, float, float]]:
    """(name, start, end) pieces of each host event's own time: its range less its children's ranges.

    `events`: (name, start, end, [(child start, child end), ...]). A phase's or a Python frame's own time is
    host work no operator inside it accounts for (Python between operators; with the profiler's
    ``with_stack`` the Python frames are events of their own), which `innermost_host_ops` never sees.

    >>> own_time_pieces([("hai/forward", 0, 10, [(2, 4), (3, 6)]), ("aten::mm", 2, 6, [])])
    [('hai/forward', 0, 2), ('hai/forward', 6, 10), ('aten::mm', 2, 6)]
    """
    pieces = []
    for name, lo, hi, children in events:
        pieces += [(name, a, b) for a, b in idle_gaps(merge_intervals(children), lo, hi)]
    return pieces


def host_own_time(prof) -> list[tuple[str, float, float]]:
    """`own_time_pieces` of every host event of a finished trace (phases, operators, Python frames) on the
    threads that ran a torch operator (the trainer's and autograd's): a thread only waiting (a progress bar's
    monitor) would otherwise be charged its whole sleep. Threads run at once (the backward's main thread waits
    while autograd's works), so charged to idle time these pieces can add up to more than the idle time."""
    from torch.autograd import DeviceType

    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    working = {e.thread for e in events if e.name.startswith(("aten::", PHASE_PREFIX))}
    return own_time_pieces([(e.name, e.time_range.start, e.time_range.end,
                             [(c.time_range.start, c.time_range.end) for c in e.cpu_children])
                            for e in events if e.thread in working])


class StepProfiler:
    """Trace the optimizer steps after `start_after_step` for `steps` steps; `.result` holds the breakdown.

    Called from the Trainer's step callback (which runs after each step): `on_step(step)`.
    """

    def __init__(self, start_after_step: int, steps: int, *, cuda: bool, with_stack: bool = False):
        self.start_after, self.steps, self.cuda, self.with_stack = start_after_step, steps, cuda, with_stack
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
            # with_stack: Python frames become host events, so `host_own_time_while_idle` names the Python code
            # the GPU waited for (at a large host cost: read those steps' idle for where, not how much)
            self.prof = torch.profiler.profile(activities=acts, with_stack=self.with_stack)
            self.prof.start()
        elif self.prof is not None and step == self.start_after + self.steps:
            if self.cuda:
                torch.cuda.synchronize()
            self.prof.stop()
            try:
                durations = durations_from_profiler(self.prof, cuda=self.cuda)
            except UnicodeDecodeError as e:  # with_stack: torch cannot always decode a frame name (pytorch#136040)
                self.result, self.prof = {"steps": self.steps, "error": f"torch.profiler: {e}"}, None
                return
            self.result = breakdown(durations, steps=self.steps)
            if self.cuda:  # where the GPU waited for the host, by the trainer's phases
                try:
                    self.result["idle"] = self._idle()
                except Exception as e:  # an analysis bug must not cost the arm's measured figures
                    self.result["idle"] = {"error": f"{type(e).__name__}: {e}"}
            self.prof = None

    def _idle(self) -> dict:
        phases, busy = phases_and_busy_from_profiler(self.prof)
        busy = merge_intervals(busy)  # once, for both uses below
        idle = idle_by_phase(phases, busy, steps=self.steps)
        if phases:
            lo, hi = min(p[1] for p in phases), max(p[2] for p in phases)
            gaps = idle_gaps(busy, lo, hi)
            idle["host_ops_while_idle"] = host_ops_in_idle(innermost_host_ops(self.prof), gaps, steps=self.steps)
            idle["host_own_time_while_idle"] = host_ops_in_idle(host_own_time(self.prof), gaps, steps=self.steps,
                                                                top=25)
            idle["with_stack"] = self.with_stack
        return idle


def format_breakdown(b: dict, *, width: int = 4) -> str:
    """One line per family: '  matmul 71.8% (402.1 ms/step)'; then the GPU's idle time by host phase."""
    pad = " " * width
    lines = [f"{pad}{f:<22} {v['share']:6.1%} ({v['ms_per_step']:.1f} ms/step)" for f, v in b["families"].items()]
    if b.get("idle") and "error" not in b["idle"]:
        idle = b["idle"]
        lines.append(f"{pad}GPU idle {idle['gpu_idle_ms_per_step']:.1f} of {idle['window_ms_per_step']:.1f} ms/step; "
                     "by host phase: " + ", ".join(f"{k} {v['gpu_idle_ms_per_step']:.1f} (host {v['host_ms_per_step']:.1f})"
                                                   for k, v in idle["phases"].items())
                     + f", between phases {idle['between_phases_idle_ms_per_step']:.1f}")
        if idle.get("host_ops_while_idle"):
            lines.append(f"{pad}host busy with, while the GPU idled: " + ", ".join(
                f"{o['name'][:60]} {o['idle_ms_per_step']:.1f}" for o in idle["host_ops_while_idle"][:6]))
        if idle.get("host_own_time_while_idle"):
            lines.append(f"{pad}host events' own time while the GPU idled: " + ", ".join(
                f"{o['name'][:70]} {o['idle_ms_per_step']:.1f}" for o in idle["host_own_time_while_idle"][:8]))
    return "\n".join(lines)
