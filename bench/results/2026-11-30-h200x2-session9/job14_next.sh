#!/bin/bash
# PREPARED, NOT RUN: the next nvidia-h200-x2 job (issue 17), ~20 device minutes. Launch as session 8's job10.sh (its
# header) with this file's name; poll at once with session 7's poll9.sh, and again as soon as each poll returns (the
# machine is released 30 s after a call ends: session 9 lost stage 2 of its first job that way).
source /dev/shm/snap/tree/bench/gpu_job_preamble.sh
# 1. The peers with the profiles as they now are: lora_kernel fused_nf4 on a GPU (831d4a0) and the heap frozen again
#    after a recompile (d94b3b7; lean's full collections walked 70,000-80,000 objects in session 9, 40-96 ms each).
#    Targets: fast >= 1.25x TRL flex no-checkpointing, lean >= 1.2x TRL flex checkpointing, both ahead of Unsloth.
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean;fast:base_precision=fp8" \
   --peers trl:flex,unsloth --peer-kit /tmp/kit --gpus 0,1 --warmup 3 --steps 10 --workdir /tmp/hb \
   --out $R/tt78_peers.json > $R/tt78_peers.log 2>&1; mark peers rc=$?
# 2. DDP >= 1.9x: lean's per-rank garbage collections should now walk hundreds of objects (gc.objects_walked).
python3 bench/train_throughput.py --shape 7.8b --variants "fast;lean" --num-processes 2 --warmup 3 --steps 12 \
   --workdir /tmp/hb --out $R/tt78_ddp.json > $R/tt78_ddp.log 2>&1; mark ddp rc=$?
# 3. fast x2 lost ~350 ms in one step, the 6th, on both ranks, in two invocations (GC paused < 2 ms): NCCL connecting
#    lazily (its default since 2.22) would do that once. Connect everything at start-up and look again. DDP compiles 4
#    frames more than one process (job 13: 11 against 7); the trainer now logs "step N: torch.compile compiled ..."
#    for any compile after step 1, so the logs of stages 2-4 say whether step 6 compiled something.
NCCL_RUNTIME_CONNECT=0 python3 bench/train_throughput.py --shape 7.8b --variants "fast" --num-processes 2 --warmup 3 \
   --steps 8 --workdir /tmp/hb --out $R/tt78_ddp_connect.json > $R/tt78_ddp_connect.log 2>&1; mark ddp_connect rc=$?
# 4. Where the 6th step's ~350 ms go: steps 6 and 7 of fast x2 traced with Python frames (the profiler starts after
#    warm-up + timed steps = 5). A stall there shows as GPU idle time and the host frames that ran during it.
python3 bench/train_throughput.py --shape 7.8b --variants "fast" --num-processes 2 --no-single-reference --warmup 4 \
   --steps 1 --kernel-profile 2 --kernel-profile-stack --workdir /tmp/hb --out $R/tt78_ddp_step6.json \
   > $R/tt78_ddp_step6.log 2>&1; mark ddp_step6 rc=$?
mark DONE
