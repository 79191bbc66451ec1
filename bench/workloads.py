"""The two benchmark workloads, written as conversational preference files refdpo and TRL both read.

(a) instruction pairs: the ../shared/data rows as they are, one user turn (instruction, then
    the input after a blank line) and the two responses: short prompts, medium responses.
(b) long multi-turn chats with short answers, the shape of Anthropic HH: 3-6 earlier
    user/assistant turns taken from the same file, then an addition question from the demo
    task, answered by the bare equation (chosen) or by rambling or a wrong sum (rejected).
    Most tokens are prompt, which is where scoring the prompt once per pair pays.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from refdpo.demo.task import make_rows


def _user_turn(row: dict) -> str:
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def instruction_pairs(source: Path, count: int) -> list[dict]:
    """Workload (a): the first `count` rows of the instruction-preference file."""
    rows = json.loads(Path(source).read_text())
    if count > len(rows):
        raise ValueError(f"{source} has {len(rows)} rows; the benchmark asks for {count}")
    return [
        {
            "id": f"instruction-{i}",
            "prompt": [{"role": "user", "content": _user_turn(row)}],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        for i, row in enumerate(rows[:count])
    ]


def chat_pairs(source: Path, count: int) -> list[dict]:
    """Workload (a) in the conversational preference format TRL's users give DPOTrainer:
    prompt, chosen and rejected as message lists, no other column (refdpo reads it too)."""
    return [
        {
            "prompt": row["prompt"],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in instruction_pairs(source, count)
    ]


def multiturn_pairs(source: Path, count: int, seed: int = 0) -> list[dict]:
    """Workload (b): long chat histories from `source`, a short final answer."""
    history = json.loads(Path(source).read_text())
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        turns = []
        for row in rng.sample(history, rng.randint(3, 6)):
            turns += [
                {"role": "user", "content": _user_turn(row)},
                {"role": "assistant", "content": row["output"]},
            ]
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        pair = make_rows(a, b, rng)
        pairs.append(
            {
                "id": f"multiturn-{i}",
                "prompt": turns + pair["prompt"],
                "chosen": pair["chosen"],
                "rejected": pair["rejected"],
            }
        )
    return pairs


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
