#!/bin/bash
# Session 9's first GPU job (nvidia-h200-x2), prepared in session 8, run at code c740d03 on 2026-11-30 from 18:10 UTC.
# Results: job_next/. Stage 1 finished; the machine was released during stage 2 (a lost poll), which had finished our
# six arms and TRL's two but not Unsloth's: its partial.jsonl is the record. Launch as session 8's job10.sh (its header).
source /dev/shm/snap/tree/bench/gpu_job_preamble.sh
# 1. DDP >= 1.9x with the heap frozen (b887a31), one-GPU references in the same invocation, 12 timed steps: every rank's
#    step walls and garbage collections (per_rank_step_walls_s, per_rank_gc) say which rank stalled and whether the
#    collector did it. Session 8: 1.77-1.83x (fast) and 1.56-1.93x (lean) with the same code, before the freeze.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 12 \
   --workdir /tmp/hb --out $R/tt78_ddp.json > $R/tt78_ddp.log 2>&1; mark ddp rc=$?
# 2. The peers again (the ratios move by several per cent between invocations: lean 1.17x in job 11, 1.22x in job 9), with
#    lora_kernel=fused_nf4 (the LoRA term added into bitsandbytes' NF4 output in place: no 21 GiB output copy per forward,
#    the 10.5 ms of device-to-device copies in fast's step, 20.8 in lean's; 1.25x needs ~10 ms) and
#    fast:dequantize_cache=true (NF4 dequantisation: 19 ms of fast's 482 ms of kernel time).
python3 bench/train_throughput.py --shape 7.8b \
   --variants "fast;lean;fast:lora_kernel=fused_nf4;lean:lora_kernel=fused_nf4;fast:base_precision=fp8;fast:dequantize_cache=true" \
   --peers trl:flex,unsloth --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 3 --workdir /tmp/hb \
   --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
mark DONE
