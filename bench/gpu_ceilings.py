"""The ceilings: a plain causal prefill (stage one's) and a plain causal SFT step (stage
two's) on the same number of tokens, in one process per model and workload:

    python -m bench.gpu_ceilings SPEC.json RESULTS.jsonl

SPEC: {"model": DIR, "dtype": "bf16"|"fp32", "lora": bool, "parts": [{"name", "kind":
"prefill"|"sft", "rows", "row_len", "logit_positions", "steps", "warmup"}, ...]}.

Each step runs `rows` packed rows of `row_len` tokens (about one pair each) with plain
causal attention: the model's SDPA path with no mask, i.e. `is_causal` (flash kernels on a
GPU), no pair mask, no packing bookkeeping. Like refdpo, the output layer runs only on as
many positions as the pairs have completion tokens (`logit_positions` per row, the end of
each row): prefill = decoder forward + lm_head + fp32 log-softmax there, under
inference_mode; SFT = the same with cross-entropy, backward, gradient clipping at 1.0 and a
fused AdamW step (bf16 weights and moments on a GPU: no fp32 master copy, cheaper than
refdpo's mixed precision, so a ceiling). With "lora": LoRA adapters as `refdpo train
--use-peft` makes them (rank 16, alpha 32, all linear layers), only they are trained (the
prefill runs the plain model, as stage one does).

One JSON line per part: step seconds, tokens and attention pairs per step, and the CUDA
peak from a reset at the part's start (weights included), or the error that stopped it (an
out-of-memory stops that part only).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time

import torch

from bench.gpu_flops import causal_attended


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(spec: dict, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dtype, attn_implementation="sdpa", **kwargs
    )
    model.config.use_cache = False
    return model


def with_lora(model):
    """LoRA adapters as `refdpo train --use-peft` adds them by default; the rest frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, config)


def rows_of(part: dict, vocab: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (part["rows"], part["row_len"])
    return torch.randint(0, vocab, shape, generator=generator).to(device)


def prefill_step(model, ids: torch.Tensor, k: int) -> None:
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, -k - 1 : -1]).float()
        logps = logits.log_softmax(-1).gather(-1, ids[:, -k:, None])
        logps.sum().item()  # on the host: the step is done


def sft_step(model, optimizer, ids: torch.Tensor, k: int, params: list) -> None:
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, -k - 1 : -1]).float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -k:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_part(model, part: dict, device: torch.device) -> dict:
    vocab = min(model.config.vocab_size, 49152)  # ids the benchmark's tokenizer can produce
    ids = rows_of(part, vocab, device)
    k = max(1, min(part["logit_positions"], part["row_len"] - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if part["kind"] == "sft":
        model.train()
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, **fused)
    else:
        model.eval()
    seconds = []
    for _ in range(part["warmup"] + part["steps"]):
        sync(device)
        started = time.perf_counter()
        if optimizer is None:
            prefill_step(model, ids, k)
        else:
            sft_step(model, optimizer, ids, k, params)
        sync(device)
        seconds.append(time.perf_counter() - started)
    del optimizer
    return {
        "step_seconds": seconds[part["warmup"] :],
        "warmup_seconds": seconds[: part["warmup"]],
        "tokens_per_step": part["rows"] * part["row_len"],
        "attended_per_step": part["rows"] * causal_attended(part["row_len"]),
        "logit_positions_per_step": part["rows"] * k,
    }


def main(argv: list[str]) -> int:
    spec_file, results_file = argv
    with open(spec_file) as f:
        spec = json.load(f)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model = load(spec, device)
    load_seconds = time.perf_counter() - started
    wrapped = False
    with open(results_file, "a") as out:
        for part in spec["parts"]:
            for p in model.parameters():
                p.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            lora = part["kind"] == "sft" and bool(spec.get("lora"))
            if lora and not wrapped:  # the prefill runs the plain model
                model, wrapped = with_lora(model), True
            record = {**part, "lora": lora, "load_seconds": load_seconds}
            try:
                record.update(run_part(model, part, device))
            except torch.OutOfMemoryError as err:
                record["error"] = f"CUDA out of memory: {str(err).splitlines()[0]}"
            cuda = device.type == "cuda"
            record["cuda_max_memory_mb"] = (
                torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
            )
            record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out.write(json.dumps(record) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
