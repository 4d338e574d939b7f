#!/usr/bin/env bash
# Issue 19, 2026-12-02 evening: one toy-multi (96 px) run = stage 2 from scratch + eval, against the shared g
# runs/multi/$G (default g96-seed0; stage 1 once: MODE=g, G_EPOCHS epochs, default 2). usage: docs/multi_run.sh NAME SEED [overrides...]
# CONFIG and DATA pick another set (default configs/toy_multi.yaml on data/toy-multi-96), e.g. CONFIG=configs/toy_multi8.yaml
# DATA=data/toy-multi8 for C = 8. G_OVERRIDES (space-separated) apply to every stage, g included, e.g.
# G_OVERRIDES=classifier.arch=lite2 with a G of its own for g as EfficientNet-Lite2.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/multi/mlflow-$1-$2.db
C=(-c ${CONFIG:-configs/toy_multi.yaml} data.url=${DATA:-data/toy-multi-96}/manifest.json train.out_dir=runs/multi train.threads=1
   classifier.checkpoint=runs/multi/${G:-g96-seed0}/classifier.pt mlflow.register=false
   mlflow.artifact_location=$PWD/runs/multi/mlartifacts ${G_OVERRIDES:-})
name=$1 seed=$2; shift 2
t0=$(date +%s)
if [ "${MODE:-}" = g ]; then
  .venv/bin/python -m trainer train-classifier "${C[@]}" train.run_name=${G:-g96-seed0} classifier.epochs=${G_EPOCHS:-2} train.seed=0
  echo "g seconds: $(( $(date +%s) - t0 ))"; exit 0
fi
.venv/bin/python -m trainer train "${C[@]}" train.run_name="$name-seed$seed" train.seed="$seed" "$@"
.venv/bin/python -m trainer eval "${C[@]}" train.run_name="$name-seed$seed" train.seed="$seed" "$@"
echo "wall seconds: $(( $(date +%s) - t0 ))"
