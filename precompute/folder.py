"""The output folder of stage one: who may write there, and which shards in it to keep.

A rerun of the same command must never end "complete" on a folder that training refuses,
nor keep a shard this run would not have written. So before anything is kept each worker
checks its own shards (rank r owns the shards with owner % world == r; whichever worker
finishes last writes the manifest, see finalize.py) and redoes those that fail.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pyarrow as pa

from refdpo.precompute.finalize import PlannedShard, first_difference
from refdpo.shared.errors import FolderRefused
from refdpo.shared.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    ShardError,
    check_shard,
    sha256_file,
    shard_metadata,
    write_output,
)

logger = logging.getLogger("refdpo.precompute")
RUN_FILE = "_run.json"
DATASET_KEY = "dataset_fingerprint"  # in _run.json beside the settings, one per folder
SHOW_MISSING = 3  # missing shards named in a --finalize-only error


def check_output(folder: Path) -> None:
    """Fail before any model loads if the folder cannot be written, creating nothing: a run
    that fails before it scores leaves no folder behind (start_writing makes it)."""
    if folder.exists() and not folder.is_dir():
        raise FolderRefused(f"output folder {folder} is a file, not a folder; give a folder path")
    if folder.is_dir():
        try:
            probe = folder / f".write-test-{time.time_ns()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise FolderRefused(f"output folder {folder} is not writable: {err}") from None
        return
    parent = next(p for p in folder.absolute().parents if p.exists())
    if not parent.is_dir():
        raise FolderRefused(
            f"output folder {folder} is not writable: {parent} is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FolderRefused(f"output folder {folder} is not writable: cannot create it in {parent}")


def start_writing(folder: Path, identity: dict) -> None:
    """Make the folder and record the settings its shards are made with, just before the
    first shard is scored."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FolderRefused(f"output folder {folder} cannot be created: {err}") from None
    data = json.dumps(identity, indent=2, sort_keys=True).encode()
    write_output(folder / RUN_FILE, data, "shards already written are kept")


def claim_folder(folder: Path, identity: dict, rank: int, world: int, overwrite: bool) -> None:
    """Refuse to mix shards of other settings, or another dataset, into the folder; with
    --overwrite remove this worker's share of it instead. Only shards lock a folder: one a
    failed run left with `_run.json` and no shard takes any settings."""
    for stale in folder.glob(f".part-{rank:05d}-*.tmp"):  # left by a worker killed mid-write
        stale.unlink()
    if overwrite:
        (folder / MANIFEST).unlink(missing_ok=True)
        for path in folder.glob("part-*.parquet"):
            owner = int(path.name.split("-")[1])
            if owner % world == rank or (rank == 0 and owner >= world):
                path.unlink()
        return
    if not any(folder.glob("part-*.parquet")):
        return
    previous = _read_run_file(folder)
    for key, value in identity.items():
        if previous is not None and key != DATASET_KEY and previous.get(key) != value:
            raise FolderRefused(
                f"{folder} holds shards made with {key}={previous.get(key)!r}, this run has "
                f"{key}={value!r}. Use the same settings to resume, a new --output, or --overwrite"
            )
    # folders written before _run.json held the fingerprint: the manifest's or a shard's
    recorded = (previous or {}).get(DATASET_KEY) or _recorded_fingerprint(folder)
    if recorded is not None and recorded != identity[DATASET_KEY]:
        raise FolderRefused(
            f"{folder} holds shards made with dataset fingerprint {recorded[:12]}, this run has "
            f"dataset fingerprint {identity[DATASET_KEY][:12]} (the dataset changed since). "
            "Use the same dataset to resume, a new --output, or --overwrite"
        )


def _read_run_file(folder: Path) -> dict | None:
    path = folder / RUN_FILE
    if not path.exists():
        return None
    try:
        found = json.loads(path.read_text())
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise FolderRefused(f"{path} is damaged; remove it, or use --overwrite")
    return found


def _recorded_fingerprint(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST).read_text())["provenance"]["dataset"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for path in sorted(folder.glob("part-*.parquet")):
        try:
            return shard_metadata(path)["provenance"]["dataset"]["fingerprint"]
        except (ShardError, KeyError, TypeError):
            continue  # a damaged shard: the check of each shard redoes it
    return None


def verify_shards(
    folder: Path,
    shards: list[PlannedShard],
    rank: int,
    expected: dict,
    schema: pa.Schema,
    finalize_only: bool,
) -> tuple[list[PlannedShard], bool]:
    """(this worker's shards to score, whether the folder was already complete).

    Each of this worker's shards found is checked (`shard_problem`); one that fails is
    deleted and scored again, with a warning naming it and why. With --finalize-only, which
    scores nothing, a failing shard is an error instead. When any shard is redone the
    manifest, which lists the old files, goes too."""
    listed = _listed(folder, shards, finalize_only)
    if rank == 0:
        _remove_strays(folder, shards, finalize_only)
    pending = []
    for shard in (s for s in shards if s.rank == rank):
        path = folder / shard.file
        if path.exists():
            problem = shard_problem(path, shard, expected, schema, listed)
            if problem is None:
                continue
            if finalize_only:
                raise ShardError(
                    f"{shard.file}: {problem}; rerun without --finalize-only to redo it"
                )
            path.unlink()
        elif listed is None:
            pending.append(shard)  # not written yet: an interrupted run resumes here
            continue
        else:
            problem = f"listed in {MANIFEST} but missing"
        if not finalize_only:
            logger.warning("%s: %s; scoring it again", folder / shard.file, problem)
        pending.append(shard)
    if pending and listed is not None and not finalize_only:
        (folder / MANIFEST).unlink(missing_ok=True)
        logger.info("%s: removed %s, which lists shards being redone", folder, MANIFEST)
    return pending, listed is not None and not pending


def _listed(folder: Path, shards: list[PlannedShard], finalize_only: bool) -> dict | None:
    """{file: manifest entry}, or None without a usable manifest. One that is damaged or
    lists other files than this run's plan is stale: removed (kept with --finalize-only,
    which then writes a new one if every shard passes)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        listed = {entry["file"]: entry for entry in manifest["shards"]}
    except (ValueError, KeyError, TypeError):
        manifest, listed = {}, None
    if listed is not None and manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(  # a newer refdpo's folder: not ours to redo
            f"{path}: schema_version {manifest.get('schema_version')!r}, this refdpo writes "
            f"{SCHEMA_VERSION}; use a new --output, or --overwrite"
        )
    if listed is not None and set(listed) == {s.file for s in shards}:
        return listed
    logger.warning("%s: damaged or lists other shards than this run's; ignored", path)
    if not finalize_only:
        path.unlink(missing_ok=True)
    return None


def _remove_strays(folder: Path, shards: list[PlannedShard], finalize_only: bool) -> None:
    """Parquet files of our naming outside the plan make training refuse the folder."""
    planned = {s.file for s in shards}
    for path in sorted(folder.glob("part-*.parquet")):
        if path.name in planned:
            continue
        if finalize_only:
            raise ShardError(f"{path.name}: not a shard of this run's plan; remove it")
        logger.warning("%s: not a shard of this run's plan; removed", path)
        path.unlink()


def shard_problem(
    path: Path, shard: PlannedShard, expected: dict, schema: pa.Schema, listed: dict | None
) -> str | None:
    """Why a shard found on disk must not be kept, or None. With a manifest its checksum
    vouches for the bytes; without one the whole file is read (`check_shard`). Then it must
    cover the planned rows and carry the provenance this run writes, but for the model's
    fingerprint, known only once the model is loaded (finalize compares that across shards)."""
    if listed is not None:
        if shard.file not in listed:
            return f"not listed in {MANIFEST}"
        if sha256_file(path) != listed[shard.file].get("sha256"):
            return f"sha256 differs from {MANIFEST} (damaged or replaced)"
    try:
        meta = shard_metadata(path) if listed is not None else check_shard(path, schema)
        covered = (meta["source_start"], meta["source_stop"])
        counted = meta["rows"] + sum(meta["dropped"].values())
        provenance = dict(meta["provenance"])
        model = {**expected["model"], "fingerprint": provenance["model"]["fingerprint"]}
    except ShardError as err:
        return str(err).removeprefix(f"{path.name}: ")
    except (KeyError, TypeError, AttributeError):
        return "its refdpo metadata lacks the fields this refdpo writes"
    if covered != (shard.start, shard.stop):
        return (
            f"covers rows {covered[0]}-{covered[1]}, this run's plan has {shard.start}-{shard.stop}"
        )
    if counted != shard.stop - shard.start:
        return f"its rows and dropped rows add up to {counted}, not the {shard.stop - shard.start} it covers"
    field = first_difference({**expected, "model": model}, provenance)
    if field:
        return f"written with a different {field} than this run's"
    return image_file_problem(path.parent, meta.get("images"))


def image_file_problem(folder: Path, images: dict | None) -> str | None:
    """Why a vision shard's image file (written before it) cannot back it, or None."""
    if not images:
        return None
    found = folder / images["file"]
    if not found.exists():
        return f"its image file {images['file']} is missing"
    if sha256_file(found) != images["sha256"]:
        return f"its image file {images['file']} differs from the one it was written with"
    return None


def missing_error(folder: Path, missing: list[PlannedShard]) -> ShardError:
    """--finalize-only scores nothing: this worker's missing shards are an error."""
    named = ", ".join(f"{s.file} (rows [{s.start}, {s.stop}))" for s in missing[:SHOW_MISSING])
    more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
    return ShardError(
        f"{folder}: --finalize-only, but {len(missing)} shard(s) of this worker are missing: "
        f"{named}{more}. Run the same command without --finalize-only to score them"
    )
