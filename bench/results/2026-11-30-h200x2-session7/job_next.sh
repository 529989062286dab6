#!/bin/bash
# PREPARED, NOT RUN: the next nvidia-h200-x2 job (issue 17), ~21 device minutes. Launch as job9.sh (its header), with this
# file's name, and poll with poll9.sh. Most important first: results come back at every poll.
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
nvidia-smi topo -m > $R/topo.txt 2>&1
# 1. The peers again, with the two levers added after job9 (09532ed: no model.train() walk per step; 78d3704: flex
#    attention's mask built on the host during the backward) and the idle analysis; TRL's checkpointing arm's spread
#    (8,479 in job9 against 9,086-9,108 before). fast:dequantize_cache=true: 19 ms/step of NF4 dequantisation gone for
#    +13 GiB; slower in job8 (12,382) only through idle time the one-tensor optimizer step has since removed?
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8;fast:dequantize_cache=true" --peers trl:flex,unsloth \
   --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 3 --workdir /tmp/hb --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
# 2. Why DDP scales 1.84x (fast) / 1.63x (lean) since the layers compile and lean offloads: each turned off in turn, the
#    transport NCCL picks logged, the kernel and idle breakdown of the two-process arms (communication is its own family).
NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT python3 bench/train_throughput.py --shape 7.8b --num-processes 2 --warmup 3 --steps 8 --kernel-profile 2 \
   --variants "fast;lean;lean:offload_activations=false;fast:compile_layers=false" \
   --workdir /tmp/hb --out $R/tt78_ddp_diag.json > $R/tt78_ddp_diag.log 2>&1; mark ddp_diag rc=$?
# 3. lean's evaluation-inclusive peak with compiled layers and offloading (target <= 14 GB), beside the NF4 plain parity
#    reference at a constant learning rate (the bench's arms train at one since d0ab929), for the FP8 offset of job9.
mkdir -p /tmp/hbe /tmp/hbp && for w in /tmp/hbe /tmp/hbp; do ln -sfn /tmp/hb/exaone-7.8b $w/exaone-7.8b; cp -r /tmp/hb/tokenizer $w/; done
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --gpus 1 --variants "lean:sample_max_new_tokens=8" \
   --val-records 400 --eval-steps 2 --steps 10 --warmup 3 --workdir /tmp/hbe --out $R/tt78_lean_eval.json > $R/tt78_lean_eval.log 2>&1 &
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --lr 2e-4 --gpus 0 \
   --variants "plain:lora_dropout=0,tokens_per_micro_batch=2048" --workdir /tmp/hbp --out $R/tt78_parity_nf4.json > $R/tt78_parity_nf4.log 2>&1
wait; mark eval_and_parity done
mark DONE
