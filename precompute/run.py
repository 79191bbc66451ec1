"""refdpo precompute: score a preference dataset once with the frozen reference model.

Reads the dataset, tokenizes every pair once, runs the reference forward-only (prompt shared
between the two completions) and writes Parquet shards with the token ids and the sum,
average and per-token reference log-probs, then a manifest. Rerunning the same command
after a crash keeps the complete shards that pass its checks (precompute/folder.py) and
redoes the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdpo.precompute.config import PrecomputeConfig
from refdpo.precompute.finalize import PlannedShard, finalize, plan
from refdpo.precompute.folder import (
    DATASET_KEY,
    check_output,
    claim_folder,
    missing_error,
    start_writing,
    verify_shards,
)
from refdpo.precompute.reference import (
    Lockstep,
    PeerFailed,
    Reference,
    any_rank,
    collective_device,
    load_reference,
    max_over_ranks,
)
from refdpo.precompute.score import (
    SHOW_DROPPED,
    batching_for,
    score_shard,
    survey,
    tokenize_rows,
)
from refdpo.precompute.vision import (
    VisionScoring,
    owned_positions,
    run_self_test,
    shard_images,
    write_shard_images,
)
from refdpo.shared.config import config_notes, load_config, to_dict
from refdpo.shared.data import RowFormat, RowSource, load_source, split_holdout
from refdpo.shared.dist import exit_process, init_distributed, rank_and_world, setup_logging
from refdpo.shared.errors import NoUsableRows, RefdpoError, UsageError, run_command
from refdpo.shared.logprobs import pad_multiple_for
from refdpo.shared.logs import peak_memory_mb, progress_bar
from refdpo.shared.models import (
    check_model_dir,
    is_vision_model,
    load_processor,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from refdpo.shared.provenance import software_versions
from refdpo.shared.shards import SCHEMA_VERSION, schema_for, write_shard
from refdpo.shared.tokens import check_tokenizer, tokenizer_fingerprint
from refdpo.shared.vision import family_for
from refdpo.shared.vision_pairs import VisionContext, vision_provenance

logger = logging.getLogger("refdpo.precompute")
# settings that change what a shard holds; a rerun must match them to keep old shards
IDENTITY = (
    "model",
    "adapter",
    "dataset",
    "split",
    "eval_dataset",
    "eval_fraction",
    "seed",
    "limit",
    "prompt_column",
    "chosen_column",
    "rejected_column",
    "id_column",
    "prompt_template",
    "prompt_marker",
    "chat_template",
    "chat_template_kwargs",
    "max_length",
    "max_prompt_length",
    "prompt_overflow",
    "rows_per_shard",
    "dtype",
    "attn_implementation",
    "keep_text",
    "world_size",
    "image_column",
    "image_store",
)


@dataclass(frozen=True)
class Reading:
    """How rows become pairs: the row format, the tokenizer, and for a vision-language
    reference its processor and family adapter (None: a text run)."""

    fmt: RowFormat
    tokenizer: object
    vision: VisionContext | None = None

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else t.eos_token_id


@dataclass
class Split:
    name: str
    source: RowSource
    folder: Path
    identity: dict = field(default_factory=dict)  # what _run.json records for the folder
    expected: dict = field(default_factory=dict)  # provenance but the model's fingerprint


def check_paths(cfg: PrecomputeConfig) -> None:
    """Everything that can fail without a model, checked before one loads."""
    check_model_dir(cfg.model)
    if cfg.adapter:
        check_model_dir(cfg.adapter, "adapter")
    for folder in [Path(cfg.output), *([cfg.eval_folder] if cfg.has_eval else [])]:
        check_output(folder)


def build_splits(cfg: PrecomputeConfig) -> list[Split]:
    source = load_source(cfg.dataset, cfg.split)
    if cfg.limit:
        source = source.subset(
            range(min(cfg.limit, len(source))), f"{source.description} (first {cfg.limit})"
        )
    if cfg.eval_dataset:
        return [
            Split("train", source, Path(cfg.output)),
            Split("eval", load_source(cfg.eval_dataset, cfg.split), cfg.eval_folder),
        ]
    if cfg.eval_fraction:
        train, held_out = split_holdout(source, cfg.eval_fraction, cfg.seed)
        return [Split("train", train, Path(cfg.output)), Split("eval", held_out, cfg.eval_folder)]
    return [Split("train", source, Path(cfg.output))]


class Progress:
    """tqdm bar with pairs/s and tokens/s, shown on rank 0 only."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = progress_bar(total, desc, "pair", enabled)
        self.pairs = self.tokens = 0
        self.start = time.perf_counter()

    def update(self, pairs: int, tokens: int) -> None:
        self.pairs += pairs
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(tokens_per_s=f"{self.tokens / elapsed:.0f}", refresh=False)
        self.bar.update(pairs)

    def advance(self, rows: int) -> None:  # rows dropped before scoring still count as done
        self.bar.update(rows)

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


def provenance(
    cfg: PrecomputeConfig, dtype: str, model_fp: str | None, reading: Reading, split: Split
) -> dict:
    """What made this split's shards; every shard of a folder must carry the same. Without
    the model's fingerprint (None) it is what a kept shard must carry before the model loads."""
    tokenizer = reading.tokenizer
    found = {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": cfg.model, "adapter": cfg.adapter, "fingerprint": model_fp},
        "tokenizer": {"path": cfg.model, "fingerprint": tokenizer_fingerprint(tokenizer)},
        "truncation": cfg.truncation.describe(),
        "dtype": dtype,
        "attn_implementation": cfg.attn_implementation,
        "dataset": {
            "source": split.source.description,
            "fingerprint": split.source.fingerprint,
            "split": split.name,
            "format": to_dict(reading.fmt),
            "chat_template_kwargs": cfg.template_kwargs,
        },
        "software": software_versions(),
    }
    if reading.vision is not None:
        found["vision"] = vision_provenance(reading.vision, cfg.image_store)
    return found


@dataclass
class Work:
    """What one split leaves to this worker once its checks passed."""

    split: Split
    shards: list[PlannedShard]  # every shard of the split, all workers'
    pending: list[PlannedShard]  # this worker's shards still to write
    duplicates: set[int] = field(default_factory=set)
    image_owners: dict[str, int] = field(default_factory=dict)  # vision: Survey.image_owners


def check_split(
    split: Split, cfg: PrecomputeConfig, rank: int, world: int, reading: Reading
) -> Work | None:
    """This worker's pending shards of `split`, after every check that needs no model: kept
    shards verified, rows surveyed and tokenized. None when the split is already complete."""
    shards = plan(len(split.source), cfg.rows_per_shard, world)
    pending, complete = verify_shards(
        split.folder,
        shards,
        rank,
        split.expected,
        schema_for(cfg.keep_text, reading.vision is not None),
        cfg.finalize_only,
    )
    if complete:
        logger.info("%s split: %s already complete, nothing to do", split.name, split.folder)
        return None
    done = sum(1 for s in shards if s.rank == rank) - len(pending)
    if done:
        logger.info("%s split: keeping %d complete shard(s) of this worker", split.name, done)
    if pending and cfg.finalize_only:
        raise missing_error(split.folder, pending)
    if not pending:
        return Work(split, shards, [])
    found = survey(split.source, reading.fmt, show=rank == 0)
    logger.info(
        "%s split: %d rows, %d usable before tokenization, %d duplicate ids, dropped %s",
        split.name,
        found.rows,
        found.usable,
        len(found.duplicates),
        dict(found.dropped),
    )
    if found.usable == 0:
        raise NoUsableRows(
            f"no usable rows in {split.source.description}: dropped by reason "
            f"{dict(found.dropped)}; check the column names and format options"
        )
    usable = check_tokenized(split, pending, cfg, reading, found.duplicates, rank == 0)
    if usable == 0 and done == 0 and world == 1:
        raise NoUsableRows(
            f"no usable rows in {split.source.description} once tokenized (reasons above); "
            "nothing was written"
        )
    return Work(split, shards, pending, found.duplicates, found.image_owners)


def finish_split(work: Work) -> None:
    """Write the manifest if every worker's shards exist (the last worker to finish does)."""
    if finalize(work.split.folder, work.shards) is None:
        missing = sum(1 for s in work.shards if not (work.split.folder / s.file).exists())
        logger.info(
            "%s split: %d shard(s) of other workers still missing; the last worker writes the manifest",
            work.split.name,
            missing,
        )


def check_tokenized(
    split: Split,
    pending: list[PlannedShard],
    cfg: PrecomputeConfig,
    reading: Reading,
    duplicates: set[int],
    show: bool,
) -> int:
    """Tokenize this worker's pending rows once before the model loads, so that rows a chat
    template, a length limit or truncation would drop are known (and shown) first. Returns
    the number of usable pairs. The pairs are tokenized again per shard when scored: holding
    every pair's ids in memory costs more than tokenizing twice."""
    start = time.perf_counter()
    shown = [0]

    def warn(message: str) -> None:
        if show and shown[0] < SHOW_DROPPED:
            logger.warning("%s", message)
        shown[0] += 1

    usable, dropped, truncated = 0, Counter(), Counter()
    for _, _, first, stop in pending:
        pairs, lost, cut = tokenize_rows(
            split.source, first, stop, reading.fmt, reading.tokenizer, cfg.truncation,
            duplicates, warn, cfg.template_kwargs, reading.vision,
        )  # fmt: skip
        usable += len(pairs)
        dropped += lost
        truncated += cut
    logger.info(
        "%s split: this worker's %d rows tokenized in %.1f s: %d usable, dropped %s, truncated %s",
        split.name,
        sum(s.stop - s.start for s in pending),
        time.perf_counter() - start,
        usable,
        dict(dropped),
        {k: v for k, v in truncated.items() if k != "boundary_moved"},
    )
    if truncated["boundary_moved"]:
        logger.warning(
            "%s split: %d pair(s) whose prompt does not end on a token boundary (a trailing "
            "space, a word cut in two, or a chat template whose generation prompt differs from "
            "what precedes an answer): their prompt ids end at the last token shared with the "
            "completions, as the joined text tokenizes (README: Token boundaries)",
            split.name,
            truncated["boundary_moved"],
        )
    return usable


def write_pending(
    work: Work,
    cfg: PrecomputeConfig,
    rank: int,
    reading: Reading,
    reference: Reference,
    provenance: dict,
    scoring: VisionScoring | None = None,
) -> None:
    """Score and write this worker's missing shards, one at a time (a vision shard's image
    file first: a complete shard always has its images)."""
    split, pending = work.split, work.pending
    progress = Progress(
        sum(s.stop - s.start for s in pending), f"precompute {split.name}", rank == 0
    )
    pad_id = reading.pad_id
    batching = batching_for(cfg, reference.config, vision=scoring is not None)
    owned = owned_positions(work.image_owners)
    totals = Counter()
    try:
        for name, _, start, stop in pending:
            pairs, dropped, truncated = tokenize_rows(
                split.source,
                start,
                stop,
                reading.fmt,
                reading.tokenizer,
                cfg.truncation,
                work.duplicates,
                lambda _: None,  # check_tokenized showed the drops already
                cfg.template_kwargs,
                reading.vision,
            )
            progress.advance(stop - start - len(pairs))
            images = None
            if scoring is not None:
                run_self_test(scoring, reference.model, pairs, pad_id, provenance["dtype"])
                stored = shard_images(
                    pairs, owned, split.source, start, stop, reading.fmt, scoring.ctx,
                    cfg.image_store,
                )  # fmt: skip
                images = write_shard_images(split.folder, name, stored)
            rows, nonfinite, layout = score_shard(
                pairs,
                reference.model,
                pad_id,
                batching,
                cfg.logit_chunk_size,
                cfg.keep_text,
                progress.update,
                pad_multiple_for(reference.device, batching.kernel),
                scoring,
            )
            dropped += nonfinite
            if scoring is not None:
                layout["vision"] = scoring.record(pairs)
            meta = {
                "provenance": provenance,
                "scoring": layout | {"placement": reference.placement},
                "images": images,
                "source_start": start,
                "source_stop": stop,
                "rows": len(rows),
                "dropped": dict(dropped),
                "truncated": dict(truncated),
                "max_token_id": max(
                    (
                        max(max(r["prompt_ids"]), max(r["chosen_ids"]), max(r["rejected_ids"]))
                        for r in rows
                    ),
                    default=-1,
                ),
            }
            write_shard(split.folder / name, rows, cfg.keep_text, meta, scoring is not None)
            totals.update(rows=len(rows), dropped=sum(dropped.values()))
    finally:
        seconds = progress.close()  # on an error too: end the bar's line before it is logged
    logger.info(
        "%s split: wrote %d shard(s), %d pairs, %d dropped, in %.1f s (%.2f pairs/s, %.0f "
        "tokens/s); peak memory %.0f MiB (%s)",
        split.name,
        len(pending),
        totals["rows"],
        totals["dropped"],
        seconds,
        progress.pairs / max(seconds, 1e-9),
        progress.tokens / max(seconds, 1e-9),
        peak_memory_mb(reference.device),
        "CUDA allocated" if reference.device.type == "cuda" else "resident set",
    )


def open_reading(cfg: PrecomputeConfig) -> Reading:
    """The tokenizer, or for a vision-language reference its processor (its tokenizer, image
    processor and family adapter), loaded and checked before any model."""
    if not is_vision_model(cfg.model):
        return Reading(cfg.row_format, load_tokenizer(cfg.model))
    if cfg.zero_stage == 3 or cfg.device_map:
        raise UsageError(
            "a vision-language reference is scored whole on each worker for now; "
            "--zero-stage 3 and --device-map take text models only"
        )
    from transformers import AutoConfig

    processor = load_processor(cfg.model)
    family = family_for(AutoConfig.from_pretrained(cfg.model))
    family.check_processor(processor)
    dataset = Path(cfg.dataset)
    base = dataset.parent if dataset.is_file() else dataset if dataset.is_dir() else None
    fmt = dataclasses.replace(cfg.row_format, vision=True)
    return Reading(fmt, processor.tokenizer, VisionContext(processor, family, base))


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(PrecomputeConfig, argv, "refdpo precompute", __doc__)
    if cfg.zero_stage == 3:  # ranks share the reference: a process group, from the launcher
        setup_logging(0, 1, verbose=cfg.verbose)  # retagged with the rank below
        if code := run_command(lambda: check_launcher(cfg), logger):
            return code
        rank, world = init_distributed(cfg.dist_timeout)
    else:
        rank, world = rank_and_world(cfg.rank, cfg.world_size)
    cfg.rank, cfg.world_size = rank, world
    setup_logging(rank, world, verbose=cfg.verbose)
    for note in config_notes(cfg) if rank == 0 else ():
        logger.warning("%s", note)
    try:
        return run_command(lambda: precompute(cfg, rank, world), logger)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_launcher(cfg: PrecomputeConfig) -> int:
    """--zero-stage 3 needs ranks that can talk: those of one torchrun, deepspeed or srun
    launch. Refused before any process group or model: what cannot give that."""
    env = os.environ
    if cfg.rank is not None or cfg.world_size is not None:
        raise UsageError(
            "--zero-stage 3 takes the ranks from the launcher (torchrun, deepspeed, srun); "
            "leave out --rank and --world-size"
        )
    in_step = "RANK" in env or int(env.get("SLURM_NTASKS", "1")) > 1
    if "SLURM_ARRAY_TASK_ID" in env and not in_step:
        raise UsageError(
            "--zero-stage 3 partitions the reference over the ranks of one job step; the "
            "tasks of a job array cannot share it: submit one job with srun tasks (jobs/"
            "precompute.sbatch) instead of --array"
        )
    return 0


def check_placement(cfg: PrecomputeConfig) -> None:
    """What a placement cannot do, said before anything loads."""
    if cfg.adapter and (cfg.zero_stage == 3 or cfg.device_map):
        how = "--zero-stage 3" if cfg.zero_stage == 3 else "--device-map"
        raise UsageError(
            f"--adapter with {how}: merging an adapter needs the whole base model in memory, "
            "which these placements exist to avoid; merge it once (peft's merge_and_unload, "
            "then save_pretrained) and pass the merged folder as --model"
        )
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):  # torchrun's, srun's
        local = re.match(r"\d+", os.environ.get(name, "1"))  # SLURM may write "8(x2)"
        if cfg.device_map and local and int(local.group()) > 1:
            raise UsageError(
                f"--device-map spreads one worker over all of its node's GPUs, but this node "
                f"runs {local.group()} workers ({name}); start one per node (srun "
                "--ntasks-per-node=1, torchrun --nproc-per-node 1), or use --zero-stage 3 with "
                "one rank per GPU"
            )


def agree_on_checks(check, zero3: bool, device: torch.device):
    """Run `check()`; under ZeRO-3 the ranks also agree on whether every one passed, so that a
    rank whose checks failed does not leave the others waiting for it in the model load: they
    stop with its exit code (1: a bug, with its traceback on that rank)."""
    if not zero3:
        return check()
    where = collective_device(device)
    try:
        result = check()
    except Exception as err:
        max_over_ranks(err.exit_code if isinstance(err, RefdpoError) else 1, where)
        raise
    if code := max_over_ranks(0, where):
        raise PeerFailed(
            "another rank failed its checks before the model loaded; its log says why", code
        )
    return result


def placement_words(cfg: PrecomputeConfig, device: torch.device, world: int) -> str:
    if cfg.zero_stage == 3:
        offload = ", offloaded to CPU" if cfg.offload else ""
        return f"on {device}, partitioned over {world} rank(s) with ZeRO-3{offload}"
    if cfg.device_map:
        return f"placed by --device-map {cfg.device_map}"
    return f"on {device}"


def precompute(cfg: PrecomputeConfig, rank: int, world: int) -> int:
    """Every split's checks, then the reference once (if any shard needs it), then the
    scoring of each split's pending shards."""
    check_paths(cfg)
    check_placement(cfg)
    reading = open_reading(cfg)
    check_tokenizer(reading.tokenizer)
    splits = build_splits(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    zero3 = cfg.zero_stage == 3
    identity = {k: v for k, v in to_dict(cfg).items() if k in IDENTITY} | {"dtype": dtype}
    pad_id = reading.pad_id

    def check_all() -> list[Work | None]:
        for split in splits:  # every refusal before anything is scored
            split.identity = identity | {DATASET_KEY: split.source.fingerprint}
            split.expected = provenance(cfg, dtype, None, reading, split)
            claim_folder(split.folder, split.identity, rank, world, cfg.overwrite)
        return [check_split(split, cfg, rank, world, reading) for split in splits]

    works = agree_on_checks(check_all, zero3, device)
    needed = any(w is not None and w.pending for w in works)
    if zero3:  # loading is collective: every rank loads if any rank has shards to write
        needed = any_rank(needed, collective_device(device))
    if not needed:
        for work in works:
            if work is not None:
                finish_split(work)
        return 0
    for work in works:
        if work is not None and work.pending:
            start_writing(work.split.folder, work.split.identity)
    logger.info(
        "loading reference %s (%s, %s) %s",
        cfg.model,
        dtype,
        cfg.attn_implementation,
        placement_words(cfg, device, world),
    )
    reference = load_reference(cfg, dtype, device, pad_id, vision=reading.vision is not None)
    scoring = VisionScoring(reading.vision) if reading.vision is not None else None
    batching = batching_for(cfg, reference.config, vision=scoring is not None)
    logger.info("scoring in %s", batching.describe())
    for work in works:
        if work is None:
            reference.drain()
            continue
        if work.pending:
            made_by = provenance(cfg, dtype, reference.fingerprint, reading, work.split)
            write_pending(work, cfg, rank, reading, reference, made_by, scoring)
        reference.drain()
        finish_split(work)
    if isinstance(reference.model, Lockstep):
        logger.info(
            "ZeRO-3: %d forward(s) of this rank's pairs, %d dummy forward(s) while other ranks "
            "finished theirs",
            reference.model.forwards,
            reference.model.dummies,
        )
    return 0


if __name__ == "__main__":
    exit_process(main())
