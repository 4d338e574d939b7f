#!/usr/bin/env bash
# Issue 19: the binary champion that `model.init_from` starts a toy-multi run from: toy-birds (96 px) data, g and
# the default stage 2 (configs/toy_birds.yaml), seed S, in runs/bin/binary-seedS. usage: docs/binary_run.sh S
set -euo pipefail
cd "$(dirname "$0")/.."
seed=$1
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MLFLOW_TRACKING_URI=sqlite:///$PWD/runs/bin/mlflow-$seed.db
mkdir -p runs/bin
t0=$(date +%s)
[ -f data/toy-birds/manifest.json ] || .venv/bin/wsssrec data toy-birds --out data/toy-birds --seed 0
C=(-c configs/toy_birds.yaml train.out_dir=runs/bin train.threads=1 mlflow.register=false
   classifier.checkpoint=runs/bin/g-seed$seed/classifier.pt mlflow.artifact_location=$PWD/runs/bin/mlartifacts)
.venv/bin/python -m trainer train-classifier "${C[@]}" train.run_name=g-seed$seed train.seed=$seed
.venv/bin/python -m trainer train "${C[@]}" train.run_name=binary-seed$seed train.seed=$seed
echo "wall seconds: $(( $(date +%s) - t0 ))"
