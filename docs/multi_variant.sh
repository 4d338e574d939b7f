#!/usr/bin/env bash
# Issue 19: evaluate a docs/multi_run.sh run again with other inference settings, as a setting of its own:
# runs/multi/NAME-VARIANT-seedS/eval. usage: docs/multi_variant.sh NAME VARIANT SEED [overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/multi/mlflow-$1-$2-$3.db
name=$1 variant=$2 seed=$3; shift 3
t0=$(date +%s)
.venv/bin/python -m trainer eval -c configs/toy_multi.yaml data.url=data/toy-multi-96/manifest.json \
    train.out_dir=runs/multi train.threads=1 classifier.checkpoint=runs/multi/${G:-g96-seed0}/classifier.pt \
    mlflow.register=false mlflow.artifact_location=$PWD/runs/multi/mlartifacts train.seed="$seed" \
    train.run_name="$name-$variant-seed$seed" "$@" --segmenter "runs/multi/$name-seed$seed/segmenter.pt"
echo "wall seconds: $(( $(date +%s) - t0 ))"
