#!/bin/bash
# Session-8 first GPU job (nvidia-h200-x2), issue 17, ~13 device minutes: the diagnoses before the final peers run.
# Run from a copy in /dev/shm (as session 7's job9.sh):
#   rm -rf /dev/shm/snap /dev/shm/res; mkdir -p /dev/shm/snap && cp -r .gpu_snapshot /dev/shm/snap/tree \
#     && cp -r .gpu_kit/carry /dev/shm/snap/carry && (setsid nohup bash /dev/shm/snap/tree/bench/results/2026-11-30-h200x2-session8/job10.sh \
#     > /dev/shm/job.out 2>&1 < /dev/null &); sleep 5; bash bench/results/2026-11-30-h200x2-session7/poll9.sh 520
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
nvidia-smi topo -m > $R/topo.txt 2>&1; nproc >> $R/topo.txt; numactl -H >> $R/topo.txt 2>&1
# 1. Which host code the GPU waits for: lean's forward idled 103 ms/step in job9 (32 in job8, before the flat
#    optimizer and the collate-ahead); fast's 13.6. Python frames named (--kernel-profile-stack), one traced step each.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --gpus 0,1 --warmup 3 --steps 4 --kernel-profile 1 \
   --kernel-profile-stack --workdir /tmp/hb --out $R/tt78_stack.json > $R/tt78_stack.log 2>&1; mark stack rc=$?
# 2. lean's evaluation-inclusive peak with compiled layers and offloading (target <= 14 GB), beside the NF4 plain parity
#    reference at a constant learning rate (job9's FP8 and bf16-base parity arms trained at one).
mkdir -p /tmp/hbe /tmp/hbp && for w in /tmp/hbe /tmp/hbp; do ln -sfn /tmp/hb/exaone-7.8b $w/exaone-7.8b; cp -r /tmp/hb/tokenizer $w/; done
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --gpus 1 --variants "lean:sample_max_new_tokens=8" \
   --val-records 400 --eval-steps 2 --steps 6 --warmup 2 --workdir /tmp/hbe --out $R/tt78_lean_eval.json > $R/tt78_lean_eval.log 2>&1 &
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --lr 2e-4 --gpus 0 \
   --variants "plain:lora_dropout=0,tokens_per_micro_batch=2048" --workdir /tmp/hbp --out $R/tt78_parity_nf4.json > $R/tt78_parity_nf4.log 2>&1
wait; mark eval_and_parity done
# 3. Why DDP scales 1.84x (fast) / 1.63x (lean): offloading off in turn, NCCL's transport logged, the kernel and idle
#    breakdown of each arm on 1 and 2 processes (communication is a family of its own).
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT python3 bench/train_throughput.py --shape 7.8b --num-processes 2 --warmup 3 --steps 6 --kernel-profile 2 \
   --variants "fast;lean;lean:offload_activations=false" \
   --workdir /tmp/hb --out $R/tt78_ddp_diag.json > $R/tt78_ddp_diag.log 2>&1; mark ddp_diag rc=$?
mark DONE
