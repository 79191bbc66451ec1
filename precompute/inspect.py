"""refdpo inspect DIR: validate a shard folder against the schema-1 contract and summarise it.

Checks the manifest (schema version, every shard present with its sha256, no stray files),
each shard's columns and provenance, the per-row invariants (per-token lengths equal the
completion lengths, sums and averages agree with the per-token values, everything finite)
and that every id appears once. Exit code 1 names the first shard and problem found.

A vision folder (provenance.vision) also gets its image store checked: every image file the
manifest lists present with its checksum and row count, every image a pair names stored, and
per pair one token count and one extras entry per image, all the image tokens inside
prompt_ids. The summary adds image counts, reuse, sizes, the family and the layout self-test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refdpo.shared.image_store import ImageStore
from refdpo.shared.logs import stdout_closed
from refdpo.shared.shards import (
    MANIFEST,
    SCHEMA,
    VISION_FIELDS,
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


def _list_lengths(table: pa.Table, column: str) -> np.ndarray:
    """Lengths of a list column, a null list counted as empty (a text-only pair's images)."""
    return pc.list_value_length(table[column]).fill_null(0).to_numpy(zero_copy_only=False)


def stored_image_sizes(folder: Path, manifest: dict) -> dict[str, tuple[int, int]]:
    """sha256 -> (width, height) of every stored image, after checking each listed image file
    against the manifest (present, its sha256, its row count) and that no other is there; a
    ShardError names the file. With --image-store paths, every image file must still exist."""
    if "vision" not in manifest:
        raise ShardError(f"{folder}: provenance.vision but no vision section in {MANIFEST}")
    files = manifest["vision"]["image_files"]
    by_path = manifest["provenance"]["vision"].get("image_store") == "paths"
    # presence, checksums, no stray file, every file readable with the image columns
    ImageStore(folder, files, verify=True).close()
    sizes: dict[str, tuple[int, int]] = {}
    for entry in files:
        table = pq.read_table(folder / entry["file"], columns=["sha256", "width", "height", "path"])
        if table.num_rows != entry["images"]:
            raise ShardError(
                f"{entry['file']}: {table.num_rows} images, {MANIFEST} says {entry['images']}"
            )
        rows = zip(*(table[c].to_pylist() for c in table.column_names), strict=True)
        for sha, width, height, path in rows:
            # path mode keeps no bytes: the file is the image (inline images keep theirs)
            if by_path and path and not Path(path).is_file():
                raise ShardError(f"{entry['file']}: image {sha} is stored as {path}, now gone")
            sizes.setdefault(sha, (width, height))
    return sizes


def check_pair_images(
    name: str, table: pa.Table, stored: dict, extras_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's image columns agree with each other, its prompt and the image store;
    returns (images, image tokens) per pair. A ShardError names the shard and the pair."""
    ids = table["id"]
    images = _list_lengths(table, "image_sha256")
    for column in ("image_tokens", "image_extras"):
        bad = np.flatnonzero(_list_lengths(table, column) != images)
        if len(bad):
            row = int(bad[0])
            raise ShardError(
                f"{name}: pair {ids[row]} has {images[row]} image_sha256 but "
                f"{_list_lengths(table, column)[row]} {column}"
            )
    owner = np.repeat(np.arange(table.num_rows), images)
    flat = pc.list_flatten(table["image_tokens"]).to_numpy(zero_copy_only=False)
    tokens = np.bincount(owner, weights=flat, minlength=table.num_rows).astype(np.int64)
    prompt = _lengths(table, "prompt_ids")
    bad = np.flatnonzero(tokens > prompt)
    if len(bad):
        row = int(bad[0])
        raise ShardError(
            f"{name}: pair {ids[row]} has {tokens[row]} image tokens in a prompt of {prompt[row]}"
        )
    # one value per field the family records per image (Qwen's grid t, h, w; LLaVA none)
    extras = pc.list_value_length(pc.list_flatten(table["image_extras"])).fill_null(0)
    bad = np.flatnonzero(extras.to_numpy(zero_copy_only=False) != extras_width)
    if len(bad):
        raise ShardError(
            f"{name}: pair {ids[int(owner[bad[0]])]} has an image_extras entry of "
            f"{extras[int(bad[0])]} values, the family records {extras_width}"
        )
    for k, sha in enumerate(pc.list_flatten(table["image_sha256"]).to_pylist()):
        if sha not in stored:
            raise ShardError(
                f"{name}: pair {ids[int(owner[k])]} refers to image {sha}, which is not in the "
                "image store (the folder is incomplete, or shards of another run were mixed in)"
            )
    return images, tokens


def validate(folder: Path) -> tuple[dict, dict]:
    """(manifest, summary) of a valid folder; raises ShardError naming the problem."""
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    vision = manifest["provenance"].get("vision")
    stored = stored_image_sizes(Path(folder), manifest) if vision else {}
    fields = [*SCHEMA, *(VISION_FIELDS if vision else [])]
    seen: set[str] = set()
    columns: dict[str, list[np.ndarray]] = {}
    for name, table in iter_shards(folder, manifest):
        for field in fields:
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
        if vision:
            images, tokens = check_pair_images(
                name, table, stored, len(vision.get("extras_fields", []))
            )
            columns.setdefault("images", []).append(images)
            columns.setdefault("image_tokens", []).append(tokens)
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
    col = {k: np.concatenate(v) for k, v in columns.items()}
    summary = summarize(manifest, col)
    if vision:
        summary["vision"] = summarize_vision(manifest, stored, col["images"], col["image_tokens"])
    return manifest, summary


def percentiles(values: np.ndarray) -> dict | None:
    """p50, p90, p99 and max, as integers; None for no values."""
    if len(values) == 0:
        return None
    return {f"p{q}": int(np.percentile(values, q)) for q in (50, 90, 99)} | {
        "max": int(values.max())
    }


def summarize(manifest: dict, col: dict[str, np.ndarray]) -> dict:
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


def self_test_outcome(test: dict) -> dict:
    """One layout self-test of stage one: the layout it chose and that layout's measured
    difference from the model's own forward (the statistic its dtype uses: max or mean)."""
    chosen = test.get("chosen")
    measured = test["layouts"].get(chosen) or {}
    statistic = test["tolerance"]["statistic"]
    return {
        "chosen": chosen,
        "statistic": statistic,
        "difference": measured.get(f"{statistic}_abs_diff"),
        "tolerance": test["tolerance"]["value"],
        "dtype": test["tolerance"]["dtype"],
        "pairs": test["pairs"],
        "tokens": test["tokens"],
    }


def summarize_vision(
    manifest: dict, sizes: dict[str, tuple[int, int]], images: np.ndarray, tokens: np.ndarray
) -> dict:
    """Image counts and sizes of a vision folder; `images` and `tokens` are per pair.
    Per-pair percentiles are over the pairs with images, size ones over the stored images."""
    recorded = manifest["provenance"]["vision"]
    with_images = images > 0
    references, stored = int(images.sum()), len(sizes)
    widths = np.array([w for w, _ in sizes.values()], dtype=np.int64)
    heights = np.array([h for _, h in sizes.values()], dtype=np.int64)
    return {
        "pairs_with_images": int(with_images.sum()),
        "text_only_pairs": int((~with_images).sum()),
        "images_stored": stored,
        "image_references": references,
        "reuse": references / stored if stored else 0.0,
        "images_per_pair": percentiles(images[with_images]),
        "image_tokens_per_pair": percentiles(tokens[with_images]),
        "width": percentiles(widths),
        "height": percentiles(heights),
        "image_store": recorded["image_store"],
        "family": recorded["family"],
        "processor": recorded["processor"]["class"],
        "self_tests": [self_test_outcome(t) for t in manifest["vision"].get("self_tests", [])],
    }


def _table(title: str, rows: dict[str, dict | None]) -> list[str]:
    lines = [f"{title:<22}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"]
    for name, p in rows.items():
        if p is not None:
            lines.append(f"{name:<22}{p['p50']:>8}{p['p90']:>8}{p['p99']:>8}{p['max']:>8}")
    return lines


def render_vision(v: dict) -> list[str]:
    lines = [
        f"images: {v['pairs_with_images']} pairs with images, {v['text_only_pairs']} text-only; "
        f"{v['images_stored']} stored, {v['image_references']} references "
        f"(reuse {v['reuse']:.2f}x), store mode {v['image_store']}",
        *_table("per pair with images", {
            "images": v["images_per_pair"], "image tokens": v["image_tokens_per_pair"]
        }),
        *_table("stored image (px)", {"width": v["width"], "height": v["height"]}),
        f"vision: family {v['family']}, processor {v['processor']}",
    ]  # fmt: skip
    for t in v["self_tests"] or [None]:
        if t is None:
            lines.append("layout self-test: none recorded")
            continue
        lines.append(
            f"layout self-test: {t['chosen']} chosen, {t['statistic']} |layout - model's own "
            f"forward| {t['difference']:.3g} per token on {t['pairs']} pairs ({t['tokens']} "
            f"tokens; tolerance {t['tolerance']:.3g}, {t['dtype']})"
        )
    return lines


def render(folder: Path, summary: dict) -> str:
    lines = [f"{folder}: OK, {summary['rows']} pairs from {summary['input_rows']} input rows"]
    dropped = summary["dropped"] or {"none": 0}
    lines.append("dropped: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    truncated = {k: v for k, v in summary["truncated"].items() if v} or {"none": 0}
    lines.append("truncated: " + ", ".join(f"{k}={v}" for k, v in truncated.items()))
    lines += _table("tokens", summary["tokens"])
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
    if "vision" in summary:
        lines += render_vision(summary["vision"])
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
