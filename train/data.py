"""Stage-two input: check a shard folder, then stream its pairs in a reproducible order.

Order. Epoch e draws one permutation of every pair of the folder, numpy's
`default_rng([seed, e]).permutation(rows)` over the pairs numbered in manifest order (shard
after shard). Global step s of the run is step o = s mod steps_per_epoch of epoch
e = s // steps_per_epoch and takes positions [o * global_batch, (o + 1) * global_batch) of
that permutation, in that order; the rows % global_batch pairs at the end of the permutation
are not used in epoch e, and as each epoch draws a new permutation, other pairs are left out
in each epoch. A global batch thus mixes pairs of the whole folder, as TRL's shuffle does
(datasets concatenated from several sources are mixed too), and the batch of a step is a
function of (seed, step, manifest, global_batch, group) only: a resumed run goes straight to
it. Every rank reads the same global batch and keeps its own slice.

Reading. Only the rows of the current global batch are read: the Parquet row groups that
hold them, decoded once and kept in an LRU cache bounded by bytes (ShardReader, 256 MiB by
default), so memory stays bounded however large the folder is. Each row group is checked
(check_alignment) when it is decoded. Stage one writes groups of 64 rows; an older shard is
one group, so a folder of them larger than the cache decodes whole shards at most steps
(slower, still bounded): precompute again to get small groups.

Length grouping (optional). The permuted order is cut into windows of `group` global
batches; within a window the rows are sorted by length (stable), cut into global batches, and
those batches are visited in an order drawn from (seed, e, window). Similar lengths then
share a micro-batch (less padding, fuller packed rows) while the order stays a function of
(seed, epoch, step), so resume still lands on the same batch.

Micro-batches. Rank r's share of a global batch is fixed slices of micro_batch_size pairs
(micro_batches), or, with a token budget, its pairs cut into micro-batches of at most N
tokens, as many on every rank (refdpo.train.batches). Either way a step trains on the same pairs.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
VISION_COLUMNS = ["image_sha256", "image_tokens", "image_extras"]
SOURCE = "_source"  # key added to streamed rows: (shard file, row index in it)
CACHE_BYTES = 256 << 20  # decoded row groups ShardReader keeps between global batches


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


def columns_for(provenance: dict) -> list[str]:
    """The columns stage two reads: a vision folder's pairs also name their images."""
    return COLUMNS + VISION_COLUMNS if "vision" in provenance else COLUMNS


class ShardReader:
    """Rows of a shard folder by number (shards in manifest order, rows in file order), read
    a Parquet row group at a time.

    Decoded row groups stay in an LRU cache bounded by their Arrow size (`budget` bytes): a
    group that rows of nearby steps fall in is decoded once, not once per row (an old shard is
    one group of all its rows), and a small folder ends up wholly in memory. A file is open
    only while it is read, and only its row-group sizes are kept: a pyarrow footer of 32
    groups takes ~250 KiB, too much to hold for thousands of shards. A lock serialises
    callers (the Prefetcher reads in its own thread)."""

    def __init__(
        self,
        folder: Path,
        shards: list[tuple[str, int]],
        budget: int = CACHE_BYTES,
        columns: list[str] = COLUMNS,
    ):
        self.folder, self.budget, self.columns = folder, budget, columns
        self.names = [name for name, _ in shards]
        self.first_rows = np.cumsum([0] + [rows for _, rows in shards])[:-1]
        self._starts: dict[int, np.ndarray] = {}  # shard: first row of each of its groups
        self._cache: OrderedDict[tuple[int, int], tuple[pa.Table, int]] = OrderedDict()
        self.cached_bytes = 0
        self.decoded = 0  # row groups decoded so far
        self._lock = threading.Lock()

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row in that shard) of each pair number."""
        shard = np.searchsorted(self.first_rows, indices, side="right") - 1
        return shard, indices - self.first_rows[shard]

    def take(self, indices: np.ndarray) -> pa.Table:
        """Pairs `indices` (numbers as in `locate`), in that order, as one Arrow table."""
        ascending = np.argsort(indices, kind="stable")  # runs of one shard, then of one group
        shard, row = self.locate(indices[ascending])
        parts = []
        with self._lock:
            for k in np.unique(shard).tolist():
                parts += self._shard_rows(k, row[shard == k])
        back = np.empty_like(ascending)
        back[ascending] = np.arange(len(ascending))
        return pa.concat_tables(parts, promote_options="permissive").take(back)

    def _shard_rows(self, shard: int, rows: np.ndarray) -> list[pa.Table]:
        """Rows `rows` (ascending) of one shard: a table per row group they fall in."""
        name, file = self.names[shard], None
        try:
            if shard not in self._starts:
                file = pq.ParquetFile(self.folder / name)
                sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
                self._starts[shard] = np.cumsum([0, *sizes])[:-1]
            starts = self._starts[shard]
            group = np.searchsorted(starts, rows, side="right") - 1
            tables = {g: self._cached((shard, g)) for g in np.unique(group).tolist()}
            for g in [g for g, table in tables.items() if table is None]:
                file = file or pq.ParquetFile(self.folder / name)
                tables[g] = self._decode(file, name, g)
                self._keep((shard, g), tables[g])
        except MemoryError:
            raise  # pyarrow's is an ArrowException too: not a damaged file
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"{name}: not a readable Parquet file ({err})") from None
        finally:
            if file is not None:
                file.close()
        return [table.take(rows[group == g] - starts[g]) for g, table in tables.items()]

    def _decode(self, file: pq.ParquetFile, name: str, group: int) -> pa.Table:
        # one thread: the reads already overlap the device step (Prefetcher), and small groups
        # decode faster without the thread pool's overhead
        table = file.read_row_group(group, columns=self.columns, use_threads=False)
        check_alignment(name, table)
        self.decoded += 1
        return table.replace_schema_metadata(None)  # footers differ: groups must concatenate

    def _cached(self, key: tuple[int, int]) -> pa.Table | None:
        if key not in self._cache:
            return None
        self._cache.move_to_end(key)
        return self._cache[key][0]

    def _keep(self, key: tuple[int, int], table: pa.Table) -> None:
        size = table.nbytes
        if size > self.budget:
            return
        self._cache[key] = table, size
        self.cached_bytes += size
        while self.cached_bytes > self.budget:
            self.cached_bytes -= self._cache.popitem(last=False)[1][1]


class PairStream:
    """Global batches of stored pairs, in the order described in the module docstring."""

    def __init__(
        self,
        folder: str | Path,
        manifest: dict,
        global_batch: int,
        seed: int,
        group: int = 0,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.folder = Path(folder)
        self.shards = [(s["file"], s["rows"]) for s in manifest["shards"]]
        self.rows = sum(rows for _, rows in self.shards)
        self.global_batch = global_batch
        self.seed = seed
        self.group = group
        self.steps_per_epoch = self.rows // global_batch
        if self.steps_per_epoch == 0:
            raise ShardError(
                f"{folder}: {self.rows} pairs do not fill one global batch of {global_batch} "
                "(micro batch x accumulation x ranks); lower them"
            )
        columns = columns_for(manifest.get("provenance", {}))
        self.reader = ShardReader(self.folder, self.shards, cache_bytes, columns)
        self._permutation: tuple[int, np.ndarray | None] = (-1, None)

    @property
    def leftover_note(self) -> str | None:
        """A line for the log when a global batch cannot take every pair of an epoch."""
        used = self.steps_per_epoch * self.global_batch
        if used == self.rows:
            return None
        return (
            f"each epoch uses {used} of {self.rows} pairs (global batch {self.global_batch}); "
            f"the {self.rows - used} left over change with each epoch's shuffle"
        )

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order of the pair numbers: default_rng([seed, epoch]).permutation(
        rows), drawn by shuffling an int32 range where it fits (the same draws, half the
        memory). The latest epoch's is kept."""
        kept, order = self._permutation
        if kept != epoch or order is None:
            order = np.arange(self.rows, dtype=np.int32 if self.rows < 2**31 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(order)
            self._permutation = (epoch, order)
        return order

    def batches(self, start_step: int = 0) -> Iterator[list[dict]]:
        """Global batches for steps start_step, start_step + 1, ... (endless)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self._epoch_batches(epoch, offset)
            epoch, offset = epoch + 1, 0

    def _epoch_batches(self, epoch: int, offset: int) -> Iterator[list[dict]]:
        """Global batches offset, offset + 1, ... of one epoch."""
        order, size = self.permutation(epoch), self.global_batch
        if self.group <= 1:
            for step in range(offset, self.steps_per_epoch):
                indices = order[step * size : (step + 1) * size]
                yield self._rows(self.reader.take(indices), indices)
            return
        first_window, skip = divmod(offset, self.group)
        for window in range(first_window, math.ceil(self.steps_per_epoch / self.group)):
            start = window * self.group
            stop = min(start + self.group, self.steps_per_epoch)
            indices = order[start * size : stop * size]
            table = self.reader.take(indices)  # the whole window: its lengths set its order
            rng = np.random.default_rng([self.seed, epoch, window, 1])
            for batch in length_grouped(pair_lengths(table), size, rng)[skip:]:
                yield self._rows(table.take(batch), indices[batch])
            skip = 0

    def _rows(self, table: pa.Table, indices: np.ndarray) -> list[dict]:
        """Python rows, each with where it came from (the step-0 check reads its neighbours).
        Rows become Python objects one global batch at a time (~10x their Arrow size)."""
        shard, row = self.reader.locate(indices)
        rows = table.to_pylist()
        for item, k, r in zip(rows, shard.tolist(), row.tolist(), strict=True):
            item[SOURCE] = (self.reader.names[k], r)
        return rows


def pair_length(row: dict) -> int:
    """Tokens of a pair in the policy forward: the prompt once, both completions."""
    return len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])


def pair_lengths(table: pa.Table) -> np.ndarray:
    """pair_length of every row of an Arrow table."""
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    return sum(pc.list_value_length(table[c]).to_numpy().astype(np.int64) for c in columns)


def length_grouped(lengths: np.ndarray, global_batch: int, rng: np.random.Generator) -> list:
    """Positions sorted by length (stable), cut into global batches, batches in `rng` order."""
    ordered = np.argsort(lengths, kind="stable")
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
    vision=None,
) -> TrainBatch:
    """A micro-batch for the policy: pairs packed into rows by `packer`, or one per row, or
    in a given `layout` (indices into `rows` per packed row); `pin`: page-locked host memory
    (CUDA: the copy to the device then overlaps compute). vision (train/vision.VisionInputs):
    the pairs' image inputs, in the order the pairs are laid out in the rows."""
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
    if vision is not None:
        ordered = [rows[i] for row in layout for i in row] if layout else rows
        packed.vision = vision(ordered)
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
    columns = columns_for(manifest.get("provenance", {}))
    total = sum(math.ceil(n / micro) for n in sizes)
    mine = 0
    index = 0
    for shard in manifest["shards"]:
        table = pq.read_table(Path(folder) / shard["file"], columns=columns)
        for start in range(0, table.num_rows, micro):
            if index % world == rank:
                mine += 1
                yield table.slice(start, micro).to_pylist(), True
            index += 1
    if mine < math.ceil(total / world):
        first = manifest["shards"][0]["file"]
        padding = pq.read_table(Path(folder) / first, columns=columns).slice(0, micro)
        for _ in range(math.ceil(total / world) - mine):
            yield padding.to_pylist(), False


def scoring_batch(
    folder: str | Path, source: tuple[str, int]
) -> tuple[list[dict], list[list[int]], dict] | None:
    """The rows stage one scored in one forward with the row `source` (shard file, row), their
    layout (indices into those rows per packed row) and the shard's scoring record (padding
    multiple, chunk size); None for shards written before stage one recorded its layout."""
    name, row = source
    meta = shard_metadata(Path(folder) / name)
    scoring = meta.get("scoring")
    if not scoring:
        return None
    batch = next((b for b in scoring["batches"] if any(row in r for r in b)), None)
    if batch is None:  # its batch held a pair dropped after scoring
        return None
    indices = [i for r in batch for i in r]
    columns = columns_for(meta.get("provenance", {}))
    table = pq.read_table(Path(folder) / name, columns=columns).take(indices)
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
