"""What a training run may find in its output folder, and what a resume may change.

A run folder holds one run. A new run into a folder that holds another's checkpoints or
metrics is refused unless it resumes that run (`--resume-from-checkpoint`) or replaces it
(`--overwrite-output-dir`, the transformers name); otherwise the new run's checkpoints mix
with the old ones and a later `--resume auto` picks the wrong run.

A resume compares the settings saved in the checkpoint with this run's. Each setting is in
one of three groups (README: "What a resume may change"):
- DATA_AND_STEP: they decide which pairs a step trains on or what a step computes; a change
  is refused, by name.
- APPLIED: optimization settings that the checkpoint would otherwise silently override or
  that change the schedule from here on; the new value is applied and logged.
- MAY_CHANGE: how the run is observed, saved or computed (memory, speed, logging); values
  are the same to rounding.
A setting in none of them is refused, so a new option cannot be ignored by default.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from refdpo.shared.config import flag_name
from refdpo.shared.errors import FolderRefused, UsageError
from refdpo.train.checkpoint import checkpoint_root, read_marker
from refdpo.train.config import TrainConfig

logger = logging.getLogger("refdpo.train")

DATA_AND_STEP = {
    "shards_fingerprint": "the training pairs",
    "seed": "the data order",
    "global_batch": "the pairs per optimizer step (micro batch x accumulation x ranks)",
    "world_size": "the ranks (DeepSpeed's checkpoint is partitioned over them)",
    "length_grouping": "the data order",
    "loss": "the loss",
    "beta": "the loss",
    "label_smoothing": "the loss",
    "simpo_gamma": "the loss",
    "ld_alpha": "the loss",
    "token_weight": "the loss",
    "lora": "the trained parameters",
    "lora_r": "the trained parameters",
    "lora_alpha": "the trained parameters",
    "lora_dropout": "the trained parameters",
    "lora_target_modules": "the trained parameters",
    "freeze_vision_tower": "the trained parameters",
    "freeze_multi_modal_projector": "the trained parameters",
    "dtype": "the precision of every step",
    "zero_stage": "DeepSpeed's checkpoint layout",
    "offload": "DeepSpeed's checkpoint layout",
}
APPLIED = (
    "max_steps",
    "epochs",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
)
MAY_CHANGE = (
    # paths: the weights come from the checkpoint, the pairs are compared by content
    "shards", "model", "adapter", "output", "deepspeed_config", "resume",
    "overwrite_output_dir",
    # how a step is laid out and computed: the same values to rounding
    "micro_batch_size", "gradient_accumulation_steps", "max_tokens_per_batch", "packing",
    "pack_length", "logit_chunk_size", "gradient_checkpointing", "attn_implementation", "device",
    # evaluation, logging, saving, checks
    "eval_shards", "eval_micro_batch_size", "eval_steps", "eval_strategy", "logging_steps",
    "save_steps", "save_total_limit", "report_to", "run_name", "export", "verbose",
    "max_nonfinite_steps", "dist_timeout", "step0_check", "step0_tolerance", "max_length",
    "max_prompt_length",
)  # fmt: skip
# what a folder holding a run contains (besides train_config.json, rewritten by every run)
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "final", "tensorboard")


def shards_fingerprint(manifest: dict) -> str:
    """The training pairs by content: every shard's name and checksum. A copied or moved
    shard folder keeps it."""
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        digest.update(f"{shard['file']}:{shard['sha256']}\n".encode())
    return digest.hexdigest()


def run_settings(resolved: dict, world: int, global_batch: int, manifest: dict) -> dict:
    """What a checkpoint records of its run: the resolved config and what derives from it."""
    return {
        **resolved,
        "world_size": world,
        "global_batch": global_batch,
        "shards_fingerprint": shards_fingerprint(manifest),
    }


def held_run(output: Path) -> str | None:
    """What in `output` belongs to an earlier run, in words; None when nothing does. A folder
    whose run failed before its first logged step (only train_config.json) holds none."""
    found = []
    root = checkpoint_root(output)
    steps = sorted(int(p.name.split("-")[1]) for p in root.glob("step-*")) if root.is_dir() else []
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    metrics = output / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    if (output / "final").exists():
        found.append("final/")
    return ", ".join(found) or None


def check_output(cfg: TrainConfig) -> None:
    """Rank 0, before the policy loads: the output folder can hold this run."""
    output = Path(cfg.output)
    flag = flag_name(TrainConfig, "output")
    for parent in (output, *output.parents):
        if parent.exists() and not parent.is_dir():
            raise FolderRefused(f"{flag} {output}: {parent} is a file, not a folder")
    if cfg.overwrite_output_dir and cfg.resume:
        raise UsageError(
            "--overwrite-output-dir replaces the run in the folder and --resume-from-checkpoint "
            "continues it; give one of them"
        )
    held = held_run(output) if output.is_dir() else None
    if not held or cfg.resume:
        return
    if not cfg.overwrite_output_dir:
        raise FolderRefused(
            f"{output} holds another run ({held}). Continue it with --resume-from-checkpoint "
            f"auto, replace it with --overwrite-output-dir, or give a new {flag}"
        )
    for name in RUN_ENTRIES:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.warning("--overwrite-output-dir: removed the earlier run in %s (%s)", output, held)


def compare_settings(checkpoint: Path, now: dict) -> list[str]:
    """Refuse a resume whose settings change the data or the meaning of a step; return the
    applied changes in words ("learning_rate 0.001 -> 0.0005")."""
    saved = read_marker(checkpoint).get("settings")
    if saved is None:
        logger.warning(
            "%s was saved before refdpo recorded its settings in checkpoints; they are not "
            "compared with this run's", checkpoint,
        )  # fmt: skip
        return []
    applied = []
    for name in sorted(set(saved) | set(now)):
        old, new = saved.get(name), now.get(name)
        if old == new or name in MAY_CHANGE:
            continue
        if name in APPLIED:
            applied.append(f"{name} {old} -> {new}")
            continue
        why = DATA_AND_STEP.get(name, "a setting a resume cannot change")
        raise FolderRefused(
            f"{checkpoint} was saved with {name}={old!r}, this run has {new!r}: it changes "
            f"{why}. Resume with the checkpoint's value, or start a new run in a new "
            "--output-dir"
        )
    return applied


def apply_optimizer_settings(engine, cfg: TrainConfig, adamw_kwargs: dict) -> None:
    """After loading a checkpoint: its optimizer state carries the old learning rate (the
    schedule's base), weight decay and AdamW betas/eps (a --deepspeed file's) in every
    parameter group; this run's values win. The schedule's shape (kind, warmup, total steps)
    is rebuilt from this run's settings anyway: only its step counter is the checkpoint's."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [cfg.learning_rate] * len(scheduler.base_lrs)
    for group, rule in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(adamw_kwargs)
        group["initial_lr"] = cfg.learning_rate
        group["weight_decay"] = cfg.weight_decay
        group["lr"] = cfg.learning_rate * rule(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
