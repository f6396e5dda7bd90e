#!/usr/bin/env bash
# Session 11 (issue 17): the keyed watermark kept out of buckets the defender's benign data
# fills (density_cap), per scenario at ≤ 0.5 point of cost, against every attacker, removal
# attack and innocent model; then JBDA on fmnist-id. Resumable: finished entries are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MNIST='{"bucket_fraction":0.5,"density_cap":1e-4,"sharpen":0.5}'
FMNIST='{"bucket_fraction":1.0,"density_cap":1e-4,"sharpen":0.5}'
$PY benchmarks/ownership.py --scenario mnist --seed 0 --watermark "$MNIST" &
$PY benchmarks/ownership.py --scenario fmnist-id --seed 0 --watermark "$FMNIST"
wait
$PY benchmarks/ownership.py --scenario fmnist-id --seed 0 --attack jbda --attackers soft hard-label averaging restorer \
    --watermark "$FMNIST"
