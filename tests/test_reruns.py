"""Reruns, resumes and output folders: never silently wrong.

A rerun of the same command on a folder must end where a clean run ends, or refuse with one
sentence: damaged, missing, foreign or stray shards are redone (one warning each), a changed
dataset is refused, a run that failed before scoring locks nothing, a split with no usable
row keeps no empty shard, `--finalize-only` names what is missing.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from refdpo.precompute import run as precompute_run
from refdpo.precompute.inspect import validate
from refdpo.shared.errors import UsageError
from refdpo.shared.shards import (
    MANIFEST,
    METADATA_DIGEST,
    METADATA_KEY,
    ROW_GROUP_ROWS,
    check_alignment,
    write_shard,
)
from tests.conftest import build_model, write_jsonl
from tests.test_precompute import base_args, good_rows, read_sorted

# ---------------------------------------------------------------- stage one

SHARD = "part-00000-00001.parquet"  # rows [8, 16) of 20: the middle one of three


def run(*args) -> int:
    return precompute_run.main([str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    """What a reader of the folder sees: the shards and the manifest, byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "_run.json"}


def warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name.startswith("refdpo")
    ]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model_dir):
    """20 pairs in three shards, and the folder an uninterrupted run writes for them."""
    root = tmp_path_factory.mktemp("reruns")
    dataset = write_jsonl(root / "pairs.jsonl", good_rows(20))
    assert run(*base_args(tiny_model_dir, dataset, root / "clean")) == 0
    return dataset, root / "clean"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def page_byte(path: Path) -> int:
    """An offset in a data page (the chosen responses' per-token values) whose flip plain
    decoding does not notice: values change, lengths and row counts do not. Only the page's
    CRC tells."""
    data, original = path.read_bytes(), pq.read_table(path)
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    chunk = metadata.row_group(0).column(names.index("ref_win_per_token_logp.list.element"))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    for offset in range(chunk.data_page_offset, start + chunk.total_compressed_size):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        try:
            table = pq.read_table(pa.BufferReader(bytes(damaged)))
            check_alignment(path.name, table)
        except Exception:  # decoding noticed this one: look further
            continue
        if table.num_rows == original.num_rows and not table.equals(original):
            return offset
    raise AssertionError(f"no flip in {path.name} that decoding misses")


def edit_footer(path: Path) -> None:
    """One digit of max_token_id changed in the footer's plain copy of the metadata: still
    valid JSON in a readable Parquet file, every page intact."""
    data = path.read_bytes()
    found = re.search(rb'"max_token_id": (\d)', data)
    digit = b"1" if found.group(1) != b"1" else b"2"
    path.write_bytes(data[: found.start(1)] + digit + data[found.end(1) :])


def rewrite_metadata(path: Path) -> None:
    """The metadata edited and the file written again, both copies agreeing (by hand)."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    meta["max_token_id"] -= 1
    edited = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    pq.write_table(edited, path, compression="zstd", write_page_checksum=True)


def damage(case: str, out: Path, model: Path, dataset: Path, tmp_path: Path) -> str:
    """Damage `out` as `case` says; returns the file the rerun must name."""
    target = out / SHARD
    if case == "deleted":
        target.unlink()
    elif case == "flipped":
        flip(target, target.stat().st_size // 2)
    elif case == "flipped_page":
        flip(target, page_byte(target))
    elif case == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    elif case == "footer_edited":
        edit_footer(target)
    elif case == "metadata_rewritten":
        rewrite_metadata(target)
    elif case == "other_rows":
        shutil.copy(out / "part-00000-00000.parquet", target)
    elif case == "other_max_length":
        args = base_args(model, dataset, tmp_path / "other")
        args[args.index("--max-length") + 1] = 96
        assert run(*args) == 0
        shutil.copy(tmp_path / "other" / SHARD, target)
    elif case == "stray":
        target = out / "part-00000-00007.parquet"
        shutil.copy(out / "part-00000-00000.parquet", target)
    return target.name


# (damage, manifest kept, what the warning says). Without a manifest there is no checksum:
# the whole file is read (page CRCs, the metadata's digest, columns, alignment, row count)
CASES = [
    ("deleted", True, "listed in _manifest.json but missing"),
    ("flipped", True, "sha256 differs from _manifest.json"),
    ("stray", True, "not a shard of this run's plan; removed"),
    ("flipped_page", False, "not a readable Parquet file"),
    ("truncated", False, "not a readable Parquet file"),
    ("footer_edited", False, "the two copies of its refdpo metadata differ"),
    ("metadata_rewritten", False, "does not match its digest"),
    ("other_rows", False, "covers rows 0-8, this run's plan has 8-16"),
    ("other_max_length", False, "written with a different truncation.max_length"),
]


@pytest.mark.parametrize(
    ("case", "manifest", "reason"),
    CASES,
    ids=[f"{c}-{'manifest' if m else 'no_manifest'}" for c, m, _ in CASES],
)
def test_a_rerun_redoes_a_damaged_shard_and_equals_a_clean_run(
    clean, tiny_model_dir, tmp_path, caplog, case, manifest, reason
):
    """Today: `already complete, nothing to do` (exit 0) on a folder training refuses, or,
    without a manifest, the damaged shard kept and blessed with its new checksum."""
    dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    if not manifest:
        (out / MANIFEST).unlink()
    name = damage(case, out, tiny_model_dir, dataset, tmp_path)
    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    named = [w for w in warnings(caplog) if name in w]
    assert len(named) == 1 and reason in named[0], warnings(caplog)
    if case != "stray":  # a stray is removed; the manifest did not list it and stays valid
        assert "already complete" not in caplog.text
    assert files(out) == files(clean_folder)  # every shard and the manifest, byte for byte
    validate(out)
    pd.testing.assert_frame_equal(read_sorted(out), read_sorted(clean_folder))


def test_a_rerun_keeps_the_shards_that_pass_without_rewriting_them(
    clean, tiny_model_dir, tmp_path, caplog
):
    """The checks redo only what fails: the other shards are not rewritten."""
    dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    (out / MANIFEST).unlink()
    flip(out / SHARD, page_byte(out / SHARD))
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*") if p.name != SHARD}
    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert "keeping 2 complete shard(s)" in caplog.text
    assert files(out) == files(clean_folder)


def test_a_rerun_that_stops_while_redoing_leaves_no_stale_manifest(
    clean, tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """The manifest lists the old files: it goes as soon as a shard is to be redone, so a
    rerun that stops before finishing leaves a folder training refuses, not one it reads."""
    dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    flip(out / SHARD, page_byte(out / SHARD))

    def broken(*_args, **_kwargs):
        raise UsageError("the reference cannot be loaded")

    monkeypatch.setattr(precompute_run, "load_reference", broken)
    assert run(*base_args(tiny_model_dir, dataset, out)) == 2
    assert not (out / MANIFEST).exists() and not (out / SHARD).exists()
    assert "already complete" not in caplog.text


def test_each_worker_checks_and_redoes_only_its_own_shards(tiny_model_dir, tmp_path, caplog):
    """Two workers: rank 1's shard damaged under a complete manifest. Rank 0's rerun checks
    only its own shards (complete, nothing to do); rank 1's redoes its shard, removes the
    stale manifest and, finishing last, writes the new one."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(20))
    clean, out = tmp_path / "clean", tmp_path / "out"
    for rank in (0, 1):
        assert (
            run(*base_args(tiny_model_dir, dataset, clean, "--rank", rank, "--world-size", 2)) == 0
        )
    assert sorted(p.name for p in clean.glob("part-*")) == [
        "part-00000-00000.parquet", "part-00000-00001.parquet", "part-00001-00000.parquet"
    ]  # fmt: skip
    shutil.copytree(clean, out)
    theirs = out / "part-00001-00000.parquet"
    flip(theirs, theirs.stat().st_size // 2)
    damaged = theirs.read_bytes()

    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out, "--rank", 0, "--world-size", 2)) == 0
    assert "already complete" in caplog.text and not warnings(caplog)
    assert theirs.read_bytes() == damaged and (out / MANIFEST).exists()  # not rank 0's to check

    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out, "--rank", 1, "--world-size", 2)) == 0
    (warning,) = warnings(caplog)
    assert theirs.name in warning and "sha256 differs" in warning
    assert files(out) == files(clean)
    validate(out)


def test_finalize_refuses_another_workers_shard_of_other_settings(tiny_model_dir, tmp_path, caplog):
    """A worker checks only its own shards; finalize compares every shard's provenance, so a
    foreign shard of another worker is still refused, naming it and the setting."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(20))
    out, other = tmp_path / "out", tmp_path / "other"
    for rank in (0, 1):
        assert run(*base_args(tiny_model_dir, dataset, out, "--rank", rank, "--world-size", 2)) == 0
    args = base_args(tiny_model_dir, dataset, other, "--rank", 1, "--world-size", 2)
    args[args.index("--max-length") + 1] = 96
    assert run(*args) == 0
    theirs = "part-00001-00000.parquet"
    shutil.copy(other / theirs, out / theirs)
    (out / MANIFEST).unlink()
    caplog.clear()
    code = run(*base_args(tiny_model_dir, dataset, out, "--rank", 0, "--world-size", 2,
                          "--finalize-only"))  # fmt: skip
    assert code == 2 and not (out / MANIFEST).exists()
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{theirs}: written with a different" in error and "max_length" in error


@pytest.mark.parametrize("case", ["edited", "appended", "legacy_run_file", "legacy_no_manifest"])
def test_a_changed_dataset_is_refused_naming_the_dataset_fingerprint(
    tiny_model_dir, tmp_path, caplog, case
):
    """Today: `already complete`, and the shards keep the old rows. The fingerprint of each
    split is in _run.json; folders written before that are compared with the manifest's or
    the shards' provenance."""
    rows = good_rows(20)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    if case.startswith("legacy"):
        run_file = out / "_run.json"
        run_file.write_text(json.dumps(
            {k: v for k, v in json.loads(run_file.read_text()).items() if k != "dataset_fingerprint"}
        ))  # fmt: skip
        if case == "legacy_no_manifest":
            (out / MANIFEST).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    if case == "appended":
        rows += good_rows(5, offset=20)
    else:
        rows[3]["chosen"] = "Something else entirely."
    write_jsonl(dataset, rows)
    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out)) == 2
    assert "holds shards made with dataset fingerprint" in caplog.text
    assert "--overwrite" in caplog.text and "loading reference" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before
    if case == "edited":
        assert run(*base_args(tiny_model_dir, dataset, out, "--overwrite")) == 0
        assert "Something else entirely." in set(pd.read_parquet(out).chosen)


def test_a_run_that_fails_before_scoring_creates_no_folder_and_locks_nothing(
    clean, tiny_model_dir, tmp_path, caplog
):
    """Today: the folder and _run.json are made first, and the corrected command is refused
    (`holds shards made with prompt_column='question'`)."""
    dataset, clean_folder = clean
    out = tmp_path / "out"
    extra = ("--eval-fraction", 0.2)
    assert run(*base_args(tiny_model_dir, dataset, out, *extra, "--prompt-column", "question")) == 2
    assert "no usable rows" in caplog.text
    assert not out.exists() and not Path(f"{out}-eval").exists()
    assert run(*base_args(tiny_model_dir, dataset, out, *extra)) == 0
    validate(out)
    # a folder holding only the _run.json of a failed run (what older versions left) takes
    # any settings: only shards lock a folder
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(clean_folder / "_run.json", other / "_run.json")
    run_file = json.loads((other / "_run.json").read_text())
    (other / "_run.json").write_text(json.dumps(run_file | {"prompt_column": "question"}))
    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, other)) == 0, caplog.text
    assert files(other) == files(clean_folder)


def nan_model(folder: Path, tokenizer) -> None:
    """A reference whose embedding of "Z" is NaN: every pair using it scores NaN and drops
    after the model loads (as nonfinite_logps)."""
    model = build_model(len(tokenizer))
    (poison,) = tokenizer("Z", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_split_with_no_usable_row_after_scoring_keeps_no_shard(tmp_path, tokenizer, caplog):
    """Every pair drops after the model loads: the run fails ("no usable rows") and removes
    the empty shards it wrote, so that the rerun, once the reference is fixed, scores again.
    Today the rerun keeps the empty shards and fails again without scoring."""
    model = tmp_path / "model"
    nan_model(model, tokenizer)
    rows = [dict(r, chosen=r["chosen"] + " Z") for r in good_rows(12)]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(model, dataset, out)) == 2
    assert "no usable rows out of 12" in caplog.text and "nonfinite_logps" in caplog.text
    assert not list(out.glob("*.parquet")) and not (out / MANIFEST).exists()
    build_model(len(tokenizer)).save_pretrained(model)  # the reference, fixed in place
    caplog.clear()
    assert run(*base_args(model, dataset, out)) == 0
    assert "loading reference" in caplog.text
    assert validate(out)[0]["rows"] == 12


def test_an_empty_shard_beside_shards_with_rows_is_kept(tmp_path, tokenizer, caplog):
    """A 0-row shard in a split that has rows elsewhere is legitimate: kept as complete."""
    model = tmp_path / "model"
    nan_model(model, tokenizer)
    rows = [dict(r, chosen=r["chosen"] + " Z") if i < 8 else r for i, r in enumerate(good_rows(20))]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(model, dataset, out)) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [0, 8, 4]
    written = files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    (out / MANIFEST).unlink()
    caplog.clear()
    assert run(*base_args(model, dataset, out)) == 0
    assert "keeping 3 complete shard(s)" in caplog.text and not warnings(caplog)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == mtimes
    assert files(out) == written


@pytest.mark.parametrize("case", ["missing", "damaged"])
def test_finalize_only_names_a_missing_or_damaged_shard_and_fails(
    clean, tiny_model_dir, tmp_path, caplog, case
):
    """One worker, --finalize-only: today a missing shard gives "other workers still
    missing" and exit 0. It scores nothing, so what it cannot finalize is an error naming
    the shard (and its rows), and nothing is deleted."""
    dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    (out / MANIFEST).unlink()
    if case == "missing":
        (out / SHARD).unlink()
    else:
        flip(out / SHARD, page_byte(out / SHARD))
    left = files(out)
    caplog.clear()
    assert run(*base_args(tiny_model_dir, dataset, out, "--finalize-only")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    want = f"{SHARD} (rows [8, 16))" if case == "missing" else f"{SHARD}: not a readable"
    assert len(errors) == 1 and want in errors[0] and "without --finalize-only" in errors[0]
    assert "other workers" not in caplog.text
    assert files(out) == left  # nothing deleted, no manifest written


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_an_output_that_is_a_file_is_one_clear_sentence(
    clean, tiny_model_dir, tmp_path, caplog, case
):
    dataset, _ = clean
    (tmp_path / "taken").write_text("a user's file")
    output = tmp_path / "taken" if case == "file" else tmp_path / "taken" / "shards"
    assert run(*base_args(tiny_model_dir, dataset, output)) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "is a file, not a folder" in error and "Errno" not in error
    assert (tmp_path / "taken").read_text() == "a user's file"
    assert "loading reference" not in caplog.text


def test_shards_are_written_in_small_row_groups_with_page_checksums(tmp_path):
    """Stage two reads only the row groups a batch needs; a rerun without a manifest finds
    a flipped data page by its CRC and an edited footer by the metadata's digest."""
    rows = [
        {"id": str(i), "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5],
         "ref_win_logp": -1.0, "ref_rej_logp": -2.0, "ref_win_avg_logp": -1.0,
         "ref_rej_avg_logp": -1.0, "ref_win_per_token_logp": [-1.0],
         "ref_rej_per_token_logp": [-1.0, -1.0]}
        for i in range(2 * ROW_GROUP_ROWS + 2)
    ]  # fmt: skip
    path = tmp_path / "part-00000-00000.parquet"
    write_shard(path, rows, False, {"rows": len(rows)})
    metadata = pq.ParquetFile(path).metadata
    assert ROW_GROUP_ROWS == 64
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [64, 64, 2]
    stored = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    assert set(stored) == {"rows", METADATA_DIGEST}
