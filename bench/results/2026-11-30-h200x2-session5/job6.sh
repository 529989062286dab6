#!/bin/bash
# Session-5 second GPU job: 32B one-GPU lean reference, then FSDP on 2 GPUs with offloaded activations at half the per-GPU micro-batch (same 8,192 tokens per optimizer step).
set -u
R=$OUT; cd .gpu_snapshot
python3 bench/peer_wheels.py unpack --from ../.gpu_kit/carry --to /tmp/kit > /dev/null 2>&1 || { echo unpack failed; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
filt() { tr '\r' '\n' | grep -v -E "Loading weights|it/s\]|s/it\]|shard/s\]|step/s\]|s/step\]|Backend impl"; }
date +%T; CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean" \
   --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_ref.json 2>&1 | filt > $R/tt32_ref.log
date +%T; OMP_NUM_THREADS=8 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn \
   --variants "lean:offload_activations=true,tokens_per_micro_batch=4096" --num-processes 2 --no-single-reference \
   --accelerate-config configs/accelerate/fsdp_qlora.yaml --steps 6 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_fsdp_half.json 2>&1 | filt > $R/tt32_fsdp_half.log
date +%T; grep -h -E "^[a-z].* [0-9,]+ +[0-9.na]+ |processes:|Error|Traceback" $R/*.log | cut -c1-250
