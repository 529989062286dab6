#!/bin/bash
# PREPARED, NOT RUN: the next nvidia-h200-x2 session's job (issue 17), ~18 device minutes. Launch as job7.sh
# (its header), with this file's name, and poll with poll7.sh.
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. "No regression on two GPUs": DDP with the profiles as they are now (compiled layers in fast and lean, offloading in
#    lean), against one GPU in the same invocation (target: scaling >= 1.9x for both).
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 8 \
   --workdir /tmp/hb --out $R/tt78_ddp.json > $R/tt78_ddp.log 2>&1; mark ddp rc=$?
# 2. Where the compiled profiles' time goes now (idle GPU time was 16%/25% of the eager ones' wall), and CUDA graphs
#    over the compiled layers (torch.compile mode reduce-overhead) as the lever for it: fast, lean and FP8.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8" --gpus 0,1 --warmup 3 --steps 10 \
   --kernel-profile 3 --workdir /tmp/hb --out $R/tt78_breakdown.json > $R/tt78_breakdown.log 2>&1; mark breakdown rc=$?
HAI_MEDQA_COMPILE_MODE=reduce-overhead python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8" \
   --gpus 0,1 --warmup 4 --steps 10 --workdir /tmp/hb --out $R/tt78_cudagraphs.json > $R/tt78_cudagraphs.log 2>&1; mark cudagraphs rc=$?
# 3. If a CUDA-graph arm wins and keeps its loss: the peers again in one invocation with it (trl:flex, unsloth), by hand.
mark DONE
