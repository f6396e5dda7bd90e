#!/usr/bin/env bash
# Gated GRAD² against the attacker suite (benchmarks/configs/grad2_gated.toml), one
# worker beside the worst-case sweep. Resumable.
#   nohup bash benchmarks/run_grad2_gated.sh >> results/grad2_gated/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config benchmarks/configs/grad2_gated.toml \
          --results results/grad2_gated/results.jsonl --executor local --workers 1 "$@"; }
for seed in 0 1 2; do
  run --seed "$seed" --scenario mnist
  run --seed "$seed" --scenario fmnist-id --attack knockoff
  run --seed "$seed" --scenario fmnist-id --attack jbda
done
