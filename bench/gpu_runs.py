"""How bench.gpu runs each part: one subprocess, a timeout, and what it read back.

Every measured run is its own process (its CUDA peak is its own), started in its own
session so that a timeout ends it and everything it started. What each returns (`raw` of
the part in results.json):

  stage one (refdpo precompute, bench/gpu_stage_one.py): batches timed one by one, the
      log's whole-pass figure, the pairs' lengths from the shards, the CUDA peak; the same
      with a sharded reference on one GPU (--zero-stage 3 --offload, --device-map auto),
      with the placement its shards record.
  stage two (refdpo train): metrics.jsonl's steps (seconds, pairs, tokens, peak memory).
  TRL (bench/gpu_trl.py -> bench/trl_worker.py): steps, its reference pass, the CUDA peak.
  ceilings (bench/gpu_ceilings.py): one record per part (prefill, SFT step).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.systems import SCORING_LINE

REFDPO_CLI = [sys.executable, "-m", "refdpo.shared.cli"]  # what the `refdpo` command runs
TRAINED = "trained to step"  # refdpo train's line once the last step is done, before saving
STEP_KEYS = ("step", "loss", "step_seconds", "pairs_per_s", "tokens_per_s", "peak_memory_mb")
USED_KEYS = ("dtype", "zero_stage", "attn_implementation", "gradient_checkpointing", "packing",
             "lora")  # fmt: skip
ATTENTION = re.compile(r"refdpo\.shared\.models: attention: (.*)")  # what `auto` chose


class PartFailed(RuntimeError):
    """A part's process failed or timed out; `status` says which, the message why."""

    def __init__(self, status: str, message: str, partial: dict | None = None):
        super().__init__(message)
        self.status = status
        self.partial = partial  # what the part had measured before it stopped


@dataclass
class Finished:
    wall_seconds: float
    stopped_early: bool  # ended by the benchmark once it had what it measures


def run_process(
    cmd: list[str],
    env: dict,
    log: Path,
    timeout: float,
    stop_when: Callable[[], bool] | None = None,
) -> Finished:
    """Run `cmd` with its output in `log`; kill its session after `timeout` seconds (raises
    PartFailed "timed out") or as soon as `stop_when()` holds (a normal end)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        stopped = False
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                _kill(proc)
                raise PartFailed("timed out", f"stopped after {timeout:.0f} s; see {log}")
            if stop_when is not None and stop_when():
                _kill(proc)
                stopped = True
                break
            time.sleep(0.25)
    wall = time.perf_counter() - started
    if not stopped and proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise PartFailed("failed", f"exit {proc.returncode}; see {log}:\n{tail}")
    return Finished(wall, stopped)


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session it leads: its children too
    proc.wait()


def log_has(log: Path, text: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return text in log.read_text(errors="replace")
        except OSError:
            return False

    return check


def attention_used(log: Path) -> str | None:
    found = ATTENTION.search(log.read_text(errors="replace"))
    return found[1].strip() if found else None


def shard_lengths(shards: Path) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every pair in a shard folder."""
    import pyarrow.parquet as pq

    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    table = pq.read_table(sorted(shards.glob("part-*.parquet")), columns=columns)
    counts = [table[c].combine_chunks().value_lengths().to_pylist() for c in columns]
    return list(zip(*counts, strict=True))


def stage_one_options(model: str, dataset: Path, shards: Path, batch: int | None,
                      lengths: list[str], extra: list[str], placement: list[str]) -> list[str]:  # fmt: skip
    """refdpo precompute's options: its defaults; only the data shape (and a pair cap per
    forward when `batch`) are given, and for a sharded reference its placement flags."""
    return ["--model", model, "--dataset", str(dataset), "--output", str(shards),
            "--overwrite", *(["--batch-size", str(batch)] if batch else []), *lengths,
            *extra, *placement]  # fmt: skip


def stage_one_command(record: Path, options: list[str]) -> list[str]:
    """One process, one rank, whatever the placement: under --zero-stage 3 refdpo starts a
    one-rank process group itself (nccl on a GPU; gloo and DS_ACCELERATOR=cpu on a CPU)."""
    return [sys.executable, "-m", "bench.gpu_stage_one", str(record), "--", *options]


def shard_placement(shards: Path) -> dict | None:
    """How the reference was placed, as the first shard's scoring record says."""
    import pyarrow.parquet as pq

    from refdpo.shared.shards import METADATA_KEY

    files = sorted(shards.glob("part-*.parquet"))
    if not files:
        return None
    meta = json.loads(pq.read_schema(files[0]).metadata[METADATA_KEY])
    return meta.get("scoring", {}).get("placement")


def stage_one(model: str, dataset: Path, shards: Path, batch: int | None, lengths: list[str],
              extra: list[str], env: dict, logs: Path, timeout: float, name: str = "stage-one",
              placement: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """refdpo precompute with its defaults (`placement`: --zero-stage 3 --offload or
    --device-map auto on top); its record and log are `name`.json and .log in `logs`."""
    record, log = logs / f"{name}.json", logs / f"{name}.log"
    options = stage_one_options(model, dataset, shards, batch, lengths, extra, list(placement))
    done = run_process(stage_one_command(record, options), env, log, timeout)
    found = SCORING_LINE.search(log.read_text(errors="replace"))
    if not found:
        raise PartFailed("failed", f"no scoring summary line in {log}")
    manifest = json.loads((shards / "_manifest.json").read_text())
    return {
        "command": ["refdpo", "precompute", *options],
        "wall_seconds": done.wall_seconds,
        "logged_pairs": int(found[1]),
        "logged_seconds": float(found[2]),
        "dtype": manifest["provenance"]["dtype"],
        "attn_implementation": manifest["provenance"].get("attn_implementation"),
        "attention": attention_used(log),
        "placement": shard_placement(shards),
        "lengths": shard_lengths(shards),
        **json.loads(record.read_text()),
    }


def stage_two(model: str, shards: Path, output: Path, batch: int, steps: int, extra: list[str],
              env: dict, logs: Path, timeout: float, skip_save: bool) -> dict:  # fmt: skip
    """refdpo train with its defaults; batch and steps given (LoRA: --use-peft in extra).
    With skip_save the process is ended once its last step is logged: the final checkpoint
    and export (GBs, not measured) are not waited for."""
    options = ["--model", model, "--shards", str(shards), "--output", str(output),
               "--micro-batch-size", str(batch), "--max-steps", str(steps), *extra]  # fmt: skip
    log = logs / "stage-two.log"
    stop = log_has(log, TRAINED) if skip_save else None
    done = run_process([*REFDPO_CLI, "train", *options], env, log, timeout, stop)
    records = [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]
    train = sorted((r for r in records if r["split"] == "train"), key=lambda r: r["step"])
    used = json.loads((output / "train_config.json").read_text())
    return {
        "command": ["refdpo", "train", *options],
        "wall_seconds": done.wall_seconds,
        "stopped_after_last_step": done.stopped_early,
        "steps": [{k: r[k] for k in STEP_KEYS} for r in train],
        "used": {k: used.get(k) for k in USED_KEYS},
        "attention": attention_used(log),
    }


def trl(model: str, pairs: Path, mode: str, batch: int, steps: int, dtype: str, checkpointing: bool,
        env: dict, logs: Path, timeout: float) -> dict:  # fmt: skip
    result = logs / f"trl-{mode}.json"
    cmd = [sys.executable, "-m", "bench.gpu_trl", "--model", model, "--pairs", str(pairs),
           "--mode", mode, "--batch-size", str(batch), "--steps", str(steps), "--dtype", dtype,
           "--out", str(result), *(["--gradient-checkpointing"] if checkpointing else [])]  # fmt: skip
    done = run_process(cmd, env, logs / f"trl-{mode}.log", timeout)
    raw = json.loads(result.read_text())
    keep = ("losses", "step_seconds", "precompute_seconds", "precompute_pairs", "pairs",
            "tokens", "cuda_max_memory_mb", "peak_rss_mb", "trl_version")  # fmt: skip
    return {"wall_seconds": done.wall_seconds, **{k: raw.get(k) for k in keep}}


def ceilings(spec: dict, env: dict, logs: Path, timeout: float) -> dict:
    spec_file, results = logs / "ceilings-spec.json", logs / "ceilings.jsonl"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec))
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu_ceilings", str(spec_file), str(results)]

    def parts() -> list[dict]:
        return [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []

    try:
        done = run_process(cmd, env, logs / "ceilings.log", timeout)
    except PartFailed as err:  # the parts it finished count even when a later one did not
        err.partial = {"parts": parts()}
        raise
    return {"wall_seconds": done.wall_seconds, "parts": parts()}


def build_model(shape: str, tokenizer: str, folder: Path, device: str, env: dict, logs: Path,
                timeout: float) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "bench.gpu_shapes", "--shape", shape, "--tokenizer", tokenizer,
           "--output", str(folder), "--device", device]  # fmt: skip
    done = run_process(cmd, env, logs / f"build-{shape}.log", timeout)
    return {"wall_seconds": done.wall_seconds, "folder": str(folder)}
