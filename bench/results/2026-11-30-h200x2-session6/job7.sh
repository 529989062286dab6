#!/bin/bash
# Session-6 GPU job (nvidia-h200-x2), issues 17 and 18, ~22 device minutes. Run from a copy, as job5.sh:
#   rm -rf /dev/shm/snap /dev/shm/res; mkdir -p /dev/shm/snap && cp -r .gpu_snapshot /dev/shm/snap/tree \
#     && cp -r .gpu_kit/carry /dev/shm/snap/carry && (setsid nohup bash /dev/shm/snap/tree/bench/results/2026-11-30-h200x2-session6/job7.sh \
#     > /dev/shm/job.out 2>&1 < /dev/null &); sleep 5; bash bench/results/2026-11-30-h200x2-session6/poll7.sh 520
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. Issue 18: FSDP-QLoRA 32B, lean (offloading on, as on any GPU now), with the embedding as its own unit and the
#    cache emptied after sharding (eb1f262). One-GPU references: session 5's tt32_single.json (single-GPU path unchanged).
python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean" --num-processes 2 --no-single-reference \
   --accelerate-config configs/accelerate/fsdp_qlora.yaml --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_fsdp.json > $R/tt32_fsdp.log 2>&1; mark tt32_fsdp rc=$?
rm -rf /dev/shm/hb32
# 2. Issue 17: 200-step loss parity against plain with its dropout off, at the project's learning rate (2e-4), 2,048 tokens/step:
#    exact modes (fast, compiled layers in fast and lean: <= 1%) and FP8 + compiled layers (<= 2%).
python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --lr 2e-4 --gpus 0,1 \
   --variants "plain:lora_dropout=0,tokens_per_micro_batch=2048;fast:tokens_per_micro_batch=2048;fast:compile_layers=true,tokens_per_micro_batch=2048;lean:compile_layers=true,tokens_per_micro_batch=2048;fast:base_precision=fp8,compile_layers=true,tokens_per_micro_batch=2048" \
   --workdir /tmp/hb --out $R/tt78_parity.json > $R/tt78_parity.log 2>&1; mark parity rc=$?
# 3. Issue 17: compiled layers in fast and lean against TRL (flex + Liger + padding-free) and Unsloth, same invocation.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;fast:compile_layers=true;lean:compile_layers=true;fast:base_precision=fp8,compile_layers=true" \
   --peers trl:flex,unsloth --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --workdir /tmp/hb --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
# 4. Issue 18 item 3 at 7.8B under FSDP: SIGTERM during the step-30 evaluation, resume on 2 and on 1 GPU.
python3 bench/multi_gpu_e2e.py --launcher fsdp --shape 7.8b --profile lean --steps 60 --kill-at 30 --eval-steps 30 --save-steps 30 \
   --accumulation 1 --skip-merge --set sample_max_new_tokens=48 --workdir /dev/shm/hbe --out $R/e2e78_fsdp.json > $R/e2e78_fsdp.log 2>&1; mark e2e78_fsdp rc=$?
mark DONE
