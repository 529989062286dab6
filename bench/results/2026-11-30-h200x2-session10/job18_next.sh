#!/bin/bash
# PREPARED, NOT RUN: FP8 answer quality against the exact path (issue 17 item 4's second condition), one foreground
# call of ~7 device minutes on nvidia-h200-x2 from the repository root (carry: .gpu_kit/carry; results under $OUT):
#   bash bench/results/2026-11-30-h200x2-session10/job18_next.sh
# Two adapters trained with S_F2.py (profile fast; NF4 base | FP8 base, one GPU each, same data and seed, 200 steps),
# then both answer the same 64 validation samples greedily on the same bf16 base through evaluate.py --compare;
# every ROUGE row says whether its difference is within the paired 95% noise (verdict.match_within_noise). The
# random stand-in model learns the bench's sentence cycle: a proxy for the check with EXAONE's weights.
set -u
python3 bench/peer_wheels.py unpack --from .gpu_kit/carry --to /tmp/kit > $OUT/unpack.log 2>&1 || exit 1
export PYTHONPATH=/tmp/kit/site_main:/tmp/kit/site_common:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
timeout 560 python3 bench/answer_quality.py --shape 7.8b --steps 200 --labels nf4 fp8 --samples 64 \
   --max-new-tokens 96 --workdir /tmp/hq --out $OUT/answer_quality_fp8.json > $OUT/answer_quality.log 2>&1
echo "quality rc=$?"; tail -20 $OUT/answer_quality.log
