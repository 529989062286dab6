#!/bin/bash
# Sourced by a GPU job script run from a copy in /dev/shm (see bench/results/2026-11-30-h200x2-session8/job10.sh's
# header for the launch, session 7's poll9.sh for the poll): results go to $R, `mark` stamps progress in $R/STAGES,
# the peer kit is unpacked to /tmp/kit, and the environment the jobs ran with is set (NVLink multicast off: the
# device machines' KINDS.md).
set -u
S=/dev/shm/snap; R=/dev/shm/res; mkdir -p $R
cd $S/tree
mark() { echo "$(date +%T) $*" >> $R/STAGES; }
python3 bench/peer_wheels.py unpack --from $S/carry --to /tmp/kit > $R/unpack.log 2>&1 || { mark FAIL unpack; exit 1; }
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
mark begin
