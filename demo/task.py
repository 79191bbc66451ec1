"""A built-in preference task whose effect is measurable without a judge: short additions.

Prompt: "What is a + b?" as a user turn. Chosen: the bare equation "a + b = s". Rejected:
either the right equation followed by rambling (what SmolLM2-135M-Instruct does before
training), or a wrong equation. A trained model should answer with the correct equation and
stop, which `refdpo.train.evaluate.exact_match` checks on held-out prompts. Train and held-out
prompts never share an (a, b) pair.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUESTION = "What is {a} + {b}?"
ANSWER = "{a} + {b} = {s}"
RAMBLING = [
    "\n\nThis is a classic example of addition, one of the four basic operations of arithmetic.",
    "\n\nTo add two numbers, we combine their values. Let me know if you need anything else!",
    "\n\nAddition is commutative, so the order of the numbers does not change the result.",
]


def _pairs(seed: int, low: int, high: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(seed).shuffle(pairs)
    return pairs


def make_rows(a: int, b: int, rng: random.Random) -> dict:
    answer = ANSWER.format(a=a, b=b, s=a + b)
    if rng.random() < 0.5:
        rejected = answer + rng.choice(RAMBLING)
    else:
        rejected = ANSWER.format(a=a, b=b, s=a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
    prompt = [{"role": "user", "content": QUESTION.format(a=a, b=b)}]
    return {
        "id": f"add-{a}-{b}",
        "prompt": prompt,
        "chosen": answer,
        "rejected": rejected,
        "answer": answer,
    }


def generate(
    folder: str | Path,
    seed: int = 0,
    train: int = 600,
    held_out: int = 100,
    low: int = 1,
    high: int = 30,
) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl (conversational pairs with an `answer` field).

    Returns their paths. The (a, b) combinations are split before any row is made, so no
    held-out prompt appears in training.
    """
    combos = _pairs(seed, low, high)
    if train + held_out > len(combos):
        raise ValueError(f"only {len(combos)} distinct additions between {low} and {high}")
    rng = random.Random(seed + 1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, chosen in (
        ("eval", combos[:held_out]),
        ("train", combos[held_out : held_out + train]),
    ):
        paths[name] = folder / f"{name}.jsonl"
        with open(paths[name], "w") as fh:
            for a, b in chosen:
                fh.write(json.dumps(make_rows(a, b, rng)) + "\n")
    return paths
