"""Shards under stress: a write cut short by a file-size limit, and a dataset larger than the
memory stage two is allowed.

Both limits are real kernel limits set on a subprocess (`resource.setrlimit` in preexec_fn):
RLIMIT_FSIZE makes a write past the limit fail with EFBIG (Python ignores SIGXFSZ), and
RLIMIT_AS caps the address space, so an allocation past it fails (MemoryError in Python and
Arrow).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refdpo.precompute.inspect import validate
from refdpo.precompute.run import main as precompute_main
from refdpo.shared.shards import MANIFEST, METADATA_KEY, read_manifest, sha256_file, shard_name
from refdpo.train.data import COLUMNS
from refdpo.train.engine import CONFIG_DIR
from tests.conftest import write_jsonl
from tests.test_precompute import WORDS, base_args, good_rows, read_sorted
from tests.test_train import ENV, LN2, metrics, train_args


def limited(kind: int, limit: int):
    """preexec_fn: set a resource limit (soft and hard) in the child before it starts Python."""
    return lambda: resource.setrlimit(kind, (limit, limit))


# ---------------------------------------------------------------------------------------------
# Stage one: a write that fails mid-shard

FSIZE_LIMIT = 64 << 10  # above _run.json, the manifest and the small shards; below the long one


def small_then_long_rows() -> list[dict]:
    """Two shards of short pairs (about 13 kB each), then one of long pairs (about 120 kB)."""
    rows = good_rows(32)
    for i in range(16):
        words = " ".join(WORDS[(5 * i + k) % len(WORDS)] for k in range(150))
        rows.append(
            {
                "prompt": f"Long {i}: repeat after me.",
                "chosen": f"Sure: {words}.",
                "rejected": f"No {i}: {words[::-1]}",
            }
        )
    return rows


def run_with_file_limit(cmd: list[str], limit: int) -> subprocess.CompletedProcess:
    """Stage one in a subprocess whose files may not grow past `limit` bytes (RLIMIT_FSIZE;
    Python ignores SIGXFSZ, so a write past it raises EFBIG)."""
    preexec = limited(resource.RLIMIT_FSIZE, limit)
    return subprocess.run(
        cmd, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=preexec
    )


def test_file_size_limit_mid_shard_leaves_no_partial_shard(tmp_path, tiny_model_dir):
    """The third shard's write fails: one clear error, the two complete shards kept, nothing
    partial left; the same command without the limit finishes to a clean run's result."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", small_then_long_rows())

    def args(output: Path) -> list[str]:
        extra = ("--max-length", 1024, "--rows-per-shard", 16)
        return [str(a) for a in base_args(tiny_model_dir, dataset, output, *extra)]

    clean, out = tmp_path / "clean", tmp_path / "out"
    assert precompute_main(args(clean)) == 0
    # the limit lands inside the third shard's write and nowhere else
    sizes = {p.name: p.stat().st_size for p in clean.iterdir()}
    long_shard = shard_name(0, 2)
    assert sizes.pop(long_shard) > 1.5 * FSIZE_LIMIT, "make the long pairs longer"
    assert max(*sizes.values(), dataset.stat().st_size) < FSIZE_LIMIT / 2, sizes

    cmd = [sys.executable, "-m", "refdpo.precompute.run", *args(out)]
    result = run_with_file_limit(cmd, FSIZE_LIMIT)
    assert result.returncode != 0, "the file-size limit did not stop the run"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert str(out / long_shard) in error  # names the shard
    assert os.strerror(errno.EFBIG) in error  # "File too large": the limit is what fired
    assert "no partial file" in error and "rerun the same command" in error  # what to do

    # no partial shard: the complete ones stay (readable, every row there), no temp file
    # and no manifest remain
    assert not (out / MANIFEST).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    kept = sorted(out.glob("part-*.parquet"))
    assert [p.name for p in kept] == [shard_name(0, 0), shard_name(0, 1)]
    for path in kept:
        table = pq.read_table(path)
        assert table.num_rows == json.loads(table.schema.metadata[METADATA_KEY])["rows"] == 16
        assert table.equals(pq.read_table(clean / path.name))
    mtimes = {p.name: p.stat().st_mtime_ns for p in kept}

    # without the limit the same command finishes, keeping the complete shards
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in kept} == mtimes
    assert read_manifest(out)["rows"] == read_manifest(clean)["rows"] == 48
    validate(out)
    pd.testing.assert_frame_equal(read_sorted(out), read_sorted(clean))


def test_file_size_limit_at_the_manifest_is_one_clear_error(tmp_path, tiny_model_dir):
    """One-pair shards are smaller than the manifest that lists them: the limit fires there."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(40))
    args = [str(a) for a in base_args(tiny_model_dir, dataset, tmp_path / "clean", "--rows-per-shard", 1)]  # fmt: skip
    assert precompute_main(args) == 0
    shards = max(p.stat().st_size for p in (tmp_path / "clean").glob("part-*.parquet"))
    manifest = (tmp_path / "clean" / MANIFEST).stat().st_size
    assert shards < manifest, "more pairs, so that the manifest is the largest file"
    out = tmp_path / "out"
    args[args.index(str(tmp_path / "clean"))] = str(out)
    cmd = [sys.executable, "-m", "refdpo.precompute.run", *args]
    result = run_with_file_limit(cmd, (shards + manifest) // 2)
    assert result.returncode != 0
    assert len(list(out.glob("part-*.parquet"))) == 40 and not (out / MANIFEST).exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and MANIFEST in errors[0] and os.strerror(errno.EFBIG) in errors[0]
    assert subprocess.run(cmd, env=ENV, capture_output=True, timeout=300).returncode == 0
    validate(out)


# ---------------------------------------------------------------------------------------------
# Stage two: a dataset larger than its memory

MARGIN = 256 << 20  # address space allowed over a 1-step run on 16 pairs
DATA_BYTES = 5 * MARGIN  # decoded size of the big folder (training's columns)
ROWS_PER_SHARD = 1024

# Runs training, then prints its VmPeak (the most address space it ever held), in bytes.
PEAK = (
    "import re, sys\n"
    "from refdpo.train.run import main\n"
    "code = main(sys.argv[1:])\n"
    "status = open('/proc/self/status').read()\n"
    "print('VmPeak', 1024 * int(re.search(r'VmPeak:\\s+(\\d+) kB', status).group(1)))\n"
    "sys.exit(code)\n"
)
# What training imports, then every shard at once (Arrow, training's columns only: the least
# memory any load-it-all reader needs; pandas needs more).
LOAD_ALL = (
    "import sys\n"
    "import deepspeed, pyarrow.parquet as pq\n"
    "import refdpo.train.run\n"
    "from refdpo.train.data import COLUMNS\n"
    "try:\n"
    "    table = pq.read_table(sys.argv[1], columns=COLUMNS)\n"
    "except MemoryError as err:\n"
    "    print('MemoryError:', err)\n"
    "    sys.exit(3)\n"
    "print('loaded', table.nbytes)\n"
)


def vm_peak(stdout: str) -> int:
    return int(re.search(r"^VmPeak (\d+)$", stdout, re.MULTILINE).group(1))


def replicate(base: Path, folder: Path, data_bytes: int) -> tuple[int, int]:
    """A folder of shards of `base`'s pairs repeated under fresh unique ids, uncompressed and
    without dictionary encoding (bytes on disk ~ bytes decoded), with per-file metadata and a
    manifest that hold the contract (row counts, sha256, source ranges).

    Returns (rows, bytes of training's columns decoded in memory)."""
    manifest = read_manifest(base)
    (entry,) = manifest["shards"]
    table = pq.read_table(base / entry["file"])
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    block = pa.concat_tables([table] * (ROWS_PER_SHARD // table.num_rows))
    count = math.ceil(data_bytes / block.select(COLUMNS).nbytes)
    folder.mkdir(parents=True)
    entries = []
    for k in range(count):
        name, start, stop = shard_name(0, k), k * ROWS_PER_SHARD, (k + 1) * ROWS_PER_SHARD
        ids = pa.array([f"stress-{k:05d}-{i:04d}" for i in range(block.num_rows)], pa.string())
        shard_meta = dict(meta, rows=ROWS_PER_SHARD, source_start=start, source_stop=stop)
        shard = block.set_column(0, "id", ids).replace_schema_metadata(
            {METADATA_KEY: json.dumps(shard_meta).encode()}
        )
        pq.write_table(shard, folder / name, compression="none", use_dictionary=False)
        entries.append(
            dict(
                entry,
                file=name,
                rows=ROWS_PER_SHARD,
                sha256=sha256_file(folder / name),
                source_start=start,
                source_stop=stop,
            )
        )
    rows = count * ROWS_PER_SHARD
    manifest.update(rows=rows, input_rows=rows, shards=entries)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return rows, count * block.select(COLUMNS).nbytes


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps old tmp folders and this one gets big."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def started():
    """Subprocesses a test starts; any still running when it ends (a failed assert) are killed."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # 27-68 s on 2 shared cores; writes 1.3 GB (removed afterwards)
def test_dataset_larger_than_training_memory_trains_streaming(scratch, started, tiny_model_dir):
    """The folder's pairs take 5x the address space a capped run has over a small run: three
    steps train under the cap; loading the whole folder under the same cap fails."""
    rng = random.Random(0)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    # 16 real pairs of about 1,100 tokens, scored by the tiny reference
    pairs = [
        {"prompt": f"{i}: {text(60)}", "chosen": text(80), "rejected": text(80)} for i in range(16)
    ]
    dataset = write_jsonl(scratch / "pairs.jsonl", pairs)
    base = scratch / "base" / "train"
    code = precompute_main([
        "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output", str(base),
        "--max-length", "1024", "--max-prompt-length", "512", "--rows-per-shard", "16",
        "--batch-size", "4", "--keep-text", "false",
    ])  # fmt: skip
    assert code == 0
    manifest = read_manifest(base)
    cut = {k: v for k, v in manifest["truncated"].items() if k != "boundary_moved"}
    assert manifest["rows"] == 16 and not manifest["dropped"] and not cut

    # ZeRO-2 as shipped, with reduce/allgather buckets sized for the tiny model: DeepSpeed's
    # default bucket (5e8 elements: 2 GB of fp32 allocated in every backward) would dwarf the
    # data's share of the address space
    config = json.loads((CONFIG_DIR / "zero2.json").read_text())
    config["zero_optimization"].update(reduce_bucket_size=10**6, allgather_bucket_size=10**6)
    (scratch / "zero2.json").write_text(json.dumps(config))
    env = {**ENV, "MALLOC_ARENA_MAX": "2"}  # a fixed number of malloc arenas (64 MB each)

    def start(cmd: list[str], limit: int | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limited(resource.RLIMIT_AS, limit) if limit else None,
        )
        started.append(proc)
        return proc

    def train(shards: Path, output: str, steps: int, limit: int | None = None):
        extra = ["--max-steps", steps, "--export", "none"]
        extra += ["--deepspeed-config", scratch / "zero2.json"]
        args = train_args(shards.parent, tiny_model_dir, scratch / output, *extra)
        return start([sys.executable, "-c", PEAK, *args], limit)

    # the baseline: one step on the 16 pairs, uncapped (the big folder is built meanwhile)
    baseline = train(base, "baseline", 1)
    folder = scratch / "big" / "train"
    rows, decoded = replicate(base, folder, DATA_BYTES)
    out, err = baseline.communicate(timeout=600)
    assert baseline.returncode == 0, err[-3000:]
    limit = vm_peak(out) + MARGIN
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    print(
        f"baseline VmPeak {vm_peak(out) >> 20} MiB, cap {limit >> 20} MiB; {rows} pairs, "
        f"{decoded >> 20} MiB decoded, {on_disk >> 20} MiB on disk"
    )
    assert min(on_disk, decoded) > 4 * MARGIN, (on_disk, decoded)

    # under the cap, two processes at once: training (a checksum pass over every byte, then
    # the row groups each batch needs, in a bounded cache), and what training imports
    # followed by the whole folder at once
    capped = train(folder, "capped", 3, limit)
    load_all = start([sys.executable, "-c", LOAD_ALL, str(folder)], limit)

    out, err = capped.communicate(timeout=600)
    assert capped.returncode == 0, err[-3000:]
    print(f"capped run VmPeak {vm_peak(out) >> 20} MiB")
    assert f"training 3 steps: {rows} pairs" in err  # the whole folder is the training set
    logged = metrics(scratch / "capped")
    assert sorted(logged) == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in logged.values())
    # the step-0 identity (the run's own step-0 check passed too); sums of ~400 fp32 log-probs
    # differ by up to ~3e-4 between the packed policy forward and the stored ones, which moves
    # the loss by up to ~2e-5: hence 1e-4, not test_train's 1e-5
    assert logged[1]["loss"] == pytest.approx(LN2, abs=1e-4)

    out, err = load_all.communicate(timeout=600)
    assert load_all.returncode == 3 and "MemoryError" in out, (out, err[-3000:])
