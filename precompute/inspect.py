"""refdpo inspect DIR: validate a shard folder against the schema-1 contract and summarise it.

Checks the manifest (schema version, every shard present with its sha256, no stray files),
each shard's columns and provenance, the per-row invariants (per-token lengths equal the
completion lengths, sums and averages agree with the per-token values, everything finite)
and that every id appears once. Exit code 1 names the first shard and problem found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refdpo.shared.logs import stdout_closed
from refdpo.shared.shards import (
    SCHEMA,
    ShardError,
    check_alignment,
    check_files,
    iter_shards,
    read_manifest,
    shard_metadata,
)

SIDES = (("win", "chosen"), ("rej", "rejected"))


def _lengths(table: pa.Table, column: str) -> np.ndarray:
    return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)


def _check_side(name: str, table: pa.Table, side: str, completion: str) -> None:
    lengths = _lengths(table, f"{completion}_ids")
    per_token = table[f"ref_{side}_per_token_logp"]
    if (lengths == 0).any():
        raise ShardError(f"{name}: an empty {completion}_ids")
    values = pc.list_flatten(per_token).to_numpy(zero_copy_only=False).astype(np.float64)
    total = table[f"ref_{side}_logp"].to_numpy()
    average = table[f"ref_{side}_avg_logp"].to_numpy()
    if not (np.isfinite(values).all() and np.isfinite(total).all() and np.isfinite(average).all()):
        raise ShardError(f"{name}: NaN or inf in the ref_{side} columns")
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sums = np.add.reduceat(values, offsets) if len(values) else np.zeros(0)
    if not np.allclose(sums, total, rtol=1e-9, atol=1e-6):
        raise ShardError(f"{name}: ref_{side}_logp != sum(ref_{side}_per_token_logp)")
    if not np.allclose(average, total / lengths, rtol=1e-9, atol=1e-9):
        raise ShardError(f"{name}: ref_{side}_avg_logp != ref_{side}_logp / len({completion}_ids)")


def validate(folder: Path) -> tuple[dict, dict]:
    """(manifest, summary) of a valid folder; raises ShardError naming the problem."""
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    seen: set[str] = set()
    columns: dict[str, list[np.ndarray]] = {}
    for name, table in iter_shards(folder, manifest):
        for field in SCHEMA:
            if field.name not in table.column_names:
                raise ShardError(f"{name}: column {field.name} missing")
            if table.schema.field(field.name).type != field.type:
                raise ShardError(
                    f"{name}: column {field.name} is {table.schema.field(field.name).type}, expected {field.type}"
                )
        if shard_metadata(folder / name)["provenance"] != manifest["provenance"]:
            raise ShardError(f"{name}: provenance differs from the manifest's")
        expected_rows = next(s["rows"] for s in manifest["shards"] if s["file"] == name)
        if table.num_rows != expected_rows:
            raise ShardError(f"{name}: {table.num_rows} rows, manifest says {expected_rows}")
        check_alignment(name, table)
        for side, completion in SIDES:
            _check_side(name, table, side, completion)
        for pair_id in table["id"].to_pylist():
            if pair_id in seen:
                raise ShardError(f"{name}: id {pair_id!r} appears more than once")
            seen.add(pair_id)
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            columns.setdefault(column, []).append(_lengths(table, column))
        for column in ("ref_win_logp", "ref_rej_logp", "ref_win_avg_logp", "ref_rej_avg_logp"):
            columns.setdefault(column, []).append(table[column].to_numpy())
    if len(seen) != manifest["rows"]:
        raise ShardError(f"{folder}: {len(seen)} rows in shards, manifest says {manifest['rows']}")
    return manifest, summarize(manifest, {k: np.concatenate(v) for k, v in columns.items()})


def summarize(manifest: dict, col: dict[str, np.ndarray]) -> dict:
    def percentiles(values: np.ndarray) -> dict:
        return {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99)} | {
            "max": int(values.max())
        }

    def stats(values: np.ndarray) -> dict:
        return {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
        }

    return {
        "rows": manifest["rows"],
        "input_rows": manifest["input_rows"],
        "dropped": manifest["dropped"],
        "truncated": manifest["truncated"],
        "tokens": {c: percentiles(col[c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids")},
        "reference_logps": {
            c: stats(col[c])
            for c in ("ref_win_logp", "ref_rej_logp", "ref_win_avg_logp", "ref_rej_avg_logp")
        },
        "reference_prefers_chosen": {
            "by_sum": float((col["ref_win_logp"] > col["ref_rej_logp"]).mean()),
            "by_average": float((col["ref_win_avg_logp"] > col["ref_rej_avg_logp"]).mean()),
        },
        "model": manifest["provenance"]["model"],
        "dtype": manifest["provenance"]["dtype"],
    }


def render(folder: Path, summary: dict) -> str:
    lines = [f"{folder}: OK, {summary['rows']} pairs from {summary['input_rows']} input rows"]
    dropped = summary["dropped"] or {"none": 0}
    lines.append("dropped: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    truncated = {k: v for k, v in summary["truncated"].items() if v} or {"none": 0}
    lines.append("truncated: " + ", ".join(f"{k}={v}" for k, v in truncated.items()))
    lines.append(f"{'tokens':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for column, p in summary["tokens"].items():
        lines.append(f"{column:<22}{p['p50']:>8}{p['p90']:>8}{p['p99']:>8}{p['max']:>8}")
    lines.append(f"{'reference log-prob':<22}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}")
    for column, s in summary["reference_logps"].items():
        lines.append(
            f"{column:<22}{s['mean']:>10.3f}{s['std']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}"
        )
    prefers = summary["reference_prefers_chosen"]
    lines.append(
        f"reference prefers chosen: {prefers['by_sum']:.1%} by sum, {prefers['by_average']:.1%} by average"
    )
    lines.append(
        f"model: {summary['model']['path']} ({summary['dtype']}), fingerprint {summary['model']['fingerprint'][:12]}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="refdpo inspect",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="a precompute output folder")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        _, summary = validate(args.folder)
    except (ShardError, OSError, json.JSONDecodeError) as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(summary, indent=2) if args.json else render(args.folder, summary))
        sys.stdout.flush()  # a reader that went away (`| head`) fails here, not at exit
    except BrokenPipeError:
        return stdout_closed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
