"""Stage-two data order and batch layout, without a model: streaming order, length grouping,
resume positions, and packed micro-batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refdpo.shared.logprobs import Packer
from refdpo.train.data import PairStream, collate, pair_length


def write_shards(folder: Path, sizes: list[int], seed: int = 0) -> dict:
    """Shard files of random-length pairs and the part of a manifest PairStream reads."""
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
        pq.write_table(pa.Table.from_pylist(rows), folder / name)
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
