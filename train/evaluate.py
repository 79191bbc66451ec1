"""refdpo eval: how a model does on preference shards and on prompts.

Pairwise: the implicit DPO rewards beta * (log pi - log ref) of every chosen and rejected
response in a shard folder, with the stored reference values: reward accuracy (chosen above
rejected) and mean margin. Generation: greedy answers to a JSON/JSONL file of prompts (text
or chat messages, chat template applied to messages); when rows carry an `answer`, the share
whose whole answer is that text (exact match).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch

from refdpo.shared.dist import setup_logging
from refdpo.shared.errors import InputError, MissingPath, run_command
from refdpo.shared.logprobs import packer_for, pad_multiple_for, pair_logps
from refdpo.shared.models import load_model, load_tokenizer, resolve_device
from refdpo.shared.shards import read_manifest
from refdpo.shared.tokens import tokenizer_fingerprint
from refdpo.train.data import collate, eval_batches, open_shards

logger = logging.getLogger("refdpo.eval")
TIE = 1e-4  # |reward margin| this small is float noise between two computations of one model


def exact_match(generation: str, answer: str) -> bool:
    """The whole generation is the answer: surrounding whitespace and a final period allowed."""
    return re.fullmatch(rf"\s*{re.escape(answer)}\.?\s*", generation) is not None


@torch.no_grad()
def pairwise(
    model, tokenizer, shards: str | Path, beta: float, batch_size: int = 8
) -> dict[str, float]:
    """Reward accuracy, margin and sigmoid-DPO loss of `model` on every pair of a shard folder."""
    manifest = open_shards(shards, tokenizer_fingerprint(tokenizer), model.config.vocab_size)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    packer = packer_for(model.config)
    device = next(model.parameters()).device
    pad_multiple = pad_multiple_for(device, model.config._attn_implementation)
    margins = []
    for rows, _ in eval_batches(shards, manifest, batch_size, world=1, rank=0):
        batch = collate(rows, pad_id, packer, pad_multiple)
        out = pair_logps(model, batch.packed)
        chosen = beta * (out.chosen_logps.cpu() - batch.reference_chosen_logps)
        rejected = beta * (out.rejected_logps.cpu() - batch.reference_rejected_logps)
        margins.append(chosen - rejected)
    margin = torch.cat(margins)
    # a tie (the reference itself, up to float noise) counts half, so chance level is 0.5
    ties = margin.abs() <= TIE
    return {
        "pairs": len(margin),
        "reward_accuracy": float(((margin > TIE).float() + 0.5 * ties.float()).mean()),
        "reward_margin": float(margin.mean()),
        "loss": float(-torch.nn.functional.logsigmoid(margin).mean()),
    }


def read_prompts(path: str | Path) -> list[dict]:
    try:
        text = Path(path).read_text()
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except FileNotFoundError:
        raise MissingPath(f"--prompts {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise InputError(f"--prompts {path}: not JSON or JSON Lines ({err})") from None
    return [r for r in rows if isinstance(r, dict) and "prompt" in r]


@torch.no_grad()
def generate(
    model, tokenizer, rows: list[dict], max_new_tokens: int = 32, batch_size: int = 16
) -> list[dict]:
    """Greedy generations, batched with left padding; exact-match scored where `answer` is given."""
    tokenizer.padding_side = "left"
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    results = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            if isinstance(r["prompt"], list)
            else r["prompt"]
            for r in chunk
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
            model.device
        )
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :], strict=True):
            generation = tokenizer.decode(ids, skip_special_tokens=True)
            result = {"prompt": row["prompt"], "generation": generation}
            if "answer" in row:
                result |= {
                    "answer": row["answer"],
                    "correct": exact_match(generation, str(row["answer"])),
                }
            results.append(result)
    return results


def evaluate_model(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    dtype = args.dtype
    if dtype == "auto":  # as stage two does: the reference's own dtype makes ties exact
        stored = read_manifest(Path(args.shards))["provenance"]["dtype"] if args.shards else None
        dtype = stored if stored in ("fp32", "bf16") else "fp32"
    model = load_model(args.model, args.adapter, dtype, "auto", device).eval()
    summary: dict = {"model": args.model, "adapter": args.adapter}
    if args.shards:
        summary["pairwise"] = pairwise(model, tokenizer, args.shards, args.beta, args.batch_size)
    if args.prompts:
        rows = read_prompts(args.prompts)[: args.limit]
        generations = generate(model, tokenizer, rows, args.max_new_tokens, args.batch_size)
        scored = [g["correct"] for g in generations if "correct" in g]
        summary["generation"] = {
            "prompts": len(generations),
            "exact_match": sum(scored) / len(scored) if scored else None,
        }
        if args.output:
            with open(Path(args.output) / "generations.jsonl", "w") as fh:
                fh.writelines(json.dumps(g) + "\n" for g in generations)
        summary["examples"] = generations[:5]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="refdpo eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a model folder (e.g. a run's final/)")
    parser.add_argument("--adapter", help="a PEFT adapter folder applied to --model")
    parser.add_argument("--shards", help="a shard folder: pairwise reward accuracy and margins")
    parser.add_argument(
        "--prompts", help="JSON/JSONL rows with `prompt` (and `answer`): greedy generations"
    )
    parser.add_argument("--output", help="folder for summary.json and generations.jsonl")
    parser.add_argument(
        "--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="model dtype; auto: the dtype --shards were scored in (fp32 without --shards)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--verbose", action="store_true", help="also other libraries' info lines and progress bars"
    )
    args = parser.parse_args(argv)
    if not args.shards and not args.prompts:
        parser.error("give --shards, --prompts or both")
    setup_logging(0, 1, verbose=args.verbose)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)
    return run_command(lambda: report(args), logger)


def report(args: argparse.Namespace) -> int:
    summary = evaluate_model(args)
    text = json.dumps(summary, indent=2)
    if args.output:
        (Path(args.output) / "summary.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
