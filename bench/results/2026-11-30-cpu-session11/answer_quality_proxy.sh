#!/bin/bash
# FP8 answer quality, CPU proxy (issue 17 item 4): the tiny stand-in model trained 200 steps per arm with S_F2.py
# (profile plain, lr 1e-2 from configs/tiny_cpu.yaml), then evaluate.py --compare on the same validation questions.
# Three comparisons: FP8 (emulated) against NF4, FP8 against the bf16 base, and NF4 against NF4 with another seed
# (how far two exact runs move apart). Run from the repository root (2-core CPU machine, 2026-11-30; ~13 minutes):
#   bash bench/results/2026-11-30-cpu-session11/answer_quality_proxy.sh
WORK=${WORK:-/tmp/aqproxy}
S="--shape tiny --profile plain --steps 200 --samples 64 --max-new-tokens 48 --set compute_dtype=auto"
python bench/answer_quality.py $S --arm-b base_precision=fp8,fp8_emulate=true --labels nf4 fp8 \
   --workdir $WORK/a --out $WORK/out/answer_quality_fp8_vs_nf4.json > $WORK/fp8_vs_nf4.log 2>&1; echo "fp8_vs_nf4 rc=$?"
python bench/answer_quality.py $S --set quantize_4bit=false --arm-b base_precision=fp8,fp8_emulate=true \
   --labels bf16 fp8 --workdir $WORK/b --out $WORK/out/answer_quality_fp8_vs_bf16.json > $WORK/fp8_vs_bf16.log 2>&1
echo "fp8_vs_bf16 rc=$?"
python bench/answer_quality.py $S --arm-b seed=1 --labels nf4_seed0 nf4_seed1 \
   --workdir $WORK/c --out $WORK/out/answer_quality_seed.json > $WORK/seed.log 2>&1; echo "seed rc=$?"
