#!/usr/bin/env bash
# One reference run: stage 2 of the segmenter against g of the same seed, then eval.
# usage: docs/run_reference.sh NAME SEED CONFIG [overrides...]
# g of seed S: python -m trainer train-classifier -c configs/toy_birds.yaml train.seed=S \
#                train.run_name=g-seedS train.out_dir=runs/ref
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 seed=$2 config=$3
shift 3
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(-c "$config" train.seed="$seed" classifier.checkpoint="runs/ref/g-seed$seed/classifier.pt"
        train.out_dir=runs/ref train.run_name="$name-seed$seed" train.threads="$OMP_NUM_THREADS" "$@")
start=$(date +%s)
.venv/bin/python -m trainer train "${common[@]}"
.venv/bin/python -m trainer eval "${common[@]}"
echo "wall seconds: $(( $(date +%s) - start ))"
