"""Stage-two data order and batch layout, without a model: the epoch permutation over the
whole folder, length grouping, resume positions, bounded row-group reads, and packed
micro-batches."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refdpo.shared.logprobs import Packer
from refdpo.shared.shards import ShardError
from refdpo.train.data import SOURCE, PairStream, collate, pair_length


def write_shards(
    folder: Path, sizes: list[int], seed: int = 0, row_group_size: int | None = None
) -> dict:
    """Shard files of random-length pairs and the part of a manifest PairStream reads. Pair
    n of the folder (shard after shard) has id pair-n; `row_group_size` None: one row group
    per shard (shards written before stage one wrote groups of 64 rows)."""
    rng = np.random.default_rng(seed)
    shards, n = [], 0
    for k, size in enumerate(sizes):
        rows = []
        for _ in range(size):
            p, c, r = (int(rng.integers(1, high)) for high in (40, 30, 30))
            rows.append({
                "id": f"pair-{n}",
                "prompt_ids": rng.integers(1, 99, p).tolist(),
                "chosen_ids": rng.integers(1, 99, c).tolist(),
                "rejected_ids": rng.integers(1, 99, r).tolist(),
                "ref_win_logp": -float(c), "ref_rej_logp": -float(r),
                "ref_win_per_token_logp": [-1.0] * c, "ref_rej_per_token_logp": [-1.0] * r,
            })  # fmt: skip
            n += 1
        name = f"part-00000-{k:05d}.parquet"
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, folder / name, row_group_size=row_group_size or len(rows))
        shards.append({"file": name, "rows": size})
    return {"shards": shards, "rows": n}


def ids(batches) -> list[list[str]]:
    return [[row["id"] for row in batch] for batch in batches]


def take(stream: PairStream, start: int, count: int) -> list[list[dict]]:
    iterator = stream.batches(start)
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("stream")
    return root, write_shards(root, [23, 17, 30])  # 70 pairs


@pytest.mark.parametrize("group", [0, 4])
def test_an_epoch_visits_distinct_pairs_and_repeats_per_seed(folder, group):
    root, manifest = folder
    stream = PairStream(root, manifest, global_batch=8, seed=3, group=group)
    epoch = ids(take(stream, 0, stream.steps_per_epoch))
    flat = [i for batch in epoch for i in batch]
    assert len(flat) == len(set(flat)) == 8 * (70 // 8)
    assert epoch == ids(take(PairStream(root, manifest, 8, seed=3, group=group), 0, 8))
    assert epoch != ids(take(PairStream(root, manifest, 8, seed=4, group=group), 0, 8))


@pytest.mark.parametrize("group", [0, 3, 4])
def test_resume_at_any_step_continues_the_same_order(folder, group):
    """Across windows and the epoch boundary: batches(s) is batches(0) from step s on."""
    root, manifest = folder
    stream = PairStream(root, manifest, global_batch=8, seed=1, group=group)
    straight = ids(take(stream, 0, 20))  # 8 steps per epoch: crosses two epochs
    for start in range(20):
        assert ids(take(stream, start, 20 - start)) == straight[start:], start


def test_length_grouping_puts_similar_lengths_together(folder):
    root, manifest = folder
    plain = take(PairStream(root, manifest, 8, seed=0, group=0), 0, 8)
    grouped = take(PairStream(root, manifest, 8, seed=0, group=8), 0, 8)

    def spread(batches) -> float:  # mean (longest - shortest) pair in a batch
        return float(np.mean([np.ptp([pair_length(r) for r in b]) for b in batches]))

    assert spread(grouped) < 0.5 * spread(plain)
    # same pairs in the epoch, only the order differs
    flat = [[i for batch in ids(b) for i in batch] for b in (grouped, plain)]
    assert sorted(flat[0]) == sorted(flat[1])


def test_packed_collate_keeps_pair_order_and_reference_values(folder):
    root, _ = folder
    rows = pq.read_table(root / "part-00000-00000.parquet").to_pylist()[:8]
    lengths = [pair_length(r) for r in rows]
    padded, packed = collate(rows, 0, None), collate(rows, 0, Packer(capacity=2 * max(lengths)))
    assert packed.packed.input_ids.shape[0] < padded.packed.input_ids.shape[0]
    assert packed.packed.num_tokens == padded.packed.num_tokens == sum(lengths)
    for name in ("target_ids", "target_pair", "target_is_rejected"):
        assert getattr(packed.packed, name).tolist() == getattr(padded.packed, name).tolist()
    assert packed.reference_chosen_logps.tolist() == [r["ref_win_logp"] for r in rows]


# ---------------------------------------------------------------- order over the whole folder

SIZES = [150, 70, 30, 200]  # 450 pairs in four shards: whole and partial row groups of 64


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> tuple[Path, dict]:
    """The shards stage one writes now: row groups of 64 rows."""
    root = tmp_path_factory.mktemp("groups")
    return root, write_shards(root, SIZES, seed=5, row_group_size=64)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, dict]:
    """The same pairs as `grouped`, written as older shards: one row group per shard."""
    root = tmp_path_factory.mktemp("whole")
    return root, write_shards(root, SIZES, seed=5)


def numbers(batches) -> list[int]:
    """The folder numbers of the streamed pairs (pair-n is pair n, shard after shard)."""
    return [int(i.removeprefix("pair-")) for batch in ids(batches) for i in batch]


@pytest.mark.parametrize("epoch", [0, 1])
def test_an_epoch_is_numpys_permutation_of_the_whole_folder(grouped, epoch):
    """Every pair at most once, steps x batch of them, in the order numpy's permutation of
    all 450 pairs for (seed, epoch) gives: a global batch mixes every shard."""
    root, manifest = grouped
    stream = PairStream(root, manifest, global_batch=16, seed=7)
    steps = stream.steps_per_epoch
    epoch_batches = take(stream, epoch * steps, steps)
    seen = numbers(epoch_batches)
    assert len(seen) == len(set(seen)) == steps * 16 == 448
    assert seen == np.random.default_rng([7, epoch]).permutation(450)[: steps * 16].tolist()
    first_shards = {row[SOURCE][0] for row in epoch_batches[0]}
    assert len(first_shards) >= 3  # (a random 16 fall in two shards with p ~ 0.02: seeded)


def test_rows_name_their_shard_and_row(grouped):
    """SOURCE is (shard file, row in it): the step-0 check reads the shard's scoring batch."""
    root, manifest = grouped
    (batch,) = take(PairStream(root, manifest, global_batch=32, seed=0), 3, 1)
    files = {s["file"]: pq.read_table(root / s["file"]) for s in manifest["shards"]}
    for row in batch:
        name, index = row[SOURCE]
        stored = files[name].slice(index, 1).to_pylist()[0]
        assert {k: row[k] for k in stored} == stored
    assert set(batch[0]) == {*files[name].column_names, SOURCE}


def test_seeds_give_different_orders_the_same_seed_the_same(grouped):
    root, manifest = grouped
    orders = [numbers(take(PairStream(root, manifest, 16, seed=s), 0, 5)) for s in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2]


@pytest.mark.parametrize("group", [0, 3])
def test_resume_across_the_epoch_boundary(grouped, group):
    """batches(k) continues batches(0) from step k, across the end of epoch 0 (28 steps)."""
    root, manifest = grouped
    stream = PairStream(root, manifest, global_batch=16, seed=2, group=group)
    straight = ids(islice(stream.batches(0), 34))
    for start in (1, 13, 26, 27, 28, 29):
        resumed = PairStream(root, manifest, global_batch=16, seed=2, group=group)
        assert ids(islice(resumed.batches(start), 34 - start)) == straight[start:], start


@pytest.mark.parametrize("group", [0, 4])
def test_single_row_group_shards_give_the_same_batches(grouped, whole, group):
    batches = [
        take(PairStream(*folder, 16, seed=3, group=group), 0, 30) for folder in (grouped, whole)
    ]
    assert batches[0] == batches[1]
    assert batches[1][0][0]["prompt_ids"]  # whole rows, not only their ids


def test_length_grouping_sorts_windows_of_the_permuted_order(grouped):
    """Group g: the pairs of a window are those of g global batches of the plain order."""
    root, manifest = grouped
    plain = numbers(take(PairStream(root, manifest, 16, seed=4), 0, 28))
    window = numbers(take(PairStream(root, manifest, 16, seed=4, group=4), 0, 4))
    assert sorted(window) == sorted(plain[:64])
    assert window != plain[:64]


def test_reads_only_the_row_groups_a_batch_needs(grouped, monkeypatch):
    """No shard is read whole; a batch decodes each row group it touches once, and groups
    cached by earlier steps are not decoded again."""
    root, manifest = grouped
    monkeypatch.setattr(pq, "read_table", None)  # any whole-shard read fails
    stream = PairStream(root, manifest, global_batch=16, seed=0)
    (batch,) = take(stream, 0, 1)
    touched = {(row[SOURCE][0], row[SOURCE][1] // 64) for row in batch}
    assert stream.reader.decoded == len(touched) < len(batch)
    take(stream, 0, 1)
    assert stream.reader.decoded == len(touched)  # all cached (the folder is ~0.5 MB)


def test_the_cache_keeps_to_its_byte_budget(grouped):
    root, manifest = grouped
    group_bytes = pq.ParquetFile(root / manifest["shards"][0]["file"]).read_row_group(0).nbytes
    budget = 3 * group_bytes
    stream = PairStream(root, manifest, global_batch=16, seed=0, cache_bytes=budget)
    for _ in islice(stream.batches(0), 40):
        assert 0 < stream.reader.cached_bytes <= budget
    assert stream.reader.decoded > 40  # a small budget decodes again what it let go


def test_misaligned_values_are_refused_naming_the_shard(tmp_path):
    manifest = write_shards(tmp_path, [20, 20])
    path = tmp_path / manifest["shards"][1]["file"]
    table = pq.read_table(path)
    values = table["ref_win_per_token_logp"].to_pylist()
    column = pa.array(values[1:] + values[:1], table.schema.field("ref_win_per_token_logp").type)
    pq.write_table(table.set_column(6, "ref_win_per_token_logp", column), path)
    with pytest.raises(ShardError, match=f"{path.name}: pair pair-20 has"):
        take(PairStream(tmp_path, manifest, global_batch=40, seed=0), 0, 1)


def test_the_left_over_pairs_are_described_and_change_per_epoch(grouped):
    root, manifest = grouped
    stream = PairStream(root, manifest, global_batch=32, seed=0)  # 14 steps: 448 of 450
    assert stream.leftover_note == (
        "each epoch uses 448 of 450 pairs (global batch 32); the 2 left over change with "
        "each epoch's shuffle"
    )
    left = [set(range(450)) - set(numbers(take(stream, e * 14, 14))) for e in (0, 1)]
    assert len(left[0]) == len(left[1]) == 2 and left[0] != left[1]
    assert PairStream(root, manifest, global_batch=45, seed=0).leftover_note is None


def test_an_unreadable_shard_is_one_sentence_naming_it(tmp_path):
    manifest = write_shards(tmp_path, [20, 20])
    path = tmp_path / manifest["shards"][0]["file"]
    path.write_bytes(path.read_bytes()[:100])  # checksums not verified: open_shards does that
    with pytest.raises(ShardError, match=f"{path.name}: not a readable Parquet file"):
        take(PairStream(tmp_path, manifest, global_batch=40, seed=0), 0, 1)
