#!/bin/bash
# Wait (at most $1 seconds) for the job to finish, then copy what it has so far to $OUT.
R=/dev/shm/res; end=$(( $(date +%s) + ${1:-500} ))
while [ $(date +%s) -lt $end ] && ! grep -q DONE $R/STAGES 2>/dev/null; do sleep 10; done
cat $R/STAGES; nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
mkdir -p $OUT/res
for f in $R/*; do
  case $f in *.log) tr '\r' '\n' < $f | grep -v -E "Loading weights|it/s\]|s/it\]|shard/s\]|step/s\]|s/step\]" > $OUT/res/$(basename $f);; *) cp $f $OUT/res/;; esac
done
for f in $R/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "RESULT|ERROR|Error|error:|Traceback|passed|failed|tok/s per GPU|^[a-z].* [0-9,]+ +[0-9.na]+ " | cut -c1-400 | tail -12; done
