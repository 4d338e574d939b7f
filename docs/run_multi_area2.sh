#!/usr/bin/env bash
# toy-multi with a weaker area prior (docs/results.md "Multi-class"): from the binary champion, then from
# scratch. Needs what docs/run_multi.sh builds first (data/toy-multi, runs/multi/g-seed0, the champion in
# runs/multi/mlflow.db).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
DB="sqlite:///$PWD/runs/multi/mlflow.db"
COMMON=(-c configs/toy_multi.yaml data.image_size=64 train.out_dir=runs/multi mlflow.tracking_uri="$DB"
        mlflow.artifact_location="$PWD/runs/multi/mlartifacts" train.threads=1
        classifier.checkpoint=runs/multi/g-seed0/classifier.pt objective.area_weight=2 objective.absent_weight=0)
for run in from-champion-area2 scratch-area2; do
  init=()
  [ "$run" = from-champion-area2 ] && init=(model.init_from=models:/wsssrec-segmenter@champion)
  t0=$(date +%s)
  .venv/bin/python -m trainer train "${COMMON[@]}" train.run_name=$run-seed0 train.steps=300 "${init[@]}"
  .venv/bin/python -m trainer eval "${COMMON[@]}" train.run_name=$run-seed0
  echo "$run seconds=$(( $(date +%s) - t0 ))"
done
