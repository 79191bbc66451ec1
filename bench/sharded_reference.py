"""Stage one with a sharded reference on CPU: pairs/s and peak memory per rank, by placement.

    python -m bench.sharded_reference [--pairs 96] [--model DIR] [--output out/bench-sharded]
    make bench-sharded

Four modes of `refdpo precompute`, each the real CLI in fresh processes, one after another
(never side by side), each into a fresh output folder:

  whole-1   one worker holding the whole reference (`python -m refdpo.precompute.run`);
  whole-R   R ranks under torchrun, each holding the whole reference, writing interleaved
            shards (R = --ranks, default 2);
  zero3-1   one rank under torchrun with --zero-stage 3 (ZeRO-3 inference on one rank: the
            DeepSpeed engine's cost without any partitioning);
  zero3-R   R ranks under torchrun with --zero-stage 3: the parameters partitioned over them.

DeepSpeed's CPU communication op (a C++ extension built on first use) is built or loaded
first, untimed, in a TORCH_EXTENSIONS_DIR of this environment's own. Same data and flags in
every mode: SmolLM2-135M-Instruct (`refdpo fetch-demo-model`; --model
for another), the first --pairs pairs of ../shared/data's rasbt instruction-preference file
(bench/workloads.py's workload a), fp32, --device cpu, --per-device-batch-size --batch-size,
rows per shard chosen so that every rank of an R-rank run writes the same number of shards.
Each rank gets OMP_NUM_THREADS = cores // ranks (at least 1; --threads sets it), so every
mode uses the machine's cores; DS_ACCELERATOR=cpu throughout.

Figures, per mode: the command's wall seconds (launch to exit, start-up and model load
included); each rank's train-split summary line (`train split: wrote ... in S s (P pairs/s,
...); peak memory M MiB (resident set)`): its pairs, scoring seconds and peak resident set
(ru_maxrss of that rank's process); total pairs/s two ways, all ranks' pairs over the slowest
rank's scoring seconds and over the command's wall seconds; the largest per-rank peak over
the whole-1 run's. Beside it, each rank's peak private memory (RssAnon, sampled from /proc
while it runs), which leaves out file-backed pages: on the CPU an fp32 safetensors
checkpoint loaded as fp32 is mapped, not copied, so a whole reference's weights are page
cache shared by every rank of the machine, counted in each rank's resident set but private
to none, while ZeRO-3 copies each rank's partition into private memory. What a rank holds
is set out too: a process that only imports torch, transformers, deepspeed and refdpo's
stage one (the libraries), and the weights' size from the safetensors headers, so the drop
ZeRO-3 should give (the weights times 1 - 1/R) can be set beside the measured one.

Every mode's shards are compared with whole-1's, pair by pair (same ids, same token ids) and
token by token (max |difference| of the stored per-token log-probs); a mode that differs by
more than --tolerance fails the run (exit 1): a fast wrong answer is not a result.

--tiny: 8 pairs on a 2-layer random Llama with SmolLM2's tokenizer (or --model), a smoke run
that the test suite runs. Writes results.json and results.md to --output; prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"
MIB = 2**20
SAMPLE = 0.2  # seconds between two readings of the ranks' memory
VISIBLE = 32.0  # MiB of weights below which the memory figures cannot show them (--tiny)
# the line every rank logs at the end of a split (precompute/run.py, write_pending)
SUMMARY = re.compile(
    r"(?:\[rank (?P<rank>\d+)/(?P<world>\d+)\] )?INFO [\w.]+: (?P<split>\w+) split: wrote "
    r"(?P<shards>\d+) shard\(s\), (?P<pairs>\d+) pairs, (?P<dropped>\d+) dropped, in "
    r"(?P<seconds>[\d.]+) s \((?P<rate>[\d.]+) pairs/s, (?P<tokens>[\d.]+) tokens/s\); peak "
    r"memory (?P<memory>[\d.]+) MiB \((?P<kind>[^)]*)\)"
)
LOGP_COLUMNS = ("ref_win_per_token_logp", "ref_rej_per_token_logp")
SUM_COLUMNS = ("ref_win_logp", "ref_rej_logp")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
LIBRARIES = (  # what a rank imports before its model loads; its memory then, in kB
    "import json, resource, torch, transformers, deepspeed, refdpo.precompute.run\n"
    "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
    "print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,\n"
    "                  **{k: int(status[k].split()[0]) for k in ('RssAnon', 'RssFile')}}))"
)


@dataclass
class Mode:
    name: str
    ranks: int
    zero3: bool
    what: str


def modes(ranks: int) -> list[Mode]:
    return [
        Mode("whole-1", 1, False, "1 worker, whole reference"),
        Mode(f"whole-{ranks}", ranks, False, f"{ranks} ranks (torchrun), whole reference each"),
        Mode("zero3-1", 1, True, "1 rank (torchrun), --zero-stage 3"),
        Mode(f"zero3-{ranks}", ranks, True, f"{ranks} ranks (torchrun), --zero-stage 3"),
    ]


# --- model and data


def default_model(tiny: bool, root: Path) -> Path:
    """SmolLM2-135M-Instruct as `refdpo fetch-demo-model` caches it (fetched when missing);
    --tiny: long_pairs' 2-layer random Llama with SmolLM2's tokenizer."""
    if tiny:
        from bench.long_pairs import build_model

        return build_model(root / "tiny-model")
    from refdpo.shared.demo_model import fetch_demo_model

    return Path(fetch_demo_model())


def write_pairs(source: Path, count: int, path: Path) -> Path:
    from bench.workloads import instruction_pairs, write_jsonl

    return write_jsonl(instruction_pairs(source, count), path)


def weight_bytes(model: Path) -> int:
    """Bytes of every tensor in the model's safetensors files, from their headers."""
    total = 0
    for file in sorted(model.glob("*.safetensors")):
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        total += sum(
            end - start
            for key, entry in header.items()
            if key != "__metadata__"
            for start, end in [entry["data_offsets"]]
        )
    return total


def library_memory_mib(env: dict) -> dict | None:
    """Peak resident set of a process that only imports what a stage-one rank imports, and
    its private (anon) and file-backed parts then."""
    done = subprocess.run([sys.executable, "-c", LIBRARIES], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return None
    found = json.loads(lines[-1])
    return {"peak": found["peak"] / 1024, "anon": found["RssAnon"] / 1024,
            "file": found["RssFile"] / 1024}  # fmt: skip


def extensions_dir() -> Path:
    """Where DeepSpeed's CPU communication op is built (TORCH_EXTENSIONS_DIR): one folder per
    Python environment. torch's default, shared by every environment of the user, is rebuilt
    whenever another environment's build last wrote it, and locked while one builds: a
    ZeRO-3 rank would wait minutes in its start-up, timed, for another job's compiler."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from refdpo.shared.demo_model import default_cache_dir

    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return default_cache_dir() / "torch-extensions" / key


def prepare_deepspeed(env: dict) -> dict:
    """Build (or load, when built) DeepSpeed's shared-memory communication op, untimed, as a
    ZeRO-3 rank's process group would in its start-up."""
    started = time.perf_counter()
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    return {"torch_extensions_dir": env["TORCH_EXTENSIONS_DIR"], "ok": done.returncode == 0,
            "seconds": time.perf_counter() - started,
            "output_tail": "" if done.returncode == 0 else done.stderr[-2000:]}  # fmt: skip


# --- running one mode


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(args, model: Path, dataset: Path, output: Path) -> list[str]:
    """What every mode passes to `refdpo precompute` (the placement flags come on top)."""
    return [
        "--model", str(model), "--dataset", str(dataset), "--output", str(output),
        "--dtype", "fp32", "--device", "cpu", "--per-device-batch-size", str(args.batch_size),
        "--rows-per-shard", str(args.rows_per_shard), "--dist-timeout", "600",
    ]  # fmt: skip


def command(mode: Mode, options: list[str]) -> list[str]:
    options = [*options, *(["--zero-stage", "3"] if mode.zero3 else [])]
    if mode.ranks == 1 and not mode.zero3:
        return [sys.executable, "-m", "refdpo.precompute.run", *options]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(mode.ranks),
            "--master-port", str(free_port()), "-m", "refdpo.precompute.run", *options]  # fmt: skip


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def rank_memory(pid: int) -> tuple[int, dict[str, float]] | None:
    """(rank, MiB resident: rss, anon, file) of a stage-one rank process, from
    /proc/PID/status (counters: reading them does not stop the process, unlike smaps,
    whose page-table walk slowed a rank by a quarter); None for any other process
    (torchrun's agent, a compiler worker) or one that has gone."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"refdpo.precompute.run" not in cmdline or b"torch.distributed.run" in cmdline:
            return None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in environ if e.startswith(b"RANK=")), 0)
        fields = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    except (OSError, ValueError):
        return None
    return rank, {"rss": fields.get("VmRSS", 0.0), "anon": fields.get("RssAnon", 0.0),
                  "file": fields.get("RssFile", 0.0)}  # fmt: skip


def run_command(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float, dict]:
    """(exit code, wall seconds, each rank's sampled peaks); the whole process group is
    killed after `timeout`. Every SAMPLE seconds each rank process's resident set is read
    from /proc: all of it (VmRSS), its private part (RssAnon) and file-backed pages
    (RssFile: libraries, and a checkpoint mapped rather than copied)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    peaks: dict[int, dict[str, float]] = {}
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        code = None
        while code is None:
            for pid in descendants(proc.pid):
                found = rank_memory(pid)
                if found:
                    rank, now = found
                    peak = peaks.setdefault(rank, dict.fromkeys(now, 0.0))
                    for key, value in now.items():
                        peak[key] = max(peak[key], value)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=SAMPLE)
            if code is None and time.perf_counter() - started > timeout:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its ranks too
                proc.wait()
                code = 124
    return code, time.perf_counter() - started, {r: peaks[r] for r in sorted(peaks)}


def rank_lines(text: str, split: str = "train") -> dict[int, dict]:
    """Each rank's summary line of `split`, by rank (0 when the run has one worker)."""
    found = {}
    for match in SUMMARY.finditer(text):
        if match["split"] != split:
            continue
        rank = int(match["rank"] or 0)
        pairs, rate = int(match["pairs"]), float(match["rate"])
        found[rank] = {
            "rank": rank,
            "pairs": pairs,
            "dropped": int(match["dropped"]),
            "shards": int(match["shards"]),
            "logged_seconds": float(match["seconds"]),
            # the rate has more digits than the seconds (%.1f): seconds from it when it can
            "seconds": pairs / rate if pairs and rate else float(match["seconds"]),
            "pairs_per_s": rate,
            "tokens_per_s": float(match["tokens"]),
            "peak_memory_mib": float(match["memory"]),
            "memory_kind": match["kind"],
        }
    return found


def run_mode(mode: Mode, args, env: dict, model: Path, dataset: Path, root: Path) -> dict:
    folder = root / mode.name
    shutil.rmtree(folder, ignore_errors=True)  # a fresh output folder every time
    shards = folder / "shards"
    cmd = command(mode, flags(args, model, dataset, shards))
    threads = args.threads or max(1, (os.cpu_count() or 1) // mode.ranks)
    log = folder / "precompute.log"
    env = {**env, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]  # another job on the machine shows here
    code, wall, sampled = run_command(cmd, env, log, args.timeout)
    text = log.read_text(errors="replace")
    ranks = rank_lines(text)
    record = {**asdict(mode), "command": cmd, "threads_per_rank": threads, "exit_code": code,
              "wall_seconds": wall, "load_average_before": load, "log": str(log),
              "shards": str(shards),
              "ranks_reported": [ranks[r] for r in sorted(ranks)],
              "sampled_peak_mib": {str(r): v for r, v in sampled.items()}}  # fmt: skip
    problem = None
    if code != 0:
        problem = "timed out" if code == 124 else f"exit code {code}"
    elif sorted(ranks) != list(range(mode.ranks)):
        problem = f"summary lines of ranks {sorted(ranks)}, expected 0..{mode.ranks - 1}"
    elif not (shards / "_manifest.json").exists():
        problem = "no manifest"
    if problem:
        record.update(status="failed", why=problem, output_tail=text[-3000:])
        return record
    reported = record["ranks_reported"]
    pairs = sum(r["pairs"] for r in reported)
    slowest = max(r["seconds"] for r in reported)
    memory = [r["peak_memory_mib"] for r in reported]
    record.update(
        status="ok", pairs=pairs, dropped=sum(r["dropped"] for r in reported),
        slowest_rank_seconds=slowest, pairs_per_s_scoring=pairs / slowest if slowest else None,
        pairs_per_s_wall=pairs / wall, peak_memory_mib_max=max(memory),
        peak_memory_mib_each=memory,
        peak_private_mib_each=[sampled.get(r, {}).get("anon") for r in range(mode.ranks)],
    )  # fmt: skip
    private = [m for m in record["peak_private_mib_each"] if m]
    record["peak_private_mib_max"] = max(private) if private else None
    # what the job costs the machine: every rank's private memory, and the file-backed pages
    # once (the ranks map the same libraries and checkpoint: one copy in the page cache); an
    # upper bound, each rank's own peak whenever it came
    private_sum = sum(v["anon"] for v in sampled.values())
    files = max((v["file"] for v in sampled.values()), default=0.0)
    record["job_memory_mib"] = private_sum + files if private_sum else None
    return record


# --- checking the output


def read_shards(folder: Path) -> dict[str, dict]:
    """Every pair of a shard folder by id: its token ids and stored log-probs."""
    import pyarrow.parquet as pq

    columns = ["id", *ID_COLUMNS, *LOGP_COLUMNS, *SUM_COLUMNS]
    table = pq.read_table(sorted(folder.glob("part-*.parquet")), columns=columns).to_pydict()
    return {pid: {c: table[c][i] for c in columns[1:]} for i, pid in enumerate(table["id"])}


def compare(got: Path, want: Path, tolerance: float) -> dict:
    """Pair by pair: same ids and token ids; token by token: max |log-prob difference|."""
    import numpy as np

    a, b = read_shards(got), read_shards(want)
    result = {"pairs": len(a), "expected_pairs": len(b), "same_ids": set(a) == set(b)}
    if not result["same_ids"]:
        result.update(ok=False, why="the pair ids differ", max_abs_token_logp_difference=None)
        return result
    tokens_differ = [k for k in a if any(a[k][c] != b[k][c] for c in ID_COLUMNS)]
    token_diff, sum_diff, tokens = 0.0, 0.0, 0
    for key in a:
        for column in LOGP_COLUMNS:
            x, y = np.asarray(a[key][column]), np.asarray(b[key][column])
            if x.shape != y.shape:
                tokens_differ.append(key)
                continue
            tokens += x.size
            token_diff = max(token_diff, float(np.abs(x - y).max(initial=0.0)))
        for column in SUM_COLUMNS:
            sum_diff = max(sum_diff, abs(a[key][column] - b[key][column]))
    ok = not tokens_differ and token_diff <= tolerance  # NaN fails too
    result.update(
        ok=ok, tokens_compared=tokens, pairs_with_other_tokens=len(set(tokens_differ)),
        max_abs_token_logp_difference=token_diff, max_abs_sequence_logp_difference=sum_diff,
        tolerance=tolerance,
    )  # fmt: skip
    if not ok:
        result["why"] = (f"{len(set(tokens_differ))} pair(s) with other token ids" if
                         tokens_differ else f"log-probs differ by {token_diff:.3g}")  # fmt: skip
    return result


# --- report


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(value, base):
    return value / base if value and base else None


def _sampled_max(run: dict, key: str) -> float | None:
    found = [v.get(key) for v in run.get("sampled_peak_mib", {}).values() if v.get(key)]
    return max(found) if found else None


def summarize(results: dict) -> None:
    """Ratios to whole-1, and what the memory is made of (results["memory"])."""
    runs = {r["name"]: r for r in results["runs"]}
    base = runs.get("whole-1", {})
    for r in results["runs"]:
        r["peak_memory_vs_whole_1"] = _ratio(
            r.get("peak_memory_mib_max"), base.get("peak_memory_mib_max")
        )
        r["peak_private_vs_whole_1"] = _ratio(
            r.get("peak_private_mib_max"), base.get("peak_private_mib_max")
        )
    ranks = results["config"]["ranks"]
    whole, zero3 = runs.get(f"whole-{ranks}", {}), runs.get(f"zero3-{ranks}", {})
    weights, libraries = results["weights_mib"], results["libraries_mib"] or {}

    def drop(key: str) -> float | None:
        a, b = whole.get(key), zero3.get(key)
        return a - b if a is not None and b is not None else None

    file_peak = _sampled_max(whole, "file")
    mapped = file_peak - libraries["file"] if file_peak and libraries.get("file") else None
    results["memory"] = {
        "weights_mib": weights,
        "libraries_mib": libraries,
        "expected_drop_per_rank_mib": weights * (1 - 1 / ranks),
        "measured_drop_per_rank_mib": drop("peak_memory_mib_max"),
        "measured_private_drop_per_rank_mib": drop("peak_private_mib_max"),
        # whole-R: file-backed pages beyond the libraries' own: the checkpoint, mapped
        "whole_mapped_weights_mib": mapped,
        "whole_weights_mapped": mapped is not None and mapped > 0.5 * weights >= VISIBLE / 2,
        "zero3_private_above_libraries_mib": (
            zero3["peak_private_mib_max"] - libraries["anon"]
            if zero3.get("peak_private_mib_max") and libraries.get("anon")
            else None
        ),
    }


def memory_notes(results: dict) -> list[str]:
    mem, ranks = results["memory"], results["config"]["ranks"]
    libraries, weights = mem["libraries_mib"] or {}, mem["weights_mib"]
    notes = [
        f"- **Peak MiB** is each rank's peak resident set (ru_maxrss, as its summary line logs "
        f"it); **private** is the peak of its anonymous resident memory (RssAnon, read from "
        f"/proc every {SAMPLE} s: a spike between two readings is missed), which leaves out "
        f"file-backed pages: the libraries' code and a checkpoint that is mapped rather than "
        f"copied. The libraries alone (torch, transformers, deepspeed and refdpo imported, "
        f"nothing loaded, in a process of their own) are {fmt(libraries.get('peak'), 0)} MiB, "
        f"{fmt(libraries.get('anon'), 0)} private and {fmt(libraries.get('file'), 0)} "
        f"file-backed. Above them a rank holds its weights (whole: all {weights:.0f} MiB; "
        f"ZeRO-3: its 1/R partition, plus the tensors under the persistence threshold, the "
        f"norms, whole on every rank), what ZeRO-3 gathers for a forward (about a layer, "
        f"prefetched) and for the fingerprint (one tensor at a time), activations and "
        f"log-prob buffers, the data, and what the allocator keeps after a free: a peak "
        f"never comes down."
    ]
    if mem["whole_weights_mapped"]:
        notes.append(
            f"- The whole reference's weights are the checkpoint's own pages: whole-{ranks}'s "
            f"ranks peak at {fmt(mem['whole_mapped_weights_mib'], 0)} MiB of file-backed "
            f"memory beyond the libraries' files, about the {weights:.0f} MiB of weights, "
            f"because an fp32 safetensors checkpoint loaded as fp32 on the CPU is mapped, not "
            f"copied. Those pages are one copy in the page cache shared by every rank on the "
            f"machine (ru_maxrss counts them in each), and none of them is private. ZeRO-3 "
            f"copies each rank's partition into private memory instead, so on this set-up it "
            f"cannot lower a rank's resident set by the weights it no longer holds. On a GPU "
            f"(weights copied to the device) or with a --dtype that converts them, the whole "
            f"reference's weights are private copies and the partition is what ZeRO-3 saves."
        )
    if weights < VISIBLE:
        notes.append(
            f"- The weights ({weights:.1f} MiB) are too small for the memory figures to show "
            f"them: this run only shows that every mode runs, reports and agrees."
        )
    drop, private = mem["measured_drop_per_rank_mib"], mem["measured_private_drop_per_rank_mib"]
    verdict = "dropped" if drop is not None and drop > 0 else "did NOT drop"
    notes.append(
        f"- ZeRO-3 on {ranks} ranks against the whole reference on {ranks} ranks: the largest "
        f"per-rank peak {verdict}: by {fmt(drop, 0)} MiB (resident set), {fmt(private, 0)} "
        f"MiB (private); the weights alone would give {mem['expected_drop_per_rank_mib']:.0f} "
        f"MiB (1 - 1/{ranks} of them). zero3-{ranks}'s ranks peak at "
        f"{fmt(mem['zero3_private_above_libraries_mib'], 0)} MiB of private memory above the "
        f"libraries', against a partition of {weights / ranks:.0f} MiB."
    )
    notes.append(
        "- **Job's memory** is what the run costs the machine: the sum of its ranks' private "
        "peaks, plus the largest rank's file-backed peak once (the ranks map the same "
        "libraries and checkpoint, one copy in the page cache); at most, since each rank's "
        "peak is taken whenever it came."
    )
    return notes


def _op_note(op: dict) -> str:
    if op.get("ok"):
        return (f"- DeepSpeed's CPU communication op was built or loaded before the modes, "
                f"untimed ({op['seconds']:.1f} s; TORCH_EXTENSIONS_DIR "
                f"{op['torch_extensions_dir']}).")  # fmt: skip
    return (
        "- DeepSpeed's CPU communication op could NOT be built before the modes: the "
        "ZeRO-3 modes' wall seconds may hold its build (results.json, deepspeed_op)."
    )


def markdown(results: dict) -> str:
    cfg, mem = results["config"], results["memory"]
    lines = [
        f"# Stage one with a sharded reference ({results['device']})",
        "",
        f"`{results['command']}`; {results['seconds'] / 60:.1f} min; model {results['model']} "
        f"({mem['weights_mib']:.1f} MiB of weights, fp32); {cfg['pairs']} pairs of "
        f"{Path(results['source']).name}; every mode `--dtype fp32 --device cpu "
        f"--per-device-batch-size {cfg['batch_size']} --rows-per-shard "
        f"{cfg['rows_per_shard']}`; versions {results['versions']}.",
        "",
        "| mode | what | threads/rank | wall s (command) | scoring s (slowest rank) "
        "| pairs/s (all ranks' pairs / slowest rank's scoring s) "
        "| pairs/s (all ranks' pairs / command wall s) | peak MiB per rank, max | each rank "
        "| max per-rank peak / whole-1 | private peak MiB per rank, max | each rank "
        "| max private / whole-1 | job's memory MiB (ranks' private + shared files once) "
        "| max abs per-token log-prob diff vs whole-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        check = results["checks"].get(r["name"], {})
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['what']} | {r['threads_per_rank']} | "
                         f"{fmt(r['wall_seconds'], 1)} | FAILED: {r['why']} |"
                         + " |" * 10)  # fmt: skip
            continue
        diff = check.get("max_abs_token_logp_difference")
        if r["name"] == "whole-1":
            shown = "(itself)"
        elif diff is None:
            shown = f"FAILED: {check.get('why')}"
        else:
            shown = f"{diff:.2e}" + ("" if check.get("ok") else f" FAILED: {check.get('why')}")
        each = " / ".join(fmt(m, 0) for m in r["peak_memory_mib_each"])
        private = " / ".join(fmt(m, 0) for m in r["peak_private_mib_each"])
        lines.append(
            f"| {r['name']} | {r['what']} | {r['threads_per_rank']} | {fmt(r['wall_seconds'], 1)} "
            f"| {fmt(r['slowest_rank_seconds'], 2)} | {fmt(r['pairs_per_s_scoring'])} "
            f"| {fmt(r['pairs_per_s_wall'])} | {fmt(r['peak_memory_mib_max'], 0)} | {each} "
            f"| {fmt(r['peak_memory_vs_whole_1'])} | {fmt(r['peak_private_mib_max'], 0)} "
            f"| {private} | {fmt(r['peak_private_vs_whole_1'])} | {fmt(r['job_memory_mib'], 0)} "
            f"| {shown} |"
        )
    lines += [
        "",
        *memory_notes(results),
        "- pairs/s (scoring) leaves out start-up, model load and the fingerprint; pairs/s "
        "(wall) counts everything from launch to exit, torchrun's start included. Threads: "
        "each rank gets cores // ranks (--threads), so every mode uses the whole machine. "
        "Load average (1 min) before each mode: "
        + ", ".join(f"{r['name']} {r['load_average_before']:.2f}" for r in results["runs"])
        + f" on {os.cpu_count()} cores (a busy machine slows the figures, most of all with "
        "several threads per rank).",
        f"- Every mode's shards against whole-1's: same pair ids and token ids, per-token "
        f"log-probs within {cfg['tolerance']:g}.",
        _op_note(results.get("deepspeed_op") or {}),
    ]
    return "\n".join(lines) + "\n"


# --- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sharded_reference",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", default="out/bench-sharded", help="folder for runs and results")
    p.add_argument("--model", help="reference folder (default: SmolLM2-135M-Instruct, fetched)")
    p.add_argument("--source", default=str(SHARED_DATA), help="the rasbt preference JSON")
    p.add_argument("--pairs", type=int, help="first N pairs of --source (default 96; tiny 8)")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank modes")
    p.add_argument("--batch-size", type=int, default=8, help="--per-device-batch-size, every mode")
    p.add_argument("--rows-per-shard", type=int,
                   help="--rows-per-shard, every mode (default: pairs / (2 x ranks), rounded up)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0,
                   help="OMP threads per rank (0: cores // ranks of the mode, at least 1)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |per-token log-prob difference| from whole-1 a mode may have")  # fmt: skip
    p.add_argument("--timeout", type=float, default=1800, help="seconds one mode may run")
    p.add_argument("--tiny", action="store_true",
                   help="8 pairs, a 2-layer random Llama unless --model: a smoke run")  # fmt: skip
    args = p.parse_args(argv)
    if args.pairs is None:
        args.pairs = 8 if args.tiny else 96
    if args.ranks < 2:
        p.error("--ranks must be at least 2")
    if args.rows_per_shard is None:
        args.rows_per_shard = max(1, math.ceil(args.pairs / (2 * args.ranks)))
    return args


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "deepspeed", "refdpo"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    root = Path(args.output).resolve()
    root.mkdir(parents=True, exist_ok=True)
    source = Path(args.source)
    if not source.exists():
        raise SystemExit(f"no {source}: give --source FILE")
    model = Path(args.model).resolve() if args.model else default_model(args.tiny, root)
    dataset = write_pairs(source, args.pairs, root / "pairs.jsonl")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    prepared = prepare_deepspeed({**env, "OMP_NUM_THREADS": "1"})
    print(f"{time.strftime('%H:%M:%S')} DeepSpeed's CPU communication op in "
          f"{env['TORCH_EXTENSIONS_DIR']}: {'ready' if prepared['ok'] else 'NOT built'} in "
          f"{prepared['seconds']:.1f} s (untimed)", flush=True)  # fmt: skip
    shown = argv if argv is not None else sys.argv[1:]
    results = {
        "command": " ".join(["python -m bench.sharded_reference", *shown]),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "versions": versions(),
        "model": str(model),
        "source": str(source),
        "config": vars(args),
        "weights_mib": weight_bytes(model) / MIB,
        "libraries_mib": library_memory_mib({**env, "OMP_NUM_THREADS": "1"}),
        "deepspeed_op": prepared,
        "runs": [],
        "checks": {},
    }
    for mode in modes(args.ranks):  # one after another, never side by side
        record = run_mode(mode, args, env, model, dataset, root)
        results["runs"].append(record)
        shown_line = (f"{record['pairs_per_s_scoring']:.2f} pairs/s, peak "
                      f"{record['peak_memory_mib_max']:.0f} MiB per rank"
                      if record["status"] == "ok" else f"FAILED ({record['why']})")  # fmt: skip
        print(f"{time.strftime('%H:%M:%S')} {mode.name:<8} {record['wall_seconds']:6.1f} s: "
              f"{shown_line}", flush=True)  # fmt: skip
    runs = {r["name"]: r for r in results["runs"]}
    if runs["whole-1"]["status"] == "ok":
        for name, r in runs.items():
            if name != "whole-1" and r["status"] == "ok":
                results["checks"][name] = compare(
                    Path(r["shards"]), Path(runs["whole-1"]["shards"]), args.tolerance
                )
    summarize(results)
    results["seconds"] = time.perf_counter() - started
    (root / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (root / "results.md").write_text(table)
    print(table)
    failed = [r["name"] for r in results["runs"] if r["status"] != "ok"]
    wrong = [n for n, c in results["checks"].items() if not c["ok"]]
    return 1 if failed or wrong or len(results["checks"]) != len(runs) - 1 else 0


if __name__ == "__main__":
    sys.exit(main())
