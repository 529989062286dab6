#!/bin/bash
# Session-10 second GPU job (nvidia-h200-x2), issue 17, ~8 device minutes, run in the foreground from the repository
# root by the device tool (carry: .gpu_kit/carry; results under $OUT):  bash bench/results/2026-11-30-h200x2-session10/job15.sh
set -u
python3 bench/peer_wheels.py unpack --from .gpu_kit/carry --to /tmp/kit > $OUT/unpack.log 2>&1 || exit 1
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
# 1. lean with its rows padded to the token budget (one static shape, as fast). Session 9's trace: lean's attention
#    took 70.9 ms/step against fast's 38.6 (a recomputed forward explains ~13 of the 32 more) and its matmuls 526.6
#    against 373.1 (~125 expected): lean's rows are unpadded, so its layer region is compiled for varying lengths.
#    Beside TRL's checkpointing arm (lean >= 1.2x it), one step of each of ours traced.
timeout 330 python3 bench/train_throughput.py --shape 7.8b --variants "lean;lean:pad_to_fixed_length=true" \
   --peers trl:flex:ckpt --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --kernel-profile 1 --workdir /tmp/hb \
   --out $OUT/tt78_lean_pad.json > $OUT/tt78_lean_pad.log 2>&1; echo "lean_pad rc=$?"
# 2. fast x2's one stall of ~200-350 ms at the 6th step (every invocation, both ranks): NCCL connecting lazily (its
#    default since 2.22) would do that once. Everything connected at start-up here.
NCCL_RUNTIME_CONNECT=0 timeout 170 python3 bench/train_throughput.py --shape 7.8b --variants "fast" --num-processes 2 \
   --no-single-reference --warmup 3 --steps 6 --workdir /tmp/hb --out $OUT/tt78_ddp_connect.json \
   > $OUT/tt78_ddp_connect.log 2>&1; echo "ddp_connect rc=$?"
for f in $OUT/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "Error|Traceback|tok/s per GPU|^[a-z].* [0-9,]+ +[0-9.na]+ " | cut -c1-300 | tail -8; done
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/*.partial.jsonl")):
    for line in open(f):
        a = json.loads(line)
        print(a.get("name"), a.get("num_processes"), a.get("step_walls_s"), a.get("per_rank_step_walls_s"))
PY
