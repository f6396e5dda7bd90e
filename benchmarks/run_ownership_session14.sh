#!/usr/bin/env bash
# Session 14 (issue 17): a keyed runner-up layer (place = "second") over the top-1 layer of
# session 12, in distribution (fmnist-id): seeds 0-2 for the issue's four thieves and the two
# that flatten the answers (no dark knowledge), JBDA, then seed 0 in full (bob, removals,
# innocents, the 4-key thieves) and the rest of the suite. Resumable: finished entries of
# results/ownership/session14.jsonl are skipped; two runs at a time on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=results/ownership/session14.jsonl
RUNNER='{"buckets":"answer","bucket_fraction":1.0,"place":"second","sharpen":0.1}'
STACK='[{"bucket_fraction":1.0,"density_cap":1e-4},'"$RUNNER"']'
THIEVES="soft hard-label averaging restorer flattened flattened-restorer"
run() { $PY benchmarks/ownership.py --out $OUT "$@"; }

# (The runner-up layer alone, fmnist-id seeds 0-2 and JBDA seed 0, is in
# results/ownership/session14_runner_up.jsonl:
#   run --scenario fmnist-id --seed 0 --attacks-only --attackers soft averaging restorer --watermark "$RUNNER"
#   and likewise seeds 1, 2 and --attack jbda.)
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
