#!/usr/bin/env bash
# The long sweeps (the GRAD²-against-MAD ablation, the full sweep, the headline seeds) in the
# order that tells most first, two single-thread workers.
# Resumable: re-running skips every finished run (results/<sweep>/results.jsonl); the models the
# sweeps train are kept in results/models/ (the configs' models_dir).
#   nohup bash benchmarks/run_sweeps.sh >> results/full/sweep.log 2>&1 &
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/bootstrap.sh"
cd "$MIRAGE_ROOT"
export MIRAGE_PROGRESS=0
run() { mirage bench run --executor local --workers 2 "$@"; }
query_time=()
for d in none grad2 mad mad_argmax reverse_sigmoid random_noise adaptive_misinformation modelguard \
         top_k rounding argmax; do query_time+=(--defense "$d"); done

run --config benchmarks/configs/grad2_vs_mad_fmnist_id.toml \
    --results results/ablation/grad2_vs_mad_fmnist_id/results.jsonl
run --config full --scenario fmnist-id --attack knockoff --attack knockoff-hard-label "${query_time[@]}"
run --config full --scenario fmnist-id --attack jbda --attack jb-top3 --attack jb-top3-restarts3 "${query_time[@]}"
run --config full --scenario fmnist "${query_time[@]}"
run --config full    # the rest: mnist, and the training-time defenses (InI, DP-SGD)
# Seeds 1 and 2 of the fmnist-id Knockoff headline points (seed 0 comes from the full sweep).
run --config benchmarks/configs/headline_seeds_fmnist_id.toml \
    --results results/ablation/headline_seeds_fmnist_id/results.jsonl
