#!/usr/bin/env bash
# The GPU checks of the bf16 / ZeRO-3 path in one short run (a few minutes on one GPU):
#
#   MODEL=<SmolLM2-135M-Instruct folder> bash bench/gpu_check.sh OUT
#
# 1. stage one with its defaults (dtype auto: bf16 on a GPU) on 64 ../shared/data pairs;
# 2. stage two with its defaults (dtype from the shards, ZeRO-0 on one rank): the step-0 line;
# 3. stage two under ZeRO-3 on one GPU through the deepspeed launcher, with accumulation;
# 4. the cuDNN masked-SDPA backward at a row length of 64 mod 128, with and without refdpo's
#    padding to 128 (NaN gradients expected only without it, on Hopper).
# Every command's output is kept in OUT; OUT/summary.txt collects the lines that matter.
# On a CPU machine it runs too (smaller, no cuDNN check): that is how it was tested.
set -euo pipefail
: "${MODEL:?set MODEL to the model folder (refdpo fetch-demo-model prints it)}"
OUT=${1:?usage: MODEL=... bash bench/gpu_check.sh OUT}
PYTHON=${PYTHON:-python}
DATA=${DATA:-../shared/data/instruction-data-with-preference.json}
LIMIT=${LIMIT:-64}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"

"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$summary"

"$PYTHON" -m refdpo.precompute.run --config jobs/instruction-data.yaml --dataset "$DATA" \
  --model "$MODEL" --output "$OUT/shards" --limit "$LIMIT" --eval-fraction 0 --overwrite \
  > "$OUT/precompute.log" 2>&1
grep -E "loading reference|wrote [0-9]+ shard" "$OUT/precompute.log" | tee -a "$summary"

"$PYTHON" -m refdpo.train.run --model "$MODEL" --shards "$OUT/shards" --output "$OUT/run-defaults" \
  --max-steps "$STEPS" > "$OUT/train-defaults.log" 2>&1 || true
grep -E "step-0 check|policy .* built|trained to step|Error|error" "$OUT/train-defaults.log" \
  | tee -a "$summary"

"$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 --master_port 29561 --module refdpo.train.run \
  --model "$MODEL" --shards "$OUT/shards" --output "$OUT/run-zero3" --max-steps 4 \
  --zero-stage 3 --micro-batch-size 2 --gradient-accumulation-steps 2 --export none \
  > "$OUT/train-zero3.log" 2>&1 || true
grep -E "step-0 check|policy .* built|trained to step|Error|error" "$OUT/train-zero3.log" \
  | tee -a "$summary"

for run in run-defaults run-zero3; do
  if [ -f "$OUT/$run/metrics.jsonl" ]; then
    "$PYTHON" - "$OUT/$run/metrics.jsonl" "$run" <<'EOF' | tee -a "$summary"
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if '"train"' in x]
print(sys.argv[2], "losses", [round(r["loss"], 5) for r in rows],
      "grad_norm", [round(r["grad_norm"], 4) for r in rows],
      "pairs/s", round(sorted(r["pairs_per_s"] for r in rows[1:] or rows)[len(rows[1:] or rows) // 2], 2),
      "peak MB", max(r["peak_memory_mb"] for r in rows))
EOF
  fi
done

"$PYTHON" - <<'EOF' | tee -a "$summary"
import torch
from refdpo.shared.logprobs import attention_bias, pack_pairs
if not torch.cuda.is_available():
    print("cudnn check: skipped (no CUDA)")
    raise SystemExit
torch.manual_seed(0)
for multiple in (1, 128):
    batch = pack_pairs([[1] * 100], [[2] * 50], [[3] * 42], 0, pad_multiple=multiple)  # 192
    length = batch.input_ids.shape[1]
    q, k, v = (torch.randn(1, 8, length, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    mask = attention_bias(batch.pair_index.cuda(), batch.part.cuda(), torch.bfloat16)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    bad = sum(int(torch.isnan(t.grad).sum()) for t in (q, k, v))
    print(f"cudnn check: row length {length} (mod 128 = {length % 128}): {bad} NaN gradients")
EOF
echo "summary in $summary"
