#!/usr/bin/env bash
# The main job: a small end-to-end benchmark on the bundled defaults (the `quick` profile):
# trains (or reuses) its 5-epoch Fashion-MNIST victim and GRAD²'s surrogate, sweeps the defenses
# against Knockoff, and writes runs/quick/{results.jsonl,report.md,report.html,plots/}.
# Re-running resumes: finished runs are kept. results/quick/ holds the committed reference output.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$MIRAGE_ROOT"
start=$SECONDS
mirage bench run --config quick --results "${MIRAGE_MAIN_RESULTS:-runs/quick/results.jsonl}" "$@"
echo "[main] quick benchmark finished in $((SECONDS - start)) s (wall, from this command's start)"
