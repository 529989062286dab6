#!/bin/bash
# PREPARED, NOT RUN: the next nvidia-h200-x2 jobs (issue 17), two foreground calls of ~5 and ~4 device minutes, from
# the repository root by the device tool (carry: .gpu_kit/carry; results under $OUT; no polling, so nothing is lost
# when the machine is released between calls):
#   bash bench/results/2026-11-30-h200x2-session10/job16_next.sh a      then      ... job16_next.sh b
set -u
python3 bench/peer_wheels.py unpack --from .gpu_kit/carry --to /tmp/kit > $OUT/unpack.log 2>&1 || exit 1
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
if [ "${1:-a}" = a ]; then
  # a1. lean's peak including evaluation now that its rows are padded on a GPU (session 8, unpadded: 10.11 GiB;
  #     target <= 14 GB = 13.04 GiB). Same command as session 8's.
  timeout 200 python3 bench/train_throughput.py --shape 7.8b --gpus 1 --variants "lean:sample_max_new_tokens=8" \
     --val-records 400 --eval-steps 2 --steps 6 --warmup 2 --workdir /tmp/hbe --out $OUT/tt78_lean_eval.json \
     > $OUT/tt78_lean_eval.log 2>&1; echo "lean_eval rc=$?"
  # a2. fast x2's stall at its 6th step (every invocation, both ranks; not the collector, not NCCL's lazy connection:
  #     job 15). Steps 6 and 7 traced with Python frames: the profiler starts after warm-up + timed steps = 5.
  #     Read kernel_breakdown.idle (idle_by_phase, host_own_time_while_idle) of the x2 arm.
  timeout 260 python3 bench/train_throughput.py --shape 7.8b --variants "fast" --num-processes 2 --no-single-reference \
     --warmup 4 --steps 1 --kernel-profile 2 --kernel-profile-stack --workdir /tmp/hb --out $OUT/tt78_ddp_step6.json \
     > $OUT/tt78_ddp_step6.log 2>&1; echo "ddp_step6 rc=$?"
else
  # b. Both exact profiles as they now are (lean padded) beside TRL in one invocation, with two more warm-up steps
  #    than before so that one-time compiles (ours in steps 1-2, TRL's at new row lengths) fall outside the timing.
  timeout 540 python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --peers trl:flex \
     --peer-kit /tmp/kit --gpus 0,1 --warmup 5 --steps 10 --workdir /tmp/hb --out $OUT/tt78_peers.json \
     > $OUT/tt78_peers.log 2>&1; echo "peers rc=$?"
fi
for f in $OUT/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "Error|Traceback|tok/s per GPU|^[a-z].* [0-9,]+ +[0-9.na]+ " | cut -c1-300 | tail -8; done
