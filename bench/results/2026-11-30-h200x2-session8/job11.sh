#!/bin/bash
# Session-8 GPU job (nvidia-h200-x2), issue 17, ~12 device minutes. It was meant to carry the Python heap freeze
# (hai_medqa/train/runtime.py) and the bench's garbage-collection record, but those were committed after its snapshot
# (7fa4315) was taken: it ran job10's code (228b573). Launch as job10.sh (its header) with this file's name; poll with
# session 7's poll9.sh.
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
# 1. The profiles against TRL (flex + Liger + padding-free, with and without checkpointing) and Unsloth, one
#    invocation, every arm alone on one GPU; kernel and idle breakdown of the project's arms.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8" --peers trl:flex,unsloth \
   --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 3 --workdir /tmp/hb \
   --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
# 2. No regression on two GPUs (target >= 1.9x): DDP against one GPU, same invocation.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 8 \
   --workdir /tmp/hb --out $R/tt78_ddp.json > $R/tt78_ddp.log 2>&1; mark ddp rc=$?
mark DONE
