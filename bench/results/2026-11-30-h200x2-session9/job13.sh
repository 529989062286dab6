#!/bin/bash
# Session-9 second GPU job (nvidia-h200-x2), issue 17, ~6 device minutes, run in the foreground from the repository
# root by the device tool (carry: .gpu_kit/carry; results under $OUT):  bash bench/results/2026-11-30-h200x2-session9/job13.sh
# The profiles with lora_kernel fused_nf4 as their GPU default (831d4a0) on one GPU and under DDP on two, in one
# invocation: the new default's speed, its loss beside session 8's fused runs, and DDP scaling with it.
set -u
python3 bench/peer_wheels.py unpack --from .gpu_kit/carry --to /tmp/kit > $OUT/unpack.log 2>&1 || exit 1
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 8 \
   --workdir /tmp/hb --out $OUT/tt78_ddp_nf4.json > $OUT/tt78_ddp_nf4.log 2>&1; echo "ddp rc=$?"
tr '\r' '\n' < $OUT/tt78_ddp_nf4.log | grep -E "Error|Traceback|tok/s per GPU|^[a-z].* [0-9,]+ +[0-9.na]+ " | cut -c1-300 | tail -12
