"""The GPU benchmark's workloads, as preference files refdpo reads (bench/workloads.py's
format: prompt as messages, chosen and rejected as text).

(a) the rasbt instruction pairs, one user turn each (bench.workloads.instruction_pairs);
(b) long multi-turn chats with a short final answer: many earlier user/assistant turns drawn
    from the same file, then an addition question from the demo task, answered by the bare
    equation (chosen) or by rambling or a wrong sum (rejected). With 64-96 earlier turns the
    prompts are 2.3k-3.6k tokens with SmolLM2's chat template (median 3.1k), answers 10-33:
    the shape where scoring the prompt once per pair matters most.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from bench.workloads import _user_turn, instruction_pairs
from refdpo.demo.task import make_rows

WORKLOADS = {
    "a": "rasbt instruction pairs (short prompts)",
    "b": "long multi-turn chats (prompts of a few thousand tokens, short answers)",
}


def long_chat_pairs(source: Path, count: int, turns: tuple[int, int], seed: int = 0) -> list[dict]:
    """Workload (b): `count` chats of turns[0]..turns[1] earlier turns each."""
    history = json.loads(Path(source).read_text())
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        messages = []
        for row in rng.sample(history, rng.randint(*turns)):
            messages += [
                {"role": "user", "content": _user_turn(row)},
                {"role": "assistant", "content": row["output"]},
            ]
        pair = make_rows(rng.randint(1, 99), rng.randint(1, 99), rng)
        pairs.append({
            "id": f"long-chat-{i}", "prompt": messages + pair["prompt"],
            "chosen": pair["chosen"], "rejected": pair["rejected"],
        })  # fmt: skip
    return pairs


def make_pairs(workload: str, source: Path, count: int, turns: tuple[int, int]) -> list[dict]:
    if workload == "a":
        return instruction_pairs(source, count)
    return long_chat_pairs(source, count, turns)
