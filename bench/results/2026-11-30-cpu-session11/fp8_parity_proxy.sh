#!/bin/bash
# FP8 loss parity, CPU proxy (issue 17 item 4): the tiny stand-in model, 200 steps of 2,048 tokens, lr 1e-2, on the
# bench's two data patterns; arms: NF4 plain (the reference), the FP8 base with emulated matmuls (fp8_emulate),
# and the exact bf16 base. Run from the repository root (2-core CPU machine, 2026-11-30; ~25 minutes):
#   bash bench/results/2026-11-30-cpu-session11/fp8_parity_proxy.sh
WORK=${WORK:-/tmp/fp8proxy}
T=tokens_per_micro_batch=2048
for pat in random words; do
  python bench/train_throughput.py --shape tiny --loss-parity --data-pattern $pat --steps 200 --warmup 1 --lr 1e-2 \
    --workdir $WORK/w_$pat --out $WORK/parity_$pat.json \
    --variants "plain:lora_dropout=0,$T;plain:lora_dropout=0,base_precision=fp8,fp8_emulate=true,$T;plain:lora_dropout=0,quantize_4bit=false,$T" \
    > $WORK/parity_$pat.log 2>&1; echo "$pat rc=$?"
done
