#!/usr/bin/env bash
# Ownership in distribution: a keyed runner-up layer (place = "second") over the density-capped
# top-1 layer (run_ownership_rank_score.sh), on fmnist-id: seeds 0-2 for the four target thieves
# (soft, hard-label, averaging, restorer) and the two that flatten the answers (no dark
# knowledge), JBDA, seed 0 in full (bob, removals, innocents, the 4-key thieves) and the rest of
# the suite, a probe with more runner-up mass; then the flattening thieves against mnist's
# recommended watermark (answer buckets with templates) and that watermark's seed 1 in full.
# Resumable: finished entries of results/ownership/runner_up_stack.jsonl are skipped; two runs at
# a time on two cores. Seeds 0 and 1 of the first step ran from commit 52993fa.
# runner_up_noswap.jsonl holds a variant tried and dropped: the keyed class given sharpen of the
# mass without the swap (commit 53a5737), better for calibration, weaker against the restorer.
# runner_up_alone.jsonl: the runner-up layer alone (soft, averaging, restorer), from
#   run --scenario fmnist-id --seed 0 --attacks-only --attackers soft averaging restorer --watermark "$RUNNER"
#   and likewise seeds 1, 2 and --attack jbda (commit fae6ea1 and the tree after it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=results/ownership/runner_up_stack.jsonl
RUNNER='{"buckets":"answer","bucket_fraction":1.0,"place":"second","sharpen":0.1}'
STACK='[{"bucket_fraction":1.0,"density_cap":1e-4},'"$RUNNER"']'
TEMPLATE='{"buckets":"answer","bucket_fraction":1.0,"tie_gap":0.3,"template":0.9}'
THIEVES="soft hard-label averaging restorer flattened flattened-restorer"
run() { $PY benchmarks/ownership.py --out $OUT "$@"; }

run --scenario fmnist-id --seed 0 --attacks-only --attackers $THIEVES --watermark "$STACK" &
run --scenario fmnist-id --seed 1 --attacks-only --attackers $THIEVES --watermark "$STACK"
wait
run --scenario fmnist-id --seed 2 --attacks-only --attackers $THIEVES --watermark "$STACK" &
run --scenario fmnist-id --seed 0 --attack jbda --attacks-only --attackers $THIEVES --watermark "$STACK"
wait
run --scenario fmnist-id --seed 0 --attackers $THIEVES multi-key multi-key-hard-label --watermark "$STACK" &
run --scenario fmnist-id --seed 0 --attacks-only --attackers confident-only noise-robust mixing aligned \
    --watermark "$STACK"
wait
# A probe against the noise-robust thief: the runner-up given 0.3 of the mass (seed 0 only).
STACK3='[{"bucket_fraction":1.0,"density_cap":1e-4},{"buckets":"answer","bucket_fraction":1.0,"place":"second","sharpen":0.3}]'
run --scenario fmnist-id --seed 0 --attacks-only --attackers soft averaging restorer noise-robust --watermark "$STACK3" &
for seed in 1 2; do
  run --scenario fmnist-id --seed $seed --attack jbda --attacks-only --attackers $THIEVES --watermark "$STACK"
done
wait
for seed in 0 1 2; do
  run --scenario mnist --seed $seed --attacks-only --attackers flattened flattened-restorer --watermark "$TEMPLATE"
done &
run --scenario mnist --seed 1 --attackers soft hard-label averaging restorer multi-key multi-key-hard-label \
    --watermark "$TEMPLATE"
wait
