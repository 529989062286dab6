#!/bin/bash
# Session-7 diagnostic GPU job (nvidia-h200-x2), issue 17, ~8 device minutes: where the compiled profiles' GPU
# idles (by host phase), and candidate levers, each arm alone on one GPU. Run from a copy, as job7.sh:
#   rm -rf /dev/shm/snap /dev/shm/res; mkdir -p /dev/shm/snap && cp -r .gpu_snapshot /dev/shm/snap/tree \
#     && cp -r .gpu_kit/carry /dev/shm/snap/carry && (setsid nohup bash /dev/shm/snap/tree/bench/results/2026-11-30-h200x2-session7/job8.sh \
#     > /dev/shm/job.out 2>&1 < /dev/null &); sleep 5; bash bench/results/2026-11-30-h200x2-session7/poll8.sh 520
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. The compiled profiles as they are, with the GPU's idle time by host phase, and two exact levers.
python3 bench/train_throughput.py --shape 7.8b --gpus 0,1 --warmup 3 --steps 6 --kernel-profile 3 --workdir /tmp/hb \
   --variants "fast;lean;fast:base_precision=fp8;fast:dequantize_cache=true;fast:optimizer=adamw_torch" \
   --out $R/tt78_idle.json > $R/tt78_idle.log 2>&1; mark idle rc=$?
# 2. CUDA graphs over the compiled layers (GPU 0) beside lean's evaluation-inclusive peak with compiled layers (GPU 1).
HAI_MEDQA_COMPILE_MODE=reduce-overhead python3 bench/train_throughput.py --shape 7.8b --gpus 0 --warmup 4 --steps 6 \
   --variants "fast;lean" --workdir /tmp/hb --out $R/tt78_cudagraphs.json > $R/tt78_cudagraphs.log 2>&1 &
mkdir -p /tmp/hbe && ln -sfn /tmp/hb/exaone-7.8b /tmp/hbe/exaone-7.8b && cp -r /tmp/hb/tokenizer /tmp/hbe/  # same checkpoint
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --gpus 1 --variants lean --val-records 400 --eval-steps 2 --steps 10 --warmup 3 \
   --workdir /tmp/hbe --out $R/tt78_lean_eval.json > $R/tt78_lean_eval.log 2>&1; mark lean_eval rc=$?
wait; mark cudagraphs done
mark DONE
