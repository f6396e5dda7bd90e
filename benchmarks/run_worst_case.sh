#!/usr/bin/env bash
# The worst-case sweep (src/mirage/bench/profiles/worst_case.toml), most telling slice
# first, two single-thread workers. Resumable: re-running skips every finished run.
#   nohup bash benchmarks/run_worst_case.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
# The soft-label attacker is the full sweep's plain attack: its seed-0 runs are imported, not
# repeated. The undefended hard-label runs are re-run (cheaply: the clone cache has their clone
# from the first top-1-keeping defense) so that their records carry the transfer digest.
mirage bench import --config worst_case --source results/full/results.jsonl \
  --attack knockoff/soft --attack jbda/soft
run() { mirage bench run --config worst_case --executor local --workers 2 "$@"; }
for seed in 0 1 2; do
  run --seed "$seed" --scenario mnist --attack knockoff
  run --seed "$seed" --scenario fmnist-id --attack knockoff
  run --seed "$seed" --scenario fmnist-id --attack jbda
done
