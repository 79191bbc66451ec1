#!/usr/bin/env bash
# Both stages on SLURM: submit stage one, then stage two to start when it succeeds.
#
#   MODEL=/models/sft DATASET=/data/pairs.jsonl WORK=/scratch/dpo jobs/pipeline.sh
#
# Shards go to $WORK/shards (and $WORK/shards-eval when PRECOMPUTE_ARGS asks for an eval
# split, which training then evaluates on), the run to $WORK/run. PRECOMPUTE_ARGS and TRAIN_ARGS add options to each stage;
# SBATCH_ARGS adds sbatch options (partition, account, ...) to both submissions.
set -euo pipefail
: "${MODEL:?set MODEL to the reference model folder}"
: "${DATASET:?set DATASET to the preference data}"
: "${WORK:?set WORK to a folder for shards and the run}"
read -r -a precompute_args <<< "${PRECOMPUTE_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs

precompute_id=$(MODEL="$MODEL" DATASET="$DATASET" OUTPUT="$WORK/shards" \
  sbatch --parsable "${sbatch_args[@]}" "$here/precompute.sbatch" "${precompute_args[@]}")
echo "stage one: job $precompute_id"

train_id=$(SHARDS="$WORK/shards" MODEL="$MODEL" OUTPUT="$WORK/run" \
  sbatch --parsable --dependency="afterok:$precompute_id" "${sbatch_args[@]}" \
  "$here/train.sbatch" "${train_args[@]}")
echo "stage two: job $train_id (starts when $precompute_id succeeds)"
