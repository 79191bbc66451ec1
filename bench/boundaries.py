"""What the token-boundary and end-token rules (shared/tokens.py) change in the stored
reference log-probs, on SmolLM2-135M-Instruct and the first pairs of ../shared/data.

    python -m bench.boundaries [--pairs 40] [--model DIR]

Three cases, each scored by the reference with a plain forward per sequence, the former
tokenization beside today's:
1. a prompt template ending in a space (`...\\n\\nAnswer: `): the former rule tokenized the
   prompt and the completion apart, so the completion began with a word without its space
   after a lone space token; today's rule keeps the joined text's tokens. Reported: the mean
   log-prob of the first completion token.
2. a text completion that already ends with the EOS text (`... <|im_end|>`): the former rule
   appended a second EOS. Reported: the mean log-prob of that extra token.
3. a ChatML tokenizer whose EOS is `<|endoftext|>` (a base model fine-tuned on ChatML, here
   SmolLM2's own tokenizer with that EOS): the former rule wrote `<|im_end|><|endoftext|>`.
   Reported: the mean log-prob of the extra `<|endoftext|>`; today's rule ends at
   `<|im_end|>`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from refdpo.shared.data import Pair
from refdpo.shared.tokens import Truncation, tokenize_pair

DATA = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "instruction-data-with-preference.json"
)
WIDE = Truncation(max_length=4096, max_prompt_length=2048)


def logps(model, ids: list[int]) -> list[float]:
    """Log-prob of each token given the ones before it (the first token gets none)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return [float("nan"), *lp.tolist()]


def question(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def first_token(model, tokenizer, rows: list[dict]) -> dict:
    old, new, moved = [], [], 0
    for row in rows:
        prompt = f"Question: {question(row)}\n\nAnswer: "
        completion = row["chosen"]
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        old.append(logps(model, p_ids + c_ids)[len(p_ids)])
        tp = tokenize_pair(Pair("x", prompt, completion, row["rejected"]), tokenizer, WIDE)
        moved += tp.boundary_moved
        new.append(logps(model, tp.prompt_ids + tp.chosen_ids)[len(tp.prompt_ids)])
    return {
        "former_first_token_logp": statistics.mean(old),
        "first_token_logp": statistics.mean(new),
        "rows_boundary_moved": moved,
    }


def extra_end(model, tokenizer, rows: list[dict], chat: bool) -> dict:
    """Log-prob of the token the former rule added after the completion's own end."""
    extra, ends_once = [], 0
    eos = tokenizer.eos_token_id
    for row in rows:
        if chat:
            pair = Pair(
                "x",
                [{"role": "user", "content": question(row)}],
                [{"role": "assistant", "content": row["chosen"]}],
                [{"role": "assistant", "content": row["rejected"]}],
            )
        else:
            prompt = f"<|im_start|>user\n{question(row)}<|im_end|>\n<|im_start|>assistant\n"
            pair = Pair("x", prompt, row["chosen"] + "<|im_end|>", row["rejected"] + "<|im_end|>")
        tp = tokenize_pair(pair, tokenizer, WIDE)
        ends_once += tp.chosen_ids.count(tp.chosen_ids[-1]) == 1
        former = tp.prompt_ids + tp.chosen_ids + [eos]  # the former rule's extra EOS
        extra.append(logps(model, former)[-1])
    return {"former_extra_token_logp": statistics.mean(extra),
            "min": min(extra), "max": max(extra), "rows_ending_once": ends_once}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--model", default=None, help="default: refdpo fetch-demo-model's")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refdpo.shared.demo_model import fetch_demo_model

    folder = args.model or str(fetch_demo_model())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = json.loads(DATA.read_text())[: args.pairs]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = {
        "pairs": len(rows),
        "prompt_ending_in_a_space": first_token(model, tokenizer, rows),
        "text_completion_ending_in_eos": extra_end(model, tokenizer, rows, chat=False),
    }
    base = AutoTokenizer.from_pretrained(folder)
    base.eos_token = "<|endoftext|>"
    results["chatml_eos_endoftext"] = extra_end(model, base, rows, chat=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
