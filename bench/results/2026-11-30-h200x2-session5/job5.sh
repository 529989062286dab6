#!/bin/bash
# Session-5 GPU job (nvidia-h200-x2), run from a copy in /dev/shm/snap so that later calls re-sending the tree cannot pull its cwd away.
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
mark begin $(git -C . log -1 --format=%h 2>/dev/null || echo export)
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi > $R/nvidia-smi.txt 2>&1
# Phase 1, side by side. GPU1: offloading's CUDA test, then the 200-step loss parity (plain, fast, FP8) at 2,048 tokens/step.
(
  export CUDA_VISIBLE_DEVICES=1
  python3 -m pytest -q -p no:cacheprovider tests/train/test_activation_offload.py > $R/offload_pytest.log 2>&1; mark offload_pytest rc=$?
  python3 bench/train_throughput.py --shape 7.8b --variants "plain:tokens_per_micro_batch=2048;fast:tokens_per_micro_batch=2048;fast:base_precision=fp8,tokens_per_micro_batch=2048" \
     --loss-parity --data-pattern random --steps 200 --warmup 1 --workdir /tmp/hb --out $R/tt78_parity.json > $R/tt78_parity.log 2>&1; mark parity rc=$?
) &
# GPU0: the 32B one-GPU references (lean, and lean with activations offloaded to host memory).
CUDA_VISIBLE_DEVICES=0 python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean;lean:offload_activations=true" \
   --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_single.json > $R/tt32_single.log 2>&1; mark tt32_single rc=$?
wait
# Phase 2: FSDP-QLoRA 32B on both GPUs with offloaded activations.
OMP_NUM_THREADS=8 python3 bench/train_throughput.py --shape 32b --storage-dtype float8_e4m3fn --variants "lean:offload_activations=true" \
   --num-processes 2 --no-single-reference --accelerate-config configs/accelerate/fsdp_qlora.yaml \
   --steps 4 --warmup 2 --workdir /dev/shm/hb32 --out $R/tt32_fsdp_offload.json > $R/tt32_fsdp_offload.log 2>&1; mark tt32_fsdp_offload rc=$?
rm -rf /dev/shm/hb32
# Phase 3: FSDP-QLoRA 7.8B (new path) against one process.
OMP_NUM_THREADS=8 python3 bench/train_throughput.py --shape 7.8b --variants "lean" --num-processes 2 --accelerate-config configs/accelerate/fsdp_qlora.yaml \
   --steps 8 --warmup 3 --workdir /tmp/hb --out $R/tt78_fsdp.json > $R/tt78_fsdp.log 2>&1; mark tt78_fsdp rc=$?
# Phase 4: the peers in the same invocation as the profiles, two arms at a time (one per GPU), kernel breakdown of each profile.
python3 bench/train_throughput.py --shape 7.8b --baseline --variants "fast;lean;lean:offload_activations=true;fast:base_precision=fp8,compile_layers=true" \
   --peers all --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 3 --workdir /tmp/hb --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark tt78_peers rc=$?
mark DONE
