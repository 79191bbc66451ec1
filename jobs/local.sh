#!/usr/bin/env bash
# Both stages on one machine without SLURM, with the same settings as jobs/pipeline.sh.
#
#   MODEL=/models/sft DATASET=/data/pairs.jsonl WORK=/tmp/dpo NPROC=1 jobs/local.sh
#
# NPROC processes per stage (torchrun for stage one, the deepspeed launcher for stage two).
# Rerunning after an interruption resumes both stages.
#
# Stopping: SIGTERM, SIGINT (Ctrl-C), SIGHUP or SIGUSR1 to this script, or SIGTERM to its
# process group, asks for a stop: every rank finishes its step, saves a checkpoint and exits
# 75; this script waits for that and exits 75 (rerun it to resume). In stage one the workers
# stop at once (complete shards are kept), exit 75 too. SIGQUIT (Ctrl-\) kills without saving.
# Why each stage runs in a process group of its own (set -m), signalled only from here: on one
# node the deepspeed runner installs no signal handler (only multi-node runs get one), so a
# signal kills it and orphans the ranks, which train on; and a signalled launch.py exits 1 and
# SIGKILLs the ranks 30 s later, maybe mid-save. So in stage two the signal goes to the ranks
# only (launch.py's children, also those started after it), once each; launch.py and the runner
# then exit with the ranks' code. In stage one it goes to the group; torchrun passes it on.
set -euo pipefail
: "${MODEL:?set MODEL to the reference model folder}"
: "${DATASET:?set DATASET to the preference data}"
: "${WORK:?set WORK to a folder for shards and the run}"
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-1}
MASTER_PORT=${MASTER_PORT:-29500}
read -r -a precompute_args <<< "${PRECOMPUTE_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"

stage="" pid="" stop="" signalled=" "
forward() {  # pass a pending stop request on to processes of the stage not yet signalled
  [ -n "$stop" ] && [ -n "$pid" ] || return 0
  local targets=("-$pid") launch target
  if [ "$stage" = train ]; then
    launch=$(pgrep -d, -g "$pid" -f 'deepspeed\.launcher\.launch' || true)
    read -r -a targets <<< "$([ -z "$launch" ] || pgrep -P "$launch" | tr '\n' ' ')"
  fi
  for target in "${targets[@]}"; do
    [[ $signalled == *" $target "* ]] && continue
    kill -s "$stop" -- "$target" 2>/dev/null || true
    signalled+="$target "
  done
}
trap 'stop=${stop:-TERM}; forward' TERM HUP
trap 'stop=${stop:-INT}; forward' INT
trap 'stop=${stop:-USR1}; forward' USR1
trap '[ -z "$pid" ] || kill -s KILL -- "-$pid" 2>/dev/null || true' QUIT

run_stage() {  # run_stage NAME COMMAND...: run it in its own process group, return its code
  stage=$1 signalled=" "
  shift
  set -m
  "$@" &
  pid=$!
  set +m
  while kill -0 "$pid" 2>/dev/null; do  # poll: reaches ranks that start after a signal
    forward
    sleep 1 &
    wait "$!" || true  # a signal interrupts this wait and runs its trap at once
  done
  wait "$pid"
}

rc=0
[ -n "$stop" ] || run_stage precompute "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" \
  --master-port "$MASTER_PORT" -m refdpo.precompute.run --model "$MODEL" --dataset "$DATASET" \
  --output "$WORK/shards" "${precompute_args[@]}" || rc=$?
if [ -n "$stop" ]; then exit 75; fi  # stopped in stage one: rerun to finish the shards
[ "$rc" -eq 0 ] || exit "$rc"

run_stage train "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$MASTER_PORT" \
  --module refdpo.train.run --shards "$WORK/shards" --eval-shards auto --model "$MODEL" \
  --output-dir "$WORK/run" --resume-from-checkpoint auto "${train_args[@]}" || rc=$?
exit "$rc"
