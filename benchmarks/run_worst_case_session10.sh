#!/usr/bin/env bash
# Session 10's order (issue 18, then issue 16), after seeds 1-2 of the mnist alarmed gate's aligned,
# averaging and noise-robust attackers:
#   1. the restorer against the mnist alarmed gate at seeds 1-2 (its seed-0 clone collapsed), and
#      the alarmed gate on fmnist-id JBDA (alarm rate 3 %) at seed 0;
#   2. fmnist-id JBDA at seed 0 for the points still missing attackers;
#   3. seed 2 of the fmnist-id verdict points' non-binding attackers.
# Resumable, like run_worst_case.sh (which runs everything).
#   [MIRAGE_WORKERS=2] nohup bash benchmarks/run_worst_case_session10.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers "${MIRAGE_WORKERS:-2}" --no-report "$@"; }
run --seed 1 --seed 2 --scenario mnist --defense grad2-gated-scramble-alarm \
  --attack knockoff/aligned --attack knockoff/averaging --attack knockoff/noise-robust --attack knockoff/restorer
run --seed 0 --scenario fmnist-id --defense grad2-gated-scramble-alarm --attack jbda
run --seed 0 --scenario fmnist-id --attack jbda
run --seed 2 --scenario fmnist-id --attack knockoff --defense none --defense mad_argmax
run --seed 2 --scenario fmnist-id --attack jbda --defense none --defense grad2-gated
