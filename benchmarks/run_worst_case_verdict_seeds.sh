#!/usr/bin/env bash
# The worst-case sweep's order when time is short: the whole suite at seed 0 on fmnist-id (Knockoff,
# then JBDA) and for gated GRAD²'s permuted branch on mnist, then seeds 1 and 2 of the points that
# enter a verdict (the deployed defense and `none`; on mnist also the runner-ups). Resumable, like
# run_worst_case.sh (which runs everything).
#   nohup bash benchmarks/run_worst_case_verdict_seeds.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers 2 --no-report "$@"; }
run --seed 0 --scenario fmnist-id --attack knockoff
run --seed 0 --scenario mnist --defense grad2-gated-permute
run --seed 0 --scenario fmnist-id --attack jbda
for seed in 1 2; do
  run --seed "$seed" --scenario mnist --attack knockoff \
    --defense none --defense grad2-gated --defense grad2-gated-permute --defense adaptive_misinformation
  run --seed "$seed" --scenario fmnist-id --attack jbda --defense none --defense grad2-gated-permute
  run --seed "$seed" --scenario fmnist-id --attack knockoff --defense none --defense grad2-unlearn-top1
done
