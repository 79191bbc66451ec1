"""How each system is run for the benchmark: one subprocess per run, timed from outside.

Every run is a fresh process, as a user would launch it, so its peak resident set is its
own and nothing is shared between systems. What each returns:
  refdpo stage one:  wall seconds, the scoring pass's seconds (from its log), pairs scored.
  refdpo stage two:  per-step losses and seconds, peak memory (from metrics.jsonl).
  TRL:               the same fields, from bench/trl_worker.py's JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REFDPO = "refdpo"
TRL_ONLINE = "trl-online"
TRL_PRECOMPUTE = "trl-precompute"
SCORING_LINE = re.compile(
    r"train split: wrote \d+ shard\(s\), (\d+) pairs, \d+ dropped, in ([\d.]+) s"
)


class BenchError(RuntimeError):
    """A benchmarked run failed; the message holds the command and the end of its output."""


@dataclass
class Settings:
    """What every system is given identically."""

    model: str
    batch_size: int
    steps: int
    learning_rate: float
    dtype: str
    max_length: int
    max_prompt_length: int
    threads: int
    seed: int = 0


def environment(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    if not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, str]:
    """Run to completion; (wall seconds, combined output). The output is kept in `log`."""
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(cmd) + "\n\n" + output)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}\nexit {result.returncode}; see {log}:\n{output[-3000:]}")
    return wall, output


def refdpo_stage_one(s: Settings, dataset: Path, output: Path, log: Path) -> dict:
    cmd = [
        sys.executable, "-m", "refdpo.precompute.run", "--model", s.model, "--dataset", str(dataset),
        "--output", str(output), "--overwrite", "--batch-size", str(s.batch_size),
        "--max-length", str(s.max_length), "--max-prompt-length", str(s.max_prompt_length),
        "--dtype", s.dtype, "--keep-text", "false",
    ]  # fmt: skip
    wall, output_text = _run(cmd, environment(s.threads), log)
    found = SCORING_LINE.search(output_text)
    if not found:
        raise BenchError(f"no scoring summary line in {log}")
    return {"wall_seconds": wall, "pairs": int(found[1]), "scoring_seconds": float(found[2])}


def refdpo_train(
    s: Settings, shards: Path, output: Path, beta: float, log: Path, extra: list[str] = ()
) -> dict:
    cmd = [
        sys.executable, "-m", "refdpo.train.run", "--shards", str(shards), "--model", s.model,
        "--output", str(output), "--micro-batch-size", str(s.batch_size),
        "--max-steps", str(s.steps), "--learning-rate", str(s.learning_rate),
        "--lr-scheduler", "constant", "--warmup-ratio", "0", "--beta", str(beta),
        "--zero-stage", "0", "--export", "none", "--seed", str(s.seed),
        "--dtype", s.dtype, "--logging-steps", "1", "--overwrite-output-dir", *extra,
    ]  # fmt: skip
    wall, _ = _run(cmd, environment(s.threads), log)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    steps = sorted(train)
    return {
        "wall_seconds": wall,
        "losses": [train[k]["loss"] for k in steps],
        "step_seconds": [train[k]["step_seconds"] for k in steps],
        "peak_memory_mb": max(train[k]["peak_memory_mb"] for k in steps),
    }


def trl_train(s: Settings, mode: str, pairs: Path, output: Path, beta: float, log: Path) -> dict:
    result_file = output / "result.json"
    cmd = [
        sys.executable, "-m", "bench.trl_worker", "--model", s.model, "--pairs", str(pairs),
        "--mode", mode, "--batch-size", str(s.batch_size), "--steps", str(s.steps),
        "--learning-rate", str(s.learning_rate), "--beta", str(beta), "--dtype", s.dtype,
        "--seed", str(s.seed), "--out", str(result_file),
    ]  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    wall, _ = _run(cmd, environment(s.threads), log)
    result = json.loads(result_file.read_text())
    memory = result.get("cuda_max_memory_mb") or result["peak_rss_mb"]
    return {
        "wall_seconds": wall,
        "losses": result["losses"],
        "step_seconds": result["step_seconds"],
        "peak_memory_mb": memory,
        "precompute_seconds": result.get("precompute_seconds"),
        "precompute_pairs": result.get("precompute_pairs"),
    }
