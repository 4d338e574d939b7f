cd /work/main
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
DB=sqlite:////work/main/runs/multi/mlflow.db
COMMON="-c configs/toy_multi.yaml data.image_size=64 train.out_dir=runs/multi mlflow.tracking_uri=$DB mlflow.artifact_location=/work/main/runs/multi/mlartifacts train.threads=1 classifier.checkpoint=runs/multi/g-seed0/classifier.pt"
t0=$(date +%s)
.venv/bin/python -m trainer train $COMMON train.run_name=from-champion-area2-seed0 train.steps=300 model.init_from=models:/wsssrec-segmenter@champion objective.area_weight=2 objective.absent_weight=0
.venv/bin/python -m trainer eval $COMMON train.run_name=from-champion-area2-seed0 objective.area_weight=2 objective.absent_weight=0
echo "seconds=$(( $(date +%s) - t0 ))"
