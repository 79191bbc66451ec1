#!/usr/bin/env bash
# Both stages on one machine without SLURM, with the same settings as jobs/pipeline.sh.
#
#   MODEL=/models/sft DATASET=/data/pairs.jsonl WORK=/tmp/dpo NPROC=1 jobs/local.sh
#
# NPROC processes per stage (torchrun for stage one, the deepspeed launcher for stage two).
# Rerunning after an interruption resumes both stages.
set -euo pipefail
: "${MODEL:?set MODEL to the reference model folder}"
: "${DATASET:?set DATASET to the preference data}"
: "${WORK:?set WORK to a folder for shards and the run}"
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a precompute_args <<< "${PRECOMPUTE_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"

"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port "$MASTER_PORT" \
  -m refdpo.precompute.run --model "$MODEL" --dataset "$DATASET" --output "$WORK/shards" \
  "${precompute_args[@]}"

"$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
  --module refdpo.train.run --shards "$WORK/shards" --eval-shards auto --model "$MODEL" \
  --output-dir "$WORK/run" --resume-from-checkpoint auto "${train_args[@]}"
