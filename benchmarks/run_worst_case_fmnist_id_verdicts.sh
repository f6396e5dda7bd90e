#!/usr/bin/env bash
# What the fmnist-id verdicts still need for 3 seeds (the hard-label attacker at seed 2, then the
# whole suite at seeds 1 and 2 for `none` and each family's candidate), then the rest of
# fmnist-id JBDA at seed 0. Resumable, like run_worst_case.sh (which runs everything).
#   [MIRAGE_WORKERS=1] nohup bash benchmarks/run_worst_case_fmnist_id_verdicts.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers "${MIRAGE_WORKERS:-2}" --no-report "$@"; }
run --seed 2 --scenario fmnist-id --attack knockoff/hard-label --attack jbda/hard-label \
  --defense none --defense grad2-unlearn-top1 --defense mad_argmax --defense grad2-gated
for seed in 1 2; do
  run --seed "$seed" --scenario fmnist-id --attack knockoff --defense none --defense mad_argmax
  run --seed "$seed" --scenario fmnist-id --attack jbda --defense none --defense grad2-gated
done
run --seed 0 --scenario fmnist-id --attack jbda
