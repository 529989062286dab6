#!/bin/bash
# Wait (at most $1 seconds) for the job to finish, then pack what it has so far into $OUT/res.tar.xz (few files come back).
R=/dev/shm/res; end=$(( $(date +%s) + ${1:-500} ))
# A fresh machine (the last one was released between calls) has no job: say so at once instead of waiting $1 s.
[ -d $R ] || { echo "NO JOB HERE: a fresh machine; the job was lost with the released one"; exit 3; }
while [ $(date +%s) -lt $end ] && ! grep -q DONE $R/STAGES 2>/dev/null; do sleep 10; done
cat $R/STAGES; nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
rm -rf /tmp/pack && mkdir -p /tmp/pack/res
for f in $R/*; do
  case $f in *.log) tr '\r' '\n' < $f | grep -v -E "Loading weights|it/s\]|s/it\]|shard/s\]|step/s\]|s/step\]" > /tmp/pack/res/$(basename $f);; *) cp -r $f /tmp/pack/res/;; esac
done
tar -C /tmp/pack -cJf $OUT/res.tar.xz res
for f in $R/*.log; do echo "== $f"; tr '\r' '\n' < $f | grep -E "RESULT|ERROR|Error|error:|Traceback|passed|failed|tok/s per GPU|loss vs|^[a-z].* [0-9,]+ +[0-9.na]+ " | grep -v '^RESULT' | cut -c1-300 | tail -14; done
tail -5 /dev/shm/job.out
