#!/usr/bin/env bash
# Evaluate a trained seed of docs/run_seed.sh again with other inference settings (CRF, multi-scale, ...), as
# a setting of its own for `wsssrec report`: runs/bias/NAME-VARIANT-seedS/eval/results.json.
# usage: docs/run_eval_variant.sh NAME VARIANT SEED CONFIG DATA [overrides...]
#   e.g. docs/run_eval_variant.sh rho09 crf 0 configs/toy_birds.yaml data/toy-birds eval.crf_iterations=10
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 variant=$2 seed=$3 config=$4 data=$5
shift 5
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${RUNS:-runs/bias}
start=$(date +%s)
.venv/bin/python -m trainer eval -c "$config" data.url="$data/manifest.json" train.seed="$seed" train.out_dir="$out" \
    train.threads="$OMP_NUM_THREADS" classifier.checkpoint="$out/g-$(basename "$data")-seed$seed/classifier.pt" \
    train.run_name="$name-$variant-seed$seed" "$@" --segmenter "$out/$name-seed$seed/segmenter.pt"
echo "wall seconds: $(( $(date +%s) - start ))"
