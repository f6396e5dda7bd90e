#!/usr/bin/env bash
# The alarmed gate (grad2-gated-scramble-alarm) at 3 seeds and on fmnist-id JBDA, with the
# worst-case sweep's remaining fmnist-id seeds. Run before it: the mnist alarmed gate's aligned,
# averaging, noise-robust and restorer attackers at seeds 1-2, the alarmed gate on fmnist-id JBDA
# (alarm rate 3 %) at seed 0, and fmnist-id JBDA at seed 0 for every point
# (`run --seed 0 --scenario fmnist-id --attack jbda`). Then:
#   1. the fmnist-id JBDA alarmed gate's binding (hard-label) attacker at seeds 1-2, and JBDA
#      spread over 4 keys against it (each key's stream is judged alone);
#   2. seed 2 of the fmnist-id verdict points' other attackers;
#   3. the stream detector's adaptive attackers (decoys, several keys) at seeds 1-2 on mnist.
# Resumable, like run_worst_case.sh (which runs everything).
#   [MIRAGE_WORKERS=2] nohup bash benchmarks/run_worst_case_alarmed_gate.sh >> results/worst_case/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --config worst_case --executor local --workers "${MIRAGE_WORKERS:-2}" --no-report "$@"; }
run --seed 0 --scenario fmnist-id --attack jbda
run --seed 1 --seed 2 --scenario fmnist-id --defense grad2-gated-scramble-alarm --attack jbda/hard-label
run --seed 0 --scenario fmnist-id --defense grad2-gated-scramble-alarm --attack jbda/multi-key
run --seed 2 --scenario fmnist-id --attack knockoff --defense none --defense mad_argmax
run --seed 2 --scenario fmnist-id --attack jbda --defense none --defense grad2-gated
run --seed 1 --seed 2 --scenario mnist --defense grad2-gated-scramble-alarm \
  --attack knockoff/mixing --attack knockoff/multi-key
