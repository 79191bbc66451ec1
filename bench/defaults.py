"""The defaults comparison: refdpo and TRL's DPOTrainer each run as a user runs it, whole process.

No tuning flag on either side. refdpo runs the two commands a user types,

    refdpo precompute --model M --dataset D --output S --max-length L --max-prompt-length L-1 --batch-size B
    refdpo train --model M --shards S --output R --micro-batch-size B --epochs 1

with whatever defaults refdpo has when it runs (dtype, ZeRO stage, export...: read back from
the run's train_config.json and shard manifest). TRL runs bench/trl_defaults.py: DPOConfig's
defaults, the model given as a path, its own tokenization. Both read the same file of
prompt/chosen/rejected messages. The length rule is the same on both sides: TRL drops a
prompt of L tokens or more and cuts prompt + completion to L tokens (`max_length=L`), which
is refdpo's `--max-length L --max-prompt-length L-1`.

Every run is a fresh process timed from outside: wall time from launch to exit and the peak
resident set (`ru_maxrss` from `os.wait4`), and on GPU the CUDA peak each process reports.
Phases, in seconds after launch:
  refdpo train: start-up until the "training N steps" line (imports, model load, DeepSpeed
    engine), steps = the sum of metrics.jsonl's step_seconds (step 1 holds the step-0
    check), saving = from the end of the steps to the "exported" line (the "saved
    checkpoint" line without an export), rest = until the process exits.
  refdpo precompute: start-up until scoring begins (the summary line's time less its
    seconds), steps = the scoring pass, saving = until the manifest line, rest.
  TRL: from bench/trl_defaults.py's callback times, same split.
The logs' own timestamps are whole seconds, so each line is timed when it reaches this
process; the logged time is parsed as well and kept beside it as a check.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.systems import SCORING_LINE, BenchError, environment
from bench.workloads import chat_pairs, write_jsonl

REFDPO = "refdpo"
TRL = "trl"
REFDPO_CLI = [sys.executable, "-m", "refdpo.shared.cli"]  # what the `refdpo` command runs
# refdpo's log format (shared/dist.py): "HH:MM:SS [rank r/w] LEVEL logger: message"; a line
# may follow a progress bar's output on the same line, so it is searched, not matched.
LOG_LINE = re.compile(
    r"(\d\d):(\d\d):(\d\d) (?:\[rank \d+/\d+\] )?(?:INFO|WARNING|ERROR|CRITICAL) (refdpo[\w.]*): (.*)"
)
TRAIN_EVENTS = {
    "start": re.compile(r"^training (\d+) steps: (\d+) pairs, global batch (\d+)"),
    "step0": re.compile(r"^step-0 check"),
    "checkpoint": re.compile(r"^saved checkpoint "),
    "export": re.compile(r"^exported the "),
}
PRECOMPUTE_EVENTS = {"scored": SCORING_LINE, "manifest": re.compile(r"wrote _manifest\.json")}
# stage-two settings read back from train_config.json: what "refdpo's defaults" were this run
TRAIN_SETTINGS = (
    "dtype", "zero_stage", "export", "gradient_checkpointing", "packing", "length_grouping",
    "learning_rate", "lr_scheduler", "warmup_ratio", "logging_steps", "save_steps", "step0_check",
    "attn_implementation",
)  # fmt: skip
logger = logging.getLogger("bench")


@dataclass
class Timed:
    """One finished process: wall seconds, launch time (time.time()), peak resident set, and
    each output line with the seconds after launch at which it arrived."""

    wall_seconds: float
    launched: float
    peak_rss_mb: float
    lines: list[tuple[float, str]]


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> Timed:
    """Run to completion, reading its output as it comes; the output is kept in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    launched, started = time.time(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    raw, pending, lines = bytearray(), b"", []
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        seen = time.perf_counter() - started
        raw += chunk
        *done, pending = re.split(rb"[\r\n]", pending + chunk)
        lines += [(seen, d.decode(errors="replace")) for d in done if d.strip()]
    if pending.strip():
        lines.append((time.perf_counter() - started, pending.decode(errors="replace")))
    _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone: its own peak
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    output = raw.decode(errors="replace")
    log.write_text(" ".join(cmd) + "\n\n" + output)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}\nexit {proc.returncode}; see {log}:\n{output[-3000:]}")
    rss = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    return Timed(wall, launched, rss, lines)


def logged_offset(hours: str, minutes: str, seconds: str, launched: float) -> float:
    """A log line's HH:MM:SS as seconds after `launched` (local time, across midnight too)."""
    t = time.localtime(launched)
    launch = t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec + launched % 1
    offset = int(hours) * 3600 + int(minutes) * 60 + int(seconds) - launch
    return (offset + 43200) % 86400 - 43200


def log_events(timed: Timed, patterns: dict[str, re.Pattern]) -> dict[str, dict]:
    """The last refdpo log line matching each pattern: when it arrived (`seen`), the time it
    carries (`logged`, whole seconds, so up to 1 s before `seen`) and the pattern's groups."""
    found = {}
    for seen, line in timed.lines:
        entry = LOG_LINE.search(line)
        if not entry:
            continue
        for name, pattern in patterns.items():
            match = pattern.search(entry[5])
            if match:
                found[name] = {
                    "seen": seen,
                    "logged": logged_offset(*entry.groups()[:3], timed.launched),
                    "groups": list(match.groups()),
                }
    return found


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def process_record(cmd: list[str], timed: Timed, phases: dict, **extra) -> dict:
    return {
        "command": cmd,
        "wall_seconds": timed.wall_seconds,
        "peak_rss_mb": timed.peak_rss_mb,
        "phases": phases,
        **extra,
    }


def refdpo_precompute(
    model: str, dataset: Path, shards: Path, batch: int, max_length: int, env: dict, log: Path
) -> dict:
    cmd = [
        *REFDPO_CLI, "precompute", "--model", model, "--dataset", str(dataset),
        "--output", str(shards), "--max-length", str(max_length),
        "--max-prompt-length", str(max_length - 1), "--batch-size", str(batch),
    ]  # fmt: skip
    timed = run_timed(cmd, env, log)
    events = log_events(timed, PRECOMPUTE_EVENTS)
    if "scored" not in events:
        raise BenchError(f"no scoring summary line in {log}")
    scored = events["scored"]
    scoring = float(scored["groups"][1])
    done = events.get("manifest", scored)["seen"]
    phases = {
        "start_up": max(0.0, scored["seen"] - scoring),
        "steps": scoring,
        "saving": done - scored["seen"],
        "rest": timed.wall_seconds - done,
    }
    manifest = json.loads((shards / "_manifest.json").read_text())
    return process_record(
        cmd, timed, phases, events=events, pairs=int(scored["groups"][0]),
        rows=manifest["rows"], dtype=manifest["provenance"]["dtype"],
    )  # fmt: skip


def refdpo_train(model: str, shards: Path, output: Path, batch: int, env: dict, log: Path) -> dict:
    cmd = [
        *REFDPO_CLI, "train", "--model", model, "--shards", str(shards), "--output", str(output),
        "--micro-batch-size", str(batch), "--epochs", "1",
    ]  # fmt: skip
    timed = run_timed(cmd, env, log)
    events = log_events(timed, TRAIN_EVENTS)
    if "start" not in events:
        raise BenchError(f"no 'training N steps' line in {log}")
    start = events["start"]
    total_steps, rows, global_batch = map(int, start["groups"])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    saved = events.get("export") or events.get("checkpoint")
    missing, steps = [], None
    if len(train) == total_steps:
        steps = sum(r["step_seconds"] for r in train.values())
    else:
        missing.append(
            f"metrics.jsonl has {len(train)} of {total_steps} steps (logging_steps > 1): "
            "the steps and the saving are not told apart"
        )
    if not saved:
        missing.append("neither a 'saved checkpoint' nor an 'exported' line in the log")
    phases = {
        "start_up": start["seen"],
        "steps": steps,
        "saving": saved["seen"] - start["seen"] - steps if saved and steps is not None else None,
        "rest": timed.wall_seconds - saved["seen"] if saved else None,
    }
    parts = None
    if steps is not None and "checkpoint" in events:
        checkpoint_done = events["checkpoint"]["seen"]
        parts = {"checkpoint": checkpoint_done - start["seen"] - steps}
        if "export" in events:
            parts["export"] = events["export"]["seen"] - checkpoint_done
    config = json.loads((output / "train_config.json").read_text())
    exported = output / "final" / "config.json"
    return process_record(
        cmd, timed, phases, saving_parts=parts, events=events, missing=missing,
        steps=total_steps, rows=rows, pairs=total_steps * global_batch,
        losses=[train[k]["loss"] for k in sorted(train)],
        step0_check_done=events["step0"]["seen"] - start["seen"] if "step0" in events else None,
        cuda_max_memory_mb=max(r["peak_memory_mb"] for r in train.values()) if _on_cuda() else None,
        used={k: config.get(k) for k in TRAIN_SETTINGS},
        exported_dtype=json.loads(exported.read_text()).get("dtype") if exported.exists() else None,
        saved_mb={p.name: folder_mb(p) for p in sorted(output.iterdir()) if p.is_dir()},
    )  # fmt: skip


def trl_run(
    model: str, dataset: Path, output: Path, batch: int, max_length: int, env: dict, log: Path
) -> dict:
    report = output.parent / f"{output.name}-report.json"
    cmd = [
        sys.executable, "-m", "bench.trl_defaults", "--model", model, "--dataset", str(dataset),
        "--output", str(output), "--batch-size", str(batch), "--epochs", "1",
        "--max-length", str(max_length), "--report", str(report),
    ]  # fmt: skip
    timed = run_timed(cmd, env, log)
    result = json.loads(report.read_text())
    t = result["times"]
    first, last = t["step_begin"][0], t["step_end"][-1]
    saved = t["saves"][-1] if t["saves"] else last
    phases = {
        "start_up": first - timed.launched,
        "steps": last - first,
        "saving": saved - last,
        "rest": timed.wall_seconds - (saved - timed.launched),
    }
    detail = {
        "imports": t["imported"] - timed.launched,
        "dataset_load": t["dataset_loaded"] - t["imported"],
        "trainer_init": t["trainer_built"] - t["dataset_loaded"],
        "to_first_step": first - t["trainer_built"],
    }
    saved_mb: dict[str, float] = {}
    for name, size in result["saved"].items():
        top = name.split("/")[0] if "/" in name else "."
        saved_mb[top] = saved_mb.get(top, 0.0) + size / 2**20
    return process_record(
        cmd, timed, phases, detail=detail, steps=result["steps"], pairs=result["pairs"],
        rows=result["pairs_in_file"], cuda_max_memory_mb=result["cuda_max_memory_mb"],
        worker_peak_rss_mb=result["peak_rss_mb"], used=result["used"],
        saved_files=sorted(result["saved"]), saved_mb=saved_mb,
        logged_losses=result["logged_losses"], train_loss=result.get("train_loss"),
    )  # fmt: skip


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_defaults(
    model: str, source: Path, pairs: int, batch: int, max_length: int, repeats: int,
    threads: int, root: Path,
) -> dict:  # fmt: skip
    """Both systems, `repeats` times in alternating order, on the first `pairs` rows of
    `source` as chat messages; one epoch of batches of `batch` pairs."""
    folder = root / "defaults"
    dataset = write_jsonl(chat_pairs(source, pairs), folder / "pairs.jsonl")
    logs = folder / "logs"
    logger.info("defaults comparison: %d pairs, batch %d, max length %d", pairs, batch, max_length)
    runs = []
    for repeat in range(repeats):
        order = [REFDPO, TRL] if repeat % 2 == 0 else [TRL, REFDPO]
        for system in order:
            tag = f"{system}-r{repeat}"
            work = folder / tag
            shutil.rmtree(work, ignore_errors=True)  # what an interrupted earlier run left
            env = {**environment(threads), "HF_DATASETS_CACHE": str(work / "datasets-cache")}
            if system == REFDPO:
                shards, train_dir = work / "shards", work / "train"
                one = refdpo_precompute(
                    model, dataset, shards, batch, max_length, env, logs / f"{tag}-precompute.log"
                )
                two = refdpo_train(model, shards, train_dir, batch, env, logs / f"{tag}-train.log")
                record = {"system": system, "repeat": repeat, "stage_one": one, "stage_two": two}
                wall = one["wall_seconds"] + two["wall_seconds"]
            else:
                run = trl_run(
                    model, dataset, work / "output", batch, max_length, env, logs / f"{tag}.log"
                )
                record = {"system": system, "repeat": repeat, "process": run}
                wall = run["wall_seconds"]
            logger.info("  %-16s repeat %d: %.1f s wall", system, repeat, wall)
            runs.append(record)
            shutil.rmtree(work, ignore_errors=True)  # checkpoints, exports: GBs on a real model
    return {
        "dataset": str(dataset),
        "pairs_in_file": pairs,
        "batch_size": batch,
        "max_length": max_length,
        "epochs": 1,
        "repeats": repeats,
        "cuda": _on_cuda(),
        "runs": runs,
    }
