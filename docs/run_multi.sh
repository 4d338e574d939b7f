#!/usr/bin/env bash
# toy-multi experiments of docs/results.md "Multi-class (toy-multi)", as run: one at a time, 1 thread, nice 10.
# Needs data/toy-multi (wsssrec data toy-multi --out data/toy-multi) and the binary reference run
# runs/ref/best-seed0 (docs/run_reference.sh). Timings go to logs/multi_exp.times.
cd /work/main
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu MLFLOW_TRACKING_URI=sqlite:////work/main/runs/multi/mlflow.db
DB=sqlite:////work/main/runs/multi/mlflow.db
COMMON="-c configs/toy_multi.yaml data.image_size=64 train.out_dir=runs/multi mlflow.tracking_uri=$DB mlflow.artifact_location=/work/main/runs/multi/mlartifacts train.threads=1 classifier.checkpoint=runs/multi/g-seed0/classifier.pt"
STEPS=${STEPS:-300}
step() {  # name, command...
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*"
  nice -n 10 "$@"; local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a logs/multi_exp.times
}
mkdir -p runs/multi
step g .venv/bin/python -m trainer train-classifier $COMMON train.run_name=g-seed0 classifier.epochs=1
step cam .venv/bin/python -m trainer eval $COMMON train.run_name=cam-seed0 --cam-only
step champion-register .venv/bin/python -m trainer registry add runs/ref/best-seed0/segmenter.pt --classifier runs/ref/g-seed0/classifier.pt --alias champion --tracking-uri $DB
step scratch-train .venv/bin/python -m trainer train $COMMON train.run_name=scratch-seed0 train.steps=$STEPS
step scratch-eval .venv/bin/python -m trainer eval $COMMON train.run_name=scratch-seed0
step champ-train .venv/bin/python -m trainer train $COMMON train.run_name=from-champion-seed0 train.steps=$STEPS model.init_from=models:/wsssrec-segmenter@champion
step champ-eval .venv/bin/python -m trainer eval $COMMON train.run_name=from-champion-seed0
