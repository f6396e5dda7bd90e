#!/usr/bin/env bash
# The worst-case sweep's order when time is short: on fmnist-id JBDA the whole suite at
# seed 0 for `none`, the soft-label leader (GRAD² unlearn-top1) and the two gated GRAD² points;
# the wider permuted gate on mnist at seed 0, with the label-aligning attacker against the
# label-changing points; then seeds 1 and 2 of each verdict's binding attacker (the hard-label
# attacker against `none`, whose clone every top-1-keeping defense shares, and against gated GRAD²
# on JBDA), then the rest of those points' suite; then the rest of fmnist-id JBDA at seed 0.
# Resumable, like run_worst_case.sh (which runs everything).
#   nohup bash benchmarks/run_worst_case_verdict_seeds.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers 2 --no-report "$@"; }
run --seed 0 --scenario fmnist-id --attack jbda \
  --defense none --defense grad2-unlearn-top1 --defense grad2-gated --defense grad2-gated-permute
run --seed 0 --scenario mnist --defense grad2-gated-permute-0.5pct
run --seed 0 --scenario mnist --attack knockoff/aligned --defense adaptive_misinformation \
  --defense grad2-gated --defense grad2-gated-permute
for seed in 1 2; do
  run --seed "$seed" --scenario fmnist-id --attack knockoff/hard-label --attack jbda/hard-label \
    --defense none --defense grad2-unlearn-top1 --defense mad_argmax --defense grad2-gated
done
for seed in 1 2; do
  run --seed "$seed" --scenario fmnist-id --attack jbda --defense none --defense grad2-gated
  run --seed "$seed" --scenario fmnist-id --attack knockoff --defense none --defense mad_argmax
  run --seed "$seed" --scenario mnist --attack knockoff/aligned --defense adaptive_misinformation
done
run --seed 0 --scenario fmnist-id --attack jbda
