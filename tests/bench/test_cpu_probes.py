"""bench/cpu_probes.py lora-copy: the command behind docs/performance.md's claim that inductor keeps the fused
LoRA forward's copy of the base output and that lora_kernel fused_nf4 removes it."""

from __future__ import annotations


def test_compiled_fused_lora_copies_the_base_output_and_the_in_place_kernel_does_not(bench_module):
    result = bench_module("cpu_probes").lora_copy()
    assert result["fused_addmm_calls"] == 3 and result["fused_nf4_lora_linear_calls"] == 0  # one per projection
    assert result["fused_nf4_addmm_calls"] == 0 and result["fused_nf4_nf4_lora_linear_calls"] == 3
