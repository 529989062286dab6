#!/bin/bash
# SUPERSEDED: run, changed, as ../2026-11-30-h200x2-session6/job7.sh (the 32B reference dropped, the parity at lr 2e-4 and 2,048 tokens).
# PREPARED, NOT RUN: the next nvidia-h200-x2 session's job (issues 17 and 18), ~25 device minutes in all.
# Start it from a copy, as job5.sh did (a later call re-sends the tree and would pull the cwd away):
#   rm -rf /dev/shm/snap /dev/shm/res; mkdir -p /dev/shm/snap && cp -r .gpu_snapshot /dev/shm/snap/tree \
#     && cp -r .gpu_kit/carry /dev/shm/snap/carry && (setsid nohup bash /dev/shm/snap/tree/bench/results/2026-11-30-h200x2-session5/job_next.sh \
#     > /dev/shm/job.out 2>&1 < /dev/null &); sleep 5; bash /dev/shm/snap/carry/poll.sh 530
# (carry .gpu_snapshot = `git archive HEAD` and .gpu_kit/carry with poll.sh; tar the results, see poll in job5's notes:
#  more than ~10 files in $OUT are refused, so pack /dev/shm/res into one .tar.xz.)
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. Issue 18 target: FSDP 32B with the embedding as its own unit (eb1f262) and lean's offloading, against one GPU's lean with inputs kept.
CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean:offload_activations=false" \
   --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_ref.json > $R/tt32_ref.log 2>&1; mark tt32_ref rc=$?
python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean" --num-processes 2 --no-single-reference \
   --accelerate-config configs/accelerate/fsdp_qlora.yaml --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_fsdp.json > $R/tt32_fsdp.log 2>&1; mark tt32_fsdp rc=$?
rm -rf /dev/shm/hb32
# 2. Issue 18 item 3 at 7.8B under FSDP (only the tiny model has run end to end under FSDP): kill during evaluation, resume on 2 and 1 GPU.
python3 bench/multi_gpu_e2e.py --launcher fsdp --shape 7.8b --steps 200 --kill-at 100 --eval-steps 100 --save-steps 100 \
   --accumulation 1 --set sample_max_new_tokens=48 --workdir /tmp/hb_e2e --out $R/e2e78_fsdp.json > $R/e2e78_fsdp.log 2>&1; mark e2e78_fsdp rc=$?
# 3. Issue 17 items 3-4: loss parity against plain with plain's dropout off (the same training), 8,192 tokens per step:
#    FP8 (target mean <= 2%), fast and compiled layers (exact modes: <= 1%, the condition for putting compile_layers in fast).
#    GPU 0 runs plain (~8.5 min), GPU 1 the other three one after another.
python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --gpus 0,1 \
   --variants "plain:lora_dropout=0;fast;fast:base_precision=fp8;fast:compile_layers=true" --workdir /tmp/hb \
   --out $R/tt78_parity.json > $R/tt78_parity.log 2>&1; mark parity rc=$?
mark DONE
