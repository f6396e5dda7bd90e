#!/usr/bin/env bash
# The worst-case sweep's order when time is short (session 7): first the points that enter the
# mnist verdict (gated GRAD², its runner-up adaptive misinformation and `none`) at seeds 1 and 2,
# then the rest of fmnist-id at seed 0. Resumable, like run_worst_case.sh (which runs everything).
#   nohup bash benchmarks/run_worst_case_verdict_seeds.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers 2 --no-report "$@"; }
for seed in 1 2; do
  run --seed "$seed" --scenario mnist --attack knockoff \
    --defense none --defense grad2-gated --defense adaptive_misinformation
done
run --seed 0 --scenario fmnist-id --attack knockoff
run --seed 0 --scenario fmnist-id --attack jbda
