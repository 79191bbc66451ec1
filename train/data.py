"""Stage-two input: check a shard folder, then stream its pairs in a reproducible order.

Order. Epoch e visits the shards in a permutation drawn from (seed, e) and the rows of each
shard in a permutation drawn from (seed, e, shard); only one shard is in memory at a time,
so a dataset larger than memory trains. Global step s takes the next `global_batch` rows of
that order (rows left over at the end of an epoch are skipped), so the data position of a
run is just its step: a resumed run skips straight to it by the manifest's row counts.
Every rank reads the same global batch and keeps its own slice.

Length grouping (optional). The shuffled order is cut into windows of `group` global
batches; within a window the rows are sorted by length, cut into global batches, and those
batches are visited in an order drawn from (seed, e, window). Similar lengths then share a
micro-batch (less padding, fuller packed rows) while the order stays a function of
(seed, epoch, step), so resume still lands on the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.nn.utils.rnn import pad_sequence

from refdpo.shared.logprobs import PackedPairs, Packer, pack_pairs
from refdpo.shared.shards import (
    ShardError,
    check_alignment,
    check_files,
    read_manifest,
    shard_metadata,
)

COLUMNS = [
    "id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_win_logp", "ref_rej_logp",
    "ref_win_per_token_logp", "ref_rej_per_token_logp",
]  # fmt: skip
SOURCE = "_source"  # key added to streamed rows: (shard file, row index in it)


def open_shards(
    folder: str | Path, tokenizer_fingerprint: str, vocab_size: int, verify_checksums: bool = True
) -> dict:
    """The folder's manifest, after every check that can fail before a model loads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist; run `refdpo precompute` first")
    manifest = read_manifest(folder)
    if verify_checksums:
        check_files(folder, manifest)
    if manifest["rows"] == 0:
        raise ShardError(f"{folder}: the shards hold no pairs")
    recorded = manifest["provenance"]["tokenizer"]["fingerprint"]
    if recorded != tokenizer_fingerprint:
        raise ShardError(
            f"{folder}: provenance.tokenizer.fingerprint differs from the policy tokenizer's; the "
            "stored ids were made by another tokenizer. Precompute again with the policy's tokenizer"
        )
    if manifest.get("max_token_id", -1) >= vocab_size:
        raise ShardError(
            f"{folder}: token id {manifest['max_token_id']} is outside the policy's vocabulary "
            f"of {vocab_size}"
        )
    return manifest


class PairStream:
    """Global batches of stored pairs, in the order described in the module docstring."""

    def __init__(
        self, folder: str | Path, manifest: dict, global_batch: int, seed: int, group: int = 0
    ):
        self.folder = Path(folder)
        self.shards = [(s["file"], s["rows"]) for s in manifest["shards"]]
        self.global_batch = global_batch
        self.seed = seed
        self.group = group
        self.steps_per_epoch = manifest["rows"] // global_batch
        if self.steps_per_epoch == 0:
            raise ShardError(
                f"{folder}: {manifest['rows']} pairs do not fill one global batch of {global_batch} "
                "(micro batch x accumulation x ranks); lower them"
            )

    def _epoch_rows(self, epoch: int, skip: int) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        for k in order:
            name, rows = self.shards[k]
            if skip >= rows:
                skip -= rows
                continue
            permutation = np.random.default_rng([self.seed, epoch, int(k)]).permutation(rows)
            table = pq.read_table(self.folder / name, columns=COLUMNS)
            check_alignment(name, table)
            # rows become Python objects one global batch at a time (~10x their Arrow size)
            step = self.global_batch
            for start in range(skip, rows, step):
                taken = permutation[start : start + step]
                for index, row in zip(taken, table.take(taken).to_pylist(), strict=True):
                    row[SOURCE] = (name, int(index))  # where it came from: the step-0 check
                    yield row
            skip = 0

    def batches(self, start_step: int = 0) -> Iterator[list[dict]]:
        """Global batches for steps start_step, start_step + 1, ... (endless)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self._epoch_batches(epoch, offset)
            epoch, offset = epoch + 1, 0

    def _epoch_batches(self, epoch: int, offset: int) -> Iterator[list[dict]]:
        """Global batches offset, offset + 1, ... of one epoch."""
        if self.group <= 1:
            rows = self._epoch_rows(epoch, offset * self.global_batch)
            for _ in range(self.steps_per_epoch - offset):
                yield [next(rows) for _ in range(self.global_batch)]
            return
        first_window, skip = divmod(offset, self.group)
        rows = self._epoch_rows(epoch, first_window * self.group * self.global_batch)
        for window in range(first_window, math.ceil(self.steps_per_epoch / self.group)):
            count = min(self.group, self.steps_per_epoch - window * self.group)
            batches = length_grouped(
                [next(rows) for _ in range(count * self.global_batch)],
                self.global_batch,
                np.random.default_rng([self.seed, epoch, window, 1]),
            )
            yield from batches[skip:]
            skip = 0


def pair_length(row: dict) -> int:
    """Tokens of a pair in the policy forward: the prompt once, both completions."""
    return len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


def length_grouped(
    rows: list[dict], global_batch: int, rng: np.random.Generator
) -> list[list[dict]]:
    """Rows sorted by length (stable), cut into global batches, batches in `rng` order."""
    ordered = sorted(rows, key=pair_length)
    batches = [ordered[i : i + global_batch] for i in range(0, len(ordered), global_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class TrainBatch:
    """One micro-batch: the packed policy input and the stored reference values.

    reference_*_logps: Shape (B,). reference_*_token_logps, *_mask: Shape (B, T).
    """

    packed: PackedPairs
    ids: list[str]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    reference_chosen_logps: torch.Tensor
    reference_rejected_logps: torch.Tensor
    reference_chosen_token_logps: torch.Tensor
    reference_rejected_token_logps: torch.Tensor
    chosen_mask: torch.Tensor
    rejected_mask: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.ids)


def padded(values: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded fp32 tensor and its mask. Shape: (B, max length)."""
    tensors = [torch.tensor(v, dtype=torch.float32) for v in values]
    mask = pad_sequence([torch.ones(len(v), dtype=torch.bool) for v in values], batch_first=True)
    return pad_sequence(tensors, batch_first=True), mask


def collate(
    rows: list[dict],
    pad_token_id: int,
    packer: Packer | None = None,
    pad_multiple: int = 1,
    layout: list[list[int]] | None = None,
    pin: bool = False,
) -> TrainBatch:
    """A micro-batch for the policy: pairs packed into rows by `packer`, or one per row, or
    in a given `layout` (indices into `rows` per packed row); `pin`: page-locked host memory
    (CUDA: the copy to the device then overlaps compute)."""
    ref_chosen, chosen_mask = padded([r["ref_win_per_token_logp"] for r in rows])
    ref_rejected, rejected_mask = padded([r["ref_rej_per_token_logp"] for r in rows])
    if layout is None and packer:
        layout = packer.rows([pair_length(r) for r in rows])
    packed = pack_pairs(
        [r["prompt_ids"] for r in rows],
        [r["chosen_ids"] for r in rows],
        [r["rejected_ids"] for r in rows],
        pad_token_id,
        rows=layout,
        pad_multiple=pad_multiple,
    )
    if pin:
        packed = packed.pin_memory()
        ref_chosen, ref_rejected = ref_chosen.pin_memory(), ref_rejected.pin_memory()
    return TrainBatch(
        packed=packed,
        ids=[r["id"] for r in rows],
        chosen_ids=[r["chosen_ids"] for r in rows],
        rejected_ids=[r["rejected_ids"] for r in rows],
        reference_chosen_logps=torch.tensor([r["ref_win_logp"] for r in rows], dtype=torch.float32),
        reference_rejected_logps=torch.tensor(
            [r["ref_rej_logp"] for r in rows], dtype=torch.float32
        ),
        reference_chosen_token_logps=ref_chosen,
        reference_rejected_token_logps=ref_rejected,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
    )


def micro_batches(global_rows: list[dict], micro: int, world: int, rank: int) -> list[list[dict]]:
    """This rank's micro-batches of a global batch: micro-batch m of rank r holds rows
    [(m * world + r) * micro, (m * world + r + 1) * micro)."""
    steps = len(global_rows) // (micro * world)
    return [
        global_rows[(m * world + rank) * micro : (m * world + rank + 1) * micro]
        for m in range(steps)
    ]


def eval_batches(
    folder: str | Path, manifest: dict, micro: int, world: int, rank: int
) -> Iterator[tuple[list[dict], bool]]:
    """Every eval pair once, in stored order, split across ranks (rank r takes every world-th
    micro-batch); no shuffling, no dropping. Yields (rows, real).

    Every rank gets the same number of micro-batches, ceil(total / world): under ZeRO-3 each
    forward is a chain of all-gathers that every rank must join, so a rank without a batch of
    its own runs a padding batch (a copy of the first micro-batch, `real` False) whose results
    its caller weights out."""
    sizes = [shard["rows"] for shard in manifest["shards"]]
    total = sum(math.ceil(n / micro) for n in sizes)
    mine = 0
    index = 0
    for shard in manifest["shards"]:
        table = pq.read_table(Path(folder) / shard["file"], columns=COLUMNS)
        for start in range(0, table.num_rows, micro):
            if index % world == rank:
                mine += 1
                yield table.slice(start, micro).to_pylist(), True
            index += 1
    if mine < math.ceil(total / world):
        first = manifest["shards"][0]["file"]
        padding = pq.read_table(Path(folder) / first, columns=COLUMNS).slice(0, micro)
        for _ in range(math.ceil(total / world) - mine):
            yield padding.to_pylist(), False


def scoring_batch(
    folder: str | Path, source: tuple[str, int]
) -> tuple[list[dict], list[list[int]], dict] | None:
    """The rows stage one scored in one forward with the row `source` (shard file, row), their
    layout (indices into those rows per packed row) and the shard's scoring record (padding
    multiple, chunk size); None for shards written before stage one recorded its layout."""
    name, row = source
    scoring = shard_metadata(Path(folder) / name).get("scoring")
    if not scoring:
        return None
    batch = next((b for b in scoring["batches"] if any(row in r for r in b)), None)
    if batch is None:  # its batch held a pair dropped after scoring
        return None
    indices = [i for r in batch for i in r]
    table = pq.read_table(Path(folder) / name, columns=COLUMNS).take(indices)
    position = {shard_row: k for k, shard_row in enumerate(indices)}
    return table.to_pylist(), [[position[i] for i in r] for r in batch], scoring


class Prefetcher:
    """This rank's collated micro-batches of each step, prepared one step ahead in a thread.

    Reading the shards and building the packed tensors is Python work on the host; done here
    while the device runs the current step, it leaves the critical path. The order is the
    stream's, so training is the same as without it, bit for bit."""

    def __init__(self, batches: Iterator[list[dict]], prepare):
        from concurrent.futures import ThreadPoolExecutor

        self._batches, self._prepare = batches, prepare
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refdpo-batches")
        self._next = self._pool.submit(self._build)

    def _build(self):
        return self._prepare(next(self._batches))

    def __next__(self):
        ready = self._next.result()  # an error reading the shards is raised here
        self._next = self._pool.submit(self._build)
        return ready

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
