#!/usr/bin/env bash
# Session 14, second part: JBDA seeds 1-2 of the in-distribution stack, the flattening thieves
# against mnist's recommended watermark (answer buckets with templates), then seeds 1 and 2 of
# that watermark in full (bob, removals, innocents, the 4-key thieves). Resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=results/ownership/session14.jsonl
RUNNER='{"buckets":"answer","bucket_fraction":1.0,"place":"second","sharpen":0.1}'
STACK='[{"bucket_fraction":1.0,"density_cap":1e-4},'"$RUNNER"']'
TEMPLATE='{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3,"template":0.9}'
THIEVES="soft hard-label averaging restorer flattened flattened-restorer"
run() { $PY benchmarks/ownership.py --out $OUT "$@"; }

for seed in 1 2; do
  run --scenario fmnist-id --seed $seed --attack jbda --attacks-only --attackers $THIEVES --watermark "$STACK"
done &
for seed in 0 1 2; do
  run --scenario mnist --seed $seed --attacks-only --attackers flattened flattened-restorer --watermark "$TEMPLATE"
done
wait
run --scenario mnist --seed 1 --attackers soft hard-label averaging restorer multi-key multi-key-hard-label \
    --watermark "$TEMPLATE" &
run --scenario mnist --seed 2 --attackers soft hard-label averaging restorer multi-key multi-key-hard-label \
    --watermark "$TEMPLATE"
wait
