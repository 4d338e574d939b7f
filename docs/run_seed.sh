#!/usr/bin/env bash
# One full seed of a setting: stage 1 (g of that seed, trained once per data set and reused) → stage 2 → eval.
# usage: docs/run_seed.sh NAME SEED CONFIG DATA [overrides...]
#   e.g. docs/run_seed.sh rho09 1 configs/toy_birds.yaml data/toy-birds
#        docs/run_seed.sh rho05 1 configs/toy_birds.yaml data/toy-birds-rho05
# g lands in runs/bias/g-<data folder name>-seedS, the segmenter and its eval in runs/bias/NAME-seedS.
# Overrides after DATA apply to stage 2 and eval only; G_OVERRIDES (space-separated) applies to every stage,
# g included, e.g. G_OVERRIDES="data.image_size=128 train.channels_last=true" for a 128 px data set.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 seed=$2 config=$3 data=$4
shift 4
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${RUNS:-runs/bias}
g="g-$(basename "$data")-seed$seed"
base=(-c "$config" data.url="$data/manifest.json" train.seed="$seed" train.out_dir="$out"
      train.threads="$OMP_NUM_THREADS" ${G_OVERRIDES:-})
start=$(date +%s)
if [ ! -f "$out/$g/classifier.pt" ]; then
  .venv/bin/python -m trainer train-classifier "${base[@]}" train.run_name="$g"
fi
common=("${base[@]}" classifier.checkpoint="$out/$g/classifier.pt" train.run_name="$name-seed$seed" "$@")
.venv/bin/python -m trainer train "${common[@]}"
.venv/bin/python -m trainer eval "${common[@]}"
echo "wall seconds: $(( $(date +%s) - start ))"
