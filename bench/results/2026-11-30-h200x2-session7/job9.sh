#!/bin/bash
# Session-7 final GPU job (nvidia-h200-x2), issue 17, ~15 device minutes, after the diagnostic job8.sh showed where the
# compiled profiles' GPU idles. Code: the one-tensor optimizer step (flat_optimizer.py), the next step collated during
# the backward, one host wait per step. Run from a copy, as job8.sh:
#   rm -rf /dev/shm/snap /dev/shm/res; mkdir -p /dev/shm/snap && cp -r .gpu_snapshot /dev/shm/snap/tree \
#     && cp -r .gpu_kit/carry /dev/shm/snap/carry && (setsid nohup bash /dev/shm/snap/tree/bench/results/2026-11-30-h200x2-session7/job9.sh \
#     > /dev/shm/job.out 2>&1 < /dev/null &); sleep 5; bash bench/results/2026-11-30-h200x2-session7/poll9.sh 520
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. The profiles as they are now against TRL (flex + Liger + padding-free, with and without checkpointing) and Unsloth,
#    one invocation, every arm alone on one GPU; the kernel breakdown with the idle analysis for the project's arms.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8" --peers trl:flex,unsloth \
   --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 3 --workdir /tmp/hb \
   --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
# 2. No regression on two GPUs: DDP with the profiles as they are (compiled layers; lean offloads), against one GPU.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 8 \
   --workdir /tmp/hb --out $R/tt78_ddp.json > $R/tt78_ddp.log 2>&1; mark ddp rc=$?
# 3. FP8's loss offset: is it FP8 arithmetic or the base it starts from? FP8 quantises the bf16 checkpoint, plain its
#    NF4 round trip; a bf16-base plain arm (same data, seed, lr and steps as session 6's parity run) tells them apart.
mkdir -p /tmp/hbp /tmp/hbq && for w in /tmp/hbp /tmp/hbq; do ln -sfn /tmp/hb/exaone-7.8b $w/exaone-7.8b; cp -r /tmp/hb/tokenizer $w/; done
HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --lr 2e-4 --gpus 0 \
   --variants "plain:lora_dropout=0,quantize_4bit=false,tokens_per_micro_batch=2048" \
   --workdir /tmp/hbp --out $R/tt78_parity_bf16.json > $R/tt78_parity_bf16.log 2>&1 &
( HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --loss-parity --data-pattern random --steps 200 --warmup 1 --lr 2e-4 --gpus 1 \
   --variants "fast:base_precision=fp8,tokens_per_micro_batch=2048" \
   --workdir /tmp/hbq --out $R/tt78_parity_fp8.json > $R/tt78_parity_fp8.log 2>&1; mark parity_fp8 rc=$?
  # 4. lean's evaluation-inclusive peak with compiled layers (sample answers kept short: they are not what is measured)
  mkdir -p /tmp/hbe && ln -sfn /tmp/hb/exaone-7.8b /tmp/hbe/exaone-7.8b && cp -r /tmp/hb/tokenizer /tmp/hbe/
  HAI_MEDQA_CACHE=/tmp/hb/cache python3 bench/train_throughput.py --shape 7.8b --gpus 1 --variants "lean:sample_max_new_tokens=8" \
   --val-records 400 --eval-steps 2 --steps 10 --warmup 3 --workdir /tmp/hbe --out $R/tt78_lean_eval.json > $R/tt78_lean_eval.log 2>&1
  mark lean_eval rc=$? )
wait; mark parity_bf16 done
mark DONE
