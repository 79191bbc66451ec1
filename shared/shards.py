"""Shard files and manifest: the contract between stage one and stage two (schema 1).

A shard folder holds `part-RRRRR-SSSSS.parquet` files and `_manifest.json`, written last.
The manifest's name starts with `_` because pyarrow's dataset discovery (what
`pandas.read_parquet(folder)` uses) skips files starting with `_` or `.` and would fail on
any other non-Parquet file; temporary files start with `.` for the same reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refdpo.shared import faults
from refdpo.shared.errors import InputError

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"
METADATA_KEY = b"refdpo"
# sha256 of the rest of a shard's refdpo metadata, stored in it: a rerun without a manifest
# has no file checksum to compare against, and the data pages' CRCs do not cover the footer
METADATA_DIGEST = "metadata_sha256"
# Stage two reads pairs in a global shuffled order and reads only the row groups a batch
# needs, so small row groups bound what it decodes per pair.
ROW_GROUP_ROWS = 64

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("chosen_ids", pa.list_(pa.int32())),
        ("rejected_ids", pa.list_(pa.int32())),
        ("ref_win_logp", pa.float64()),
        ("ref_rej_logp", pa.float64()),
        ("ref_win_avg_logp", pa.float64()),
        ("ref_rej_avg_logp", pa.float64()),
        ("ref_win_per_token_logp", pa.list_(pa.float32())),
        ("ref_rej_per_token_logp", pa.list_(pa.float32())),
    ]
)
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
# vision folders: each pair's images by sha256 (in prompt order; the bytes are in the folder's
# image store, refdpo.shared.image_store), each image's token count in prompt_ids, and the
# model family's extras per image (Qwen's grid t, h, w; Idefics3's rows, cols), named in the
# manifest's provenance.vision.extras_fields
VISION_FIELDS = [
    pa.field("image_sha256", pa.list_(pa.string())),
    pa.field("image_tokens", pa.list_(pa.int32())),
    pa.field("image_extras", pa.list_(pa.list_(pa.int32()))),
]
VISION_COLUMNS = tuple(f.name for f in VISION_FIELDS)


class ShardError(InputError):
    """A shard folder that breaks the contract; the message names the file and problem."""


def shard_name(rank: int, sequence: int) -> str:
    return f"part-{rank:05d}-{sequence:05d}.parquet"


def reference_columns(per_token: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(sum, average, per-token float32) of one completion.

    The sum is taken in float64 over the float32 values that are stored, so that
    `sum == sum(per_token)` holds for whoever reads the shard.
    """
    values = np.asarray(per_token, dtype=np.float32)
    total = float(values.astype(np.float64).sum())
    return total, total / len(values), values


def schema_for(with_text: bool, vision: bool = False) -> pa.Schema:
    """The shard columns: the contract's, the images' (vision folders), the text."""
    fields = [*SCHEMA, *(VISION_FIELDS if vision else [])]
    if with_text:
        fields += [pa.field(c, pa.string()) for c in TEXT_COLUMNS]
    return pa.schema(fields)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WRITE_BLOCK = 1 << 14


def write_atomic_bytes(
    path: Path, data: bytes, on_block: Callable[[int], None] | None = None
) -> None:
    """Write to a hidden temp file, fsync, then rename: readers never see half a file.

    The temp name holds the process id: two workers may write the same file (the manifest,
    with the same content) at the same time without sharing a temp file. Written in blocks;
    `on_block(bytes in the file)` runs after each (a fault point for tests).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for start in range(0, len(data), WRITE_BLOCK):
                fh.write(data[start : start + WRITE_BLOCK])
                if on_block:
                    fh.flush()  # what was written so far is in the file when the test looks
                    on_block(min(start + WRITE_BLOCK, len(data)))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_output(
    path: Path, data: bytes, kept: str, on_block: Callable[[int], None] | None = None
) -> None:
    """write_atomic_bytes for stage one's files: a failed write (disk full, a file-size
    limit) becomes one ShardError sentence naming the file, what is kept, and what to do."""
    try:
        write_atomic_bytes(path, data, on_block)
    except OSError as err:
        raise ShardError(
            f"could not write {path} ({err}); {kept}. Free disk space or raise the file-size "
            "limit, then rerun the same command"
        ) from err


_shard_bytes = [0]  # shard bytes this process has written, for the fault point


def _metadata_digest(metadata: dict) -> str:
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def write_shard(
    path: Path, rows: list[dict[str, Any]], with_text: bool, metadata: dict, vision: bool = False
) -> str:
    """Write one shard atomically; returns its sha256. `rows` may be empty (all dropped).

    Every data page carries a CRC and the refdpo metadata its own digest, so that a rerun
    that finds the shard without a manifest can tell a damaged file (`check_shard`)."""
    metadata = {**metadata, METADATA_DIGEST: _metadata_digest(metadata)}
    schema = schema_for(with_text, vision).with_metadata(
        {METADATA_KEY: json.dumps(metadata).encode()}
    )
    columns = {name: [row[name] for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        write_page_checksum=True,
    )
    data = sink.getvalue().to_pybytes()
    done = _shard_bytes[0]  # a test stops us after N bytes of shards written in all
    hook = None
    if "shard_bytes" in faults.armed():
        hook = lambda n: faults.pause("shard_bytes", done + n)  # noqa: E731
    write_output(path, data, "no partial file was left", hook)
    _shard_bytes[0] += len(data)
    return hashlib.sha256(data).hexdigest()


def check_alignment(name: str, table: pa.Table) -> None:
    """One stored value per completion token, in every row (what `refdpo inspect` checks and
    training checks on each shard it reads): values shifted between rows (a damaged or
    hand-edited shard whose checksum was redone) fail here, not later as a shape error."""
    for side, completion in (("win", "chosen"), ("rej", "rejected")):
        values = pc.list_value_length(table[f"ref_{side}_per_token_logp"])
        tokens = pc.list_value_length(table[f"{completion}_ids"])
        bad = pc.indices_nonzero(pc.not_equal(values, tokens))
        if len(bad):
            row = bad[0].as_py()
            raise ShardError(
                f"{name}: pair {table['id'][row]} has {values[row]} ref_{side}_per_token_logp "
                f"values for {tokens[row]} {completion}_ids; the shard is damaged, check it with "
                "`refdpo inspect` and rerun stage one"
            )


def shard_metadata(path: Path) -> dict:
    """The refdpo key-value metadata stored in a shard's footer."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as err:
        raise ShardError(f"{path.name}: not a readable Parquet file ({err})") from None
    if METADATA_KEY not in meta:
        raise ShardError(f"{path.name}: no refdpo metadata; not written by refdpo precompute")
    try:
        found = json.loads(meta[METADATA_KEY])
    except ValueError:  # a damaged footer: JSONDecodeError, or bytes that are not UTF-8
        found = None
    if not isinstance(found, dict):
        raise ShardError(f"{path.name}: its refdpo metadata is not a JSON object (damaged)")
    return found


def check_shard(path: Path, schema: pa.Schema) -> dict:
    """Read a whole shard and check what can be checked without a manifest's checksum: every
    data page against its CRC, the metadata against its digest, the footer's two copies of
    the metadata against each other (`pq.read_schema` returns the one inside pyarrow's stored
    schema, `pq.read_table` the plain key-value one), the columns, the alignment of values
    with tokens, the row count. Returns the metadata; a ShardError names the file and the
    problem. (Shards written before the CRCs and the digest get the other checks.)"""
    meta = shard_metadata(path)
    rest = {k: v for k, v in meta.items() if k != METADATA_DIGEST}
    if METADATA_DIGEST in meta and meta[METADATA_DIGEST] != _metadata_digest(rest):
        raise ShardError(f"{path.name}: its refdpo metadata does not match its digest (damaged)")
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        table = parquet.read()
        footer = (parquet.metadata.metadata, parquet.schema_arrow.metadata)
        copies = [(m or {}).get(METADATA_KEY) for m in footer]
    except Exception as err:  # whatever a damaged page makes pyarrow raise
        raise ShardError(f"{path.name}: not a readable Parquet file ({err})") from None
    if copies[0] != copies[1]:
        raise ShardError(f"{path.name}: the two copies of its refdpo metadata differ (damaged)")
    if not table.schema.remove_metadata().equals(schema):
        raise ShardError(f"{path.name}: its columns are not those this run writes")
    check_alignment(path.name, table)
    if table.num_rows != meta.get("rows"):
        raise ShardError(
            f"{path.name}: {table.num_rows} rows, its metadata says {meta.get('rows')}"
        )
    return meta


def write_manifest(folder: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    write_output(folder / MANIFEST, data, "every shard is complete and kept")


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShardError(
            f"{folder}: no {MANIFEST}; stage one has not finished there. Rerun the same "
            "precompute command: it keeps complete shards and redoes the rest"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: schema_version {manifest.get('schema_version')!r}, this refdpo reads "
            f"{SCHEMA_VERSION}; rerun stage one with this version"
        )
    return manifest


def check_files(folder: Path, manifest: dict) -> None:
    """Every listed shard present with its checksum; no stray Parquet files beside them."""
    folder = Path(folder)
    listed = {s["file"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        path = folder / shard["file"]
        if not path.exists():
            raise ShardError(f"{shard['file']}: listed in {MANIFEST} but missing")
        if sha256_file(path) != shard["sha256"]:
            raise ShardError(
                f"{shard['file']}: sha256 differs from {MANIFEST} (corrupted or replaced)"
            )
    stray = sorted(p.name for p in folder.glob("*.parquet") if p.name not in listed)
    if stray:
        raise ShardError(f"{stray[0]}: a Parquet file not in {MANIFEST}; remove it")


def iter_shards(
    folder: Path, manifest: dict, columns: list[str] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """(file name, table) per shard, one shard in memory at a time."""
    for shard in manifest["shards"]:
        path = Path(folder) / shard["file"]
        try:
            yield shard["file"], pq.read_table(path, columns=columns)
        except Exception as err:
            raise ShardError(f"{shard['file']}: unreadable Parquet ({err})") from None
