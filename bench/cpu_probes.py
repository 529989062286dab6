"""CPU measurements quoted in docs/performance.md (issue 17), each one command.

    python bench/cpu_probes.py fp8-error    # relative error of an e4m3 row-wise product against bf16's
    python bench/cpu_probes.py train-walk   # host time of model.train() on a 32-layer LoRA model
    python bench/cpu_probes.py lora-copy    # does inductor's code for a compiled NF4 LoRA MLP copy the base output?

fp8-error: a 2,048 x 4,096 x 4,096 product of Gaussian data (weights N(0, 0.02)) with both operands quantised
as the FP8 base quantises them (`fp8_base._quantize_rows_eager`: e4m3, one scale per row), and the same
product in bf16, each against float32.
train-walk: what `Trainer.train_step` used to spend on every step: `model.train()` over a PEFT model with
the 7.8B's module tree (32 Llama layers, LoRA on the seven projections; tiny widths, since the walk's cost
is per module, not per parameter).
lora-copy: the first MLP of the tiny NF4 EXAONE stand-in, LoRA on its three projections, compiled by inductor
with each LoRA kernel; counts the `extern_kernels.addmm` calls (each copies a base output into a new buffer
first) and the `nf4_lora_linear` calls in the generated forward code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fp8_error() -> dict:
    from hai_medqa.train.fp8_base import _quantize_rows_eager

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 4096, generator=g)
    w = torch.randn(4096, 4096, generator=g) * 0.02
    ref = x @ w.t()
    xq, sx = _quantize_rows_eager(x)
    wq, sw = _quantize_rows_eager(w)
    fp8 = (xq.float() * sx) @ (wq.float() * sw).t()
    bf16 = (x.bfloat16() @ w.bfloat16().t()).float()

    def rel(y: torch.Tensor) -> float:
        return ((y - ref).norm() / ref.norm()).item()

    return {"fp8_rowwise_relative_error": rel(fp8), "bf16_relative_error": rel(bf16)}


def train_walk(repeats: int = 20) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from hai_medqa.model.exaone_layout import LLAMA_PROJECTIONS

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=256)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=list(LLAMA_PROJECTIONS)))
    for _ in range(3):
        model.train()
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.train()
    return {"modules": sum(1 for _ in model.modules()), "train_ms": (time.perf_counter() - t0) / repeats * 1e3}


def lora_copy() -> dict:
    import tempfile

    from peft import LoraConfig, get_peft_model
    from torch._inductor.utils import run_and_get_code

    from hai_medqa.fixtures.tiny_model import build_tiny_exaone
    from hai_medqa.model.convert import ensure_llama_checkpoint
    from hai_medqa.model.load import load_causal_lm
    from hai_medqa.train.fast_lora import fuse_lora_forward

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        llama = ensure_llama_checkpoint(build_tiny_exaone(Path(tmp) / "model", seed=0), cache_dir=Path(tmp) / "cache")
        for kernel in ("fused", "fused_nf4"):
            model = load_causal_lm(llama, quantize_4bit=True, dtype=torch.float32, device_map="cpu")
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                     target_modules=["gate_proj", "up_proj", "down_proj"]))
            model.train()
            fuse_lora_forward(model, nf4_in_place=kernel == "fused_nf4")
            mlp = torch.compile(model.base_model.model.model.layers[0].mlp, backend="inductor")
            x = torch.randn(2, 24, model.config.hidden_size, requires_grad=True)
            _, codes = run_and_get_code(lambda mlp=mlp, x=x: mlp(x).sum().backward())
            torch._dynamo.reset()
            forward = codes[0]
            out[f"{kernel}_addmm_calls"] = forward.count("extern_kernels.addmm(")
            out[f"{kernel}_nf4_lora_linear_calls"] = forward.count("torch.ops.hai_medqa.nf4_lora_linear.default(")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", choices=["fp8-error", "train-walk", "lora-copy"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"fp8-error": fp8_error, "train-walk": train_walk, "lora-copy": lora_copy}[args.probe]()
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
