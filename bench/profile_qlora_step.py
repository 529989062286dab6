"""Where does a QLoRA step's time go on the GPU? A profiling probe on stock pieces.

Builds (once) a random bf16 LlamaForCausalLM with the EXAONE-3.5-7.8B shape, loads it in NF4 + double quant,
adds LoRA r=16 on all seven projections and times packed fixed-length micro-steps under several variants:
gradient checkpointing on/off, Liger kernels on/off, and a "dequantised-weight cache" (each NF4 weight
dequantised once to bf16 and kept, since the frozen base never changes - numerically the same forward).
One variant is traced with torch.profiler and the top CUDA kernels are printed.

This probe guided the design of the fast path; the benchmark that checks the targets is
bench/train_throughput.py. Usage on a GPU box:
    VARIANTS=gc,nogc,nogc_cache TOK=8192 python bench/profile_qlora_step.py
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from hai_medqa.model.exaone_layout import LLAMA_PROJECTIONS

OUT = os.environ.get("OUT", "/tmp")
TOK = int(os.environ.get("TOK", "8192"))
STEPS = int(os.environ.get("STEPS", "8"))
PATH = os.environ.get("CKPT", "/tmp/llama78_shape")


def build_checkpoint():
    from transformers import LlamaConfig, LlamaForCausalLM

    if os.path.exists(PATH + "/config.json"):
        return
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=102400, max_position_embeddings=32768,
                      rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(PATH, max_shard_size="4GB")
    del m
    torch.cuda.empty_cache()


def cache_dequantized(model):
    """Replace every bnb Linear4bit's forward weight by its bf16 dequantisation, computed once."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(torch.bfloat16)
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False, device=w.device, dtype=w.dtype)
            lin.weight = torch.nn.Parameter(w, requires_grad=False)
            mod.forward = lin.forward  # keep the module (and its LoRA wrapper) in place
            mod._dequant_cache = lin
            n += 1
    return n


def run(variant: str):
    global TOK
    if "@" in variant:  # e.g. nogc_cache@6144: a per-variant token budget
        variant, tok = variant.split("@")
        TOK = int(tok)
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    gc = "nogc" not in variant
    liger = "noliger" not in variant
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
    attn = os.environ.get("ATTN", "flex_attention")
    model = LlamaForCausalLM.from_pretrained(PATH, quantization_config=bnb_cfg, device_map={"": 0},
                                             dtype=torch.bfloat16, attn_implementation=attn)
    res = {"variant": variant, "tok": TOK, "attn": attn, "mem_after_load_gb": torch.cuda.memory_allocated() / 2**30}
    if "cache" in variant:
        res["cached_linears"] = cache_dequantized(model)
    model.enable_input_require_grads()
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                              target_modules=list(LLAMA_PROJECTIONS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    lens = torch.exp(torch.randn(20000, generator=g) * 0.5 + math.log(330)).clamp(64, 2048).long().tolist()
    it = iter(lens)

    def batch():
        ls, tot = [], 0
        while True:
            n = next(it)
            if tot + n > TOK:
                break
            ls.append(n)
            tot += n
        real = tot
        if tot < TOK:
            ls.append(TOK - tot)
            tot = TOK
        ids = torch.randint(0, 102400, (1, tot))
        pos = torch.cat([torch.arange(n) for n in ls]).unsqueeze(0)
        lab = ids.clone()
        lab[0, real:] = -100
        return real, dict(input_ids=ids.cuda(), labels=lab.cuda(), position_ids=pos.cuda(), use_cache=False)

    def step(b):
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(2):
            step(batch()[1])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t, n = time.time(), 0
        for _ in range(STEPS):
            k, b = batch()
            step(b)
            n += k
        torch.cuda.synchronize()
        dt = time.time() - t
        res.update(real_tok_s=round(n / dt), s_per_step=round(dt / STEPS, 3),
                   peak_alloc_gb=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                   peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 1))
        if os.environ.get("PROFILE") == variant:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step(batch()[1])
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
            print(table)
            with open(os.path.join(OUT, f"profile_{variant}.txt"), "w") as f:
                f.write(table)
    except Exception as e:  # noqa: BLE001 - a probe records failures instead of stopping
        res["error"] = repr(e)[:300]
    print("RESULT", json.dumps(res), flush=True)
    with open(os.path.join(OUT, "profile_probe.jsonl"), "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    import subprocess
    import sys

    if len(sys.argv) > 1:  # child: one variant per process so patches and memory do not leak
        run(sys.argv[1])
    else:
        build_checkpoint()
        for v in os.environ.get("VARIANTS", "gc,nogc,nogc_cache").split(","):
            subprocess.run([sys.executable, __file__, v], check=False)
