"""The manifest: written once every shard of a split exists, by whichever worker sees that.

No process group is needed: each worker checks after its last shard, and the check that
comes after the last rename always sees every file, so at least one worker writes the
manifest. Its content is derived from the shards alone, so concurrent writers agree.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from refdpo.shared import faults
from refdpo.shared.errors import NoUsableRows
from refdpo.shared.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    ShardError,
    sha256_file,
    shard_metadata,
    shard_name,
    write_manifest,
)

logger = logging.getLogger(__name__)


class PlannedShard(NamedTuple):
    file: str
    rank: int  # the worker that writes it
    start: int  # first dataset row (position in the split)
    stop: int  # one past the last row


def plan(num_rows: int, rows_per_shard: int, world_size: int) -> list[PlannedShard]:
    """Every shard of a split.

    Shard k covers rows [k * rows_per_shard, (k + 1) * rows_per_shard) and belongs to rank
    k % world_size: ranks interleave, so each gets a similar share.
    """
    shards = []
    for k in range(math.ceil(num_rows / rows_per_shard)):
        start, stop = k * rows_per_shard, min((k + 1) * rows_per_shard, num_rows)
        rank = k % world_size
        shards.append(PlannedShard(shard_name(rank, k // world_size), rank, start, stop))
    return shards


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first key path (`truncation.max_length`) whose values differ; None if equal."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = first_difference(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{key}"
    return None


def finalize(folder: Path, shards: list[PlannedShard]) -> dict | None:
    """Write the manifest if every shard exists; None while some are still missing."""
    if any(not (folder / s.file).exists() for s in shards):
        return None
    entries, metas = [], []
    for name, _, start, stop in shards:
        meta = shard_metadata(folder / name)
        if (meta["source_start"], meta["source_stop"]) != (start, stop):
            raise ShardError(
                f"{name}: covers rows {meta['source_start']}-{meta['source_stop']}, expected {start}-{stop}"
            )
        metas.append(meta)
        entries.append(
            {
                "file": name,
                "rows": meta["rows"],
                "sha256": sha256_file(folder / name),
                "source_start": start,
                "source_stop": stop,
                "dropped": meta["dropped"],
                "truncated": meta["truncated"],
                "max_token_id": meta["max_token_id"],
            }
        )
        if meta.get("images"):
            entries[-1]["images"] = meta["images"]
    provenance = metas[0]["provenance"]
    for name, meta in zip((s.file for s in shards), metas, strict=True):
        field = first_difference(provenance, meta["provenance"])
        if field:
            raise ShardError(
                f"{name}: written with a different {field} than {shards[0].file}; "
                "rerun with --overwrite to redo the whole folder"
            )
    dropped = sum((Counter(e["dropped"]) for e in entries), Counter())
    truncated = sum((Counter(e["truncated"]) for e in entries), Counter())
    rows = sum(e["rows"] for e in entries)
    input_rows = shards[-1].stop
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "rows": rows,
        "input_rows": input_rows,
        "dropped": dict(sorted(dropped.items())),
        "truncated": dict(sorted(truncated.items())),
        "max_token_id": max(e["max_token_id"] for e in entries),  # stage two checks the vocabulary
        "provenance": provenance,
        "shards": entries,
    }
    if "vision" in provenance:
        manifest["vision"] = vision_summary(entries, metas)
    if rows + sum(dropped.values()) != input_rows:
        raise ShardError(
            f"{folder}: {rows} rows + {sum(dropped.values())} dropped != {input_rows} input rows"
        )
    if rows == 0:
        raise _remove_empty_split(folder, shards, dropped)
    faults.pause("manifest")
    write_manifest(folder, manifest)
    logger.info("%s: wrote %s (%d rows, %d dropped)", folder, MANIFEST, rows, sum(dropped.values()))
    return manifest


def vision_summary(entries: list[dict], metas: list[dict]) -> dict:
    """A vision folder's image store (its files with their checksums, as each shard recorded
    them) and the layout self-tests the workers ran (each worker's first shard)."""
    files = [e["images"] for e in entries if e.get("images")]
    tests = [m["scoring"]["vision"] for m in metas if m.get("scoring", {}).get("vision")]
    return {
        "image_files": files,
        "images": sum(f["images"] for f in files),
        "layouts": sorted({t["layout"] for t in tests}),
        # each worker's run carries its self-test into all its shards: listed once each
        "self_tests": list(
            {
                json.dumps(t["self_test"], sort_keys=True): t["self_test"]
                for t in tests
                if t.get("self_test")
            }.values()
        ),
    }


def _remove_empty_split(folder: Path, shards: list[PlannedShard], dropped: Counter) -> Exception:
    """Every shard holds 0 rows: kept, they would make a rerun find the split complete and
    fail here again without scoring (after the reference was fixed, say). They hold nothing,
    so they go. (A 0-row shard beside shards with rows is legitimate and kept.)"""
    for shard in shards:
        (folder / shard.file).unlink(missing_ok=True)
    return NoUsableRows(
        f"{folder}: no usable rows out of {shards[-1].stop}; dropped by reason: {dict(dropped)}. "
        f"Its {len(shards)} empty shard(s) were removed, so a rerun scores every row again"
    )
