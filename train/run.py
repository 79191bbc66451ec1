"""refdpo train: policy-only DPO on DeepSpeed ZeRO, reading the shards stage one wrote.

No reference model is built here: the reference log-probs come from the shards. Read top to
bottom: parse the config, check everything that can fail before a model loads, build the
policy and its engine, loop (step-0 check, steps, logging, eval, checkpoints, signals), save.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from refdpo.shared import faults
from refdpo.shared.config import config_notes, load_config, to_dict
from refdpo.shared.dist import exit_process, setup_logging
from refdpo.shared.errors import RefdpoError, run_command
from refdpo.shared.logprobs import packer_for, pad_multiple_for
from refdpo.shared.logs import quiet_libraries
from refdpo.shared.losses import LossParams, RunningMean, parse_loss_spec
from refdpo.shared.models import check_model_dir, is_vision_model, load_processor, load_tokenizer
from refdpo.shared.shards import ShardError
from refdpo.shared.tokens import tokenizer_fingerprint
from refdpo.shared.vision import SHARED, family_for
from refdpo.train import checkpoint
from refdpo.train.batches import token_micro_batches
from refdpo.train.checkpoint import LoopState
from refdpo.train.config import TrainConfig
from refdpo.train.data import (
    SOURCE,
    PairStream,
    Prefetcher,
    collate,
    eval_batches,
    micro_batches,
    open_shards,
    scoring_batch,
)
from refdpo.train.ds_config import apply_user_file
from refdpo.train.engine import build_engine, build_policy, init_distributed
from refdpo.train.export import export_model
from refdpo.train.metrics import MetricsLog, check_reporters, peak_memory_mb
from refdpo.train.resume import (
    apply_optimizer_settings,
    check_output,
    compare_settings,
    run_settings,
)
from refdpo.train.step import (
    NonFiniteError,
    Step0Error,
    backward_micro,
    guard_loss,
    inject_faults,
    reduce_means,
    run_micro,
    step0_difference,
)
from refdpo.train.vision import VisionInputs, check_processor, recorded_layout

logger = logging.getLogger("refdpo.train")


def on_rank0(fn, rank: int):
    """Run a check on rank 0 only and give every rank its outcome. A user error is raised on
    every rank as the same class; a bug keeps its traceback on rank 0, and the other ranks
    stop too instead of waiting in the next collective."""
    outcome = [None]
    if rank == 0:
        try:
            outcome[0] = ("ok", fn())
        except RefdpoError as err:
            outcome[0] = ("error", err)
        except Exception as err:
            outcome[0] = ("bug", repr(err))
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    if kind == "bug":
        raise RuntimeError(f"rank 0 failed in a check: {value}")
    return value


def preflight(cfg: TrainConfig, rank: int) -> tuple[object, dict, dict | None, Vision | None]:
    """Tokenizer, train manifest, eval manifest and for a vision-language policy its processor
    and family, checked before the policy loads."""
    check_model_dir(cfg.model)
    if cfg.adapter:
        check_model_dir(cfg.adapter, "adapter")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model)
    vocab_size = config.get_text_config().vocab_size
    vision = None
    if is_vision_model(cfg.model):
        processor = load_processor(cfg.model)
        vision = Vision(processor, family_for(config))
        tokenizer = processor.tokenizer
    else:
        tokenizer = load_tokenizer(cfg.model)
    fingerprint = tokenizer_fingerprint(tokenizer)

    def opened(folder: str) -> dict:
        manifest = open_shards(folder, fingerprint, vocab_size)
        if vision is not None:
            check_processor(Path(folder), manifest, vision.processor, vision.family)
        elif "vision" in manifest["provenance"]:
            raise ShardError(
                f"{folder}: the pairs hold images (scored by a vision-language model), but "
                "--model is a text model; train the model stage one scored with"
            )
        return manifest

    manifest = on_rank0(lambda: opened(cfg.shards), rank)
    cfg.check_truncation(manifest)
    eval_manifest = None
    if cfg.eval_shards:
        eval_manifest = on_rank0(lambda: opened(cfg.eval_shards), rank)
    resolve_dtype(cfg, manifest)
    on_rank0(lambda: check_output(cfg), rank)
    if rank == 0:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return tokenizer, manifest, eval_manifest, vision


@dataclass(frozen=True)
class Vision:
    """A vision-language policy's processor and family adapter (shared/vision)."""

    processor: object
    family: object

    def inputs(self, folder: str, manifest: dict, dummy: bool) -> VisionInputs:
        return VisionInputs(Path(folder), manifest, self.processor, self.family, dummy)


def evaluate(
    engine,
    cfg: TrainConfig,
    eval_manifest: dict,
    spec,
    params,
    pad_id: int,
    packer,
    running,
    images=None,
) -> dict[str, float]:
    """The training metrics over every eval pair, in eval mode, without gradients. Every rank
    runs the same number of forwards (eval_batches pads), the padding weighted out."""
    world, rank = dist.get_world_size(), dist.get_rank()
    engine.eval()
    results = []
    frozen = copy.deepcopy(running)  # eval must not move BCO's training baseline
    pad_multiple = pad_multiple_for(engine.device, kernel_of(engine))
    with torch.no_grad():
        micro = cfg.eval_micro_batch_size or cfg.micro_batch_size
        for rows, real in eval_batches(cfg.eval_shards, eval_manifest, micro, world, rank):
            batch = collate(rows, pad_id, packer, pad_multiple, vision=images)
            result = run_micro(
                engine, batch, spec, params, cfg.logit_chunk_size,
                frozen if real else copy.deepcopy(frozen),
            )  # fmt: skip
            if not real:  # a padding batch: same collectives, no weight in the means
                result.sums = {k: torch.zeros_like(v) for k, v in result.sums.items()}
                result.pairs = result.tokens = 0
            results.append(result)
    engine.train()
    means, _, _ = reduce_means(results, engine.device)
    return means


def gradient_norm(engine) -> torch.Tensor | None:
    """Norm of the accumulated gradient before clipping, on the device. DeepSpeed records it
    for ZeRO 1-3 (get_global_grad_norm, read after the step); under ZeRO-0 the gradients are
    plain .grad."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def resolve_dtype(cfg: TrainConfig, manifest: dict) -> None:
    """`--dtype auto`: the dtype stage one scored in (fp16 shards: fp32, refdpo trains in fp32
    or bf16). Any other choice is allowed and logged with the tolerance that pair needs."""
    stored = manifest["provenance"]["dtype"]
    if cfg.dtype == "auto":
        cfg.dtype = stored if stored in ("fp32", "bf16") else "fp32"
        logger.info("policy dtype %s: follows the shards (scored in %s)", cfg.dtype, stored)
    if cfg.dtype != stored:
        logger.warning(
            "policy dtype %s, shards scored in %s: the step-0 check allows %.3g per token "
            "for this pair of dtypes, and step 0's loss is ln 2 only up to that rounding",
            cfg.dtype, stored, cfg.tolerance_for(stored, same_layout=True),
        )  # fmt: skip


def kernel_of(engine) -> str:
    """The attention kernel the policy runs (`--attn-implementation` resolved at load)."""
    return engine.module.config._attn_implementation


# why the step-0 check could not compare like with like, by rank (the worst one is reported)
SAME, OTHER_KERNEL, NO_LAYOUT = 0.0, 1.0, 2.0


def check_step0(
    engine, rows: list[dict], cfg: TrainConfig, pad_id: int, stored: str, images=None
) -> None:
    """The policy must reproduce the stored log-probs before it trains. Each rank runs one
    forward on the batch stage one scored together with its first pair, in stage one's layout
    (same shapes: in bf16 the values then agree to kernel noise, not to the ~0.1 nat that
    another layout moves them); shards without a recorded layout fall back to the training
    micro-batch, and a policy on another attention kernel than stage one's (a GPU stage one,
    a CPU stage two) gets that layout's tolerance too."""
    found = scoring_batch(cfg.shards, rows[0][SOURCE])
    head = engine.module.head
    chunk, kernel, reason = head.chunk_size, kernel_of(engine), SAME
    if found:
        check_rows, layout, scoring = found
        batch = collate(
            check_rows, pad_id, layout=layout, pad_multiple=scoring["pad_multiple"], vision=images
        )
        head.chunk_size = scoring["logit_chunk_size"]  # the lm_head matmul shapes too
        scored_with = scoring.get("batching", {}).get("attn_implementation", kernel)
        reason = SAME if scored_with == kernel else OTHER_KERNEL
    else:
        multiple = pad_multiple_for(engine.device, kernel)
        batch = collate(rows, pad_id, pad_multiple=multiple, vision=images)
        reason = NO_LAYOUT
    try:
        worst = step0_difference(engine, batch, head.chunk_size)
    finally:
        head.chunk_size = chunk
    # every rank learns the worst difference and the worst reason any rank had
    outcome = torch.tensor([worst, reason], device=engine.device)
    dist.all_reduce(outcome, op=dist.ReduceOp.MAX)
    worst, reason = float(outcome[0]), float(outcome[1])
    tolerance = cfg.tolerance_for(stored, same_layout=reason == SAME)
    logger.info(
        "step-0 check (%s, %s policy, %s shards): max per-pair mean |policy - stored| = %.3g "
        "per token (tolerance %.3g)",
        {SAME: "stage one's layout", NO_LAYOUT: "training layout: no layout recorded",
         OTHER_KERNEL: f"stage one's layout on another attention kernel (now {kernel})"}[reason],
        cfg.dtype, stored, worst, tolerance,
    )  # fmt: skip
    if worst > tolerance:
        raise Step0Error(
            f"the policy does not reproduce the stored reference log-probs on the first batch "
            f"(max mean difference {worst:.3g} per token > {tolerance:.3g}). Is --model the "
            "model stage one scored, with the same --adapter? If the policy differs on "
            "purpose, pass --step0-check false"
        )


def train(cfg: TrainConfig, rank: int, world: int) -> int:
    # first: a stop asked for while the policy loads (a minute on big models) is honoured
    # after the first step, with a checkpoint, instead of killing the rank mid-start
    stop = checkpoint.StopSignal()
    cfg.resolve_eval()
    check_reporters(cfg.report_to)
    adamw_kwargs = apply_user_file(cfg, world)  # before anything reads the options it settles
    cfg.resolve_zero_stage(world)
    tokenizer, manifest, eval_manifest, vision = preflight(cfg, rank)
    spec = parse_loss_spec(cfg.loss)
    params = LossParams(
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        ld_alpha=1.0 if cfg.ld_alpha is None else cfg.ld_alpha,
        token_weight=cfg.token_weight,
    )
    global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world
    stream = PairStream(cfg.shards, manifest, global_batch, cfg.seed, cfg.length_grouping)
    total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * stream.steps_per_epoch))
    resume_from = checkpoint.resolve_resume(cfg.resume, cfg.output)
    settings = run_settings(to_dict(cfg), world, global_batch, manifest)
    if resume_from:  # before the policy loads: a refused resume costs nothing
        for change in on_rank0(lambda: compare_settings(resume_from, settings), rank):
            logger.warning("resuming with a changed setting, applied from here on: %s", change)

    torch.manual_seed(cfg.seed)
    built = time.perf_counter()
    family, layout = (vision.family, recorded_layout(manifest)) if vision else (None, SHARED)
    if layout != SHARED:
        logger.info("vision pairs scored as %s, as stage one's self-test chose", layout)
    engine = build_engine(cfg, build_policy(cfg), world, total_steps, adamw_kwargs, family, layout)
    logger.info(
        "policy %s in %s under ZeRO-%d on %s, built in %.1f s",
        cfg.model, cfg.dtype, engine.zero_optimization_stage(), engine.device,
        time.perf_counter() - built,
    )  # fmt: skip
    state = LoopState()
    if resume_from:
        state = checkpoint.load(engine, resume_from)
        apply_optimizer_settings(engine, cfg, adamw_kwargs or {})
        logger.info("resumed from %s at step %d", resume_from, state.step)
    start_step = state.step
    logger.info(
        "training %d steps: %d pairs, global batch %d (%d x %d accumulation x %d ranks), loss %s",
        total_steps, manifest["rows"], global_batch, cfg.micro_batch_size, cfg.gradient_accumulation_steps, world, cfg.loss,
    )  # fmt: skip
    if cfg.max_tokens_per_batch:
        logger.info(
            "micro-batches by token budget: at most %d tokens each (a longer pair alone), as "
            "many on every rank; the global batch stays %d pairs",
            cfg.max_tokens_per_batch, global_batch,
        )  # fmt: skip
    if stream.leftover_note:
        logger.info("%s", stream.leftover_note)
    log = MetricsLog(
        Path(cfg.output), total_steps, start_step, rank == 0, cfg.report_to, cfg.run_name,
        config=to_dict(cfg),
    )  # fmt: skip
    running = RunningMean() if any(n == "bco_pair" for n, _ in spec) else None
    if running and state.reward_baseline:
        running.load_state_dict(state.reward_baseline)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    packer = None
    if cfg.packing and vision is None:  # vision pairs: one per row (the family layouts)
        packer = packer_for(engine.module.config, cfg.pack_length)
    # under ZeRO-3 every micro-batch runs the vision tower (a dummy image when it has none)
    zero3 = engine.zero_optimization_stage() == 3
    images = vision.inputs(cfg.shards, manifest, dummy=zero3) if vision else None
    eval_images = None
    if vision and eval_manifest is not None:
        eval_images = vision.inputs(cfg.eval_shards, eval_manifest, dummy=zero3)
    pad_multiple = pad_multiple_for(engine.device, kernel_of(engine))
    pin = engine.device.type == "cuda"

    # micro-batches by a token budget: any number per step (the same on every rank), any
    # size, so each loss is weighted by its pairs / this share (step.backward_micro)
    rank_share = global_batch // world if cfg.max_tokens_per_batch else None

    def prepare(global_rows: list[dict]) -> list[tuple[list[dict], bool, object]]:
        if cfg.max_tokens_per_batch:
            micro = token_micro_batches(global_rows, cfg.max_tokens_per_batch, world, rank)
        else:
            cut = micro_batches(global_rows, cfg.micro_batch_size, world, rank)
            micro = [(rows, True) for rows in cut]
        return [
            (rows, real, collate(rows, pad_id, packer, pad_multiple, pin=pin, vision=images))
            for rows, real in micro
        ]

    batches = Prefetcher(stream.batches(start_step), prepare)
    step, skipped_in_a_row, skipped_total = start_step, state.skipped_in_a_row, state.skipped_steps

    def save() -> None:
        state = LoopState(
            step=step,
            skipped_steps=skipped_total,
            skipped_in_a_row=skipped_in_a_row,
            reward_baseline=running.state_dict() if running else None,
        )
        checkpoint.save(engine, cfg.output, state, cfg.save_total_limit, settings)

    try:
        while step < total_steps:
            started = time.perf_counter()
            results, grad_norm = [], None
            skipped_before, engine.basic_optimizer.overflow = engine.skipped_steps, False
            micro = next(batches)
            for m, (rows, real, batch) in enumerate(micro):
                if step == 0 and m == 0 and cfg.step0_check:
                    check_step0(engine, rows, cfg, pad_id, manifest["provenance"]["dtype"], images)
                result = run_micro(
                    engine, batch, spec, params, cfg.logit_chunk_size, running,
                    pooled=rank_share is not None, real=real,
                )  # fmt: skip
                faults.pause("train_step", step + 1)  # test-only: mid-step, before backward
                loss = guard_loss(inject_faults(result.loss, step + 1))
                backward_micro(engine, loss, result.pairs, rank_share, m == len(micro) - 1)
                boundary = engine.is_gradient_accumulation_boundary()
                if boundary:
                    grad_norm = gradient_norm(engine)
                engine.step()
                if boundary and grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()  # ZeRO 1-3 record it in step()
                results.append(result)
            step += 1
            # no rank applied this update: DeepSpeed's check or skip_nonfinite_steps saw NaN/inf
            skipped = engine.skipped_steps > skipped_before or engine.basic_optimizer.overflow
            skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
            skipped_total += skipped
            if skipped:
                logger.warning(
                    "step %d: NaN/inf loss or gradient; update skipped on every rank "
                    "(%d in a row, %d in all)", step, skipped_in_a_row, skipped_total,
                )  # fmt: skip
            log.advance()
            # metrics stay on the device until a logging step: one all-reduce and one copy
            # to the host then, none on other steps (every rank takes the same branch)
            if step % cfg.logging_steps == 0 or step == total_steps or step == 1 or skipped:
                means, pairs, tokens = reduce_means(results, engine.device)
                seconds = time.perf_counter() - started
                means.update({
                    "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                    "learning_rate": engine.get_lr()[0],
                    "step_seconds": seconds,
                    "pairs_per_s": pairs / seconds,
                    "tokens_per_s": tokens / seconds,
                    "peak_memory_mb": peak_memory_mb(engine.device),
                    "epoch": step / stream.steps_per_epoch,
                    "skipped_steps": skipped_total,
                })  # fmt: skip
                log.write("train", step, means)
            if skipped_in_a_row >= cfg.max_nonfinite_steps:
                raise NonFiniteError(
                    f"steps {step - skipped_in_a_row + 1}-{step}: {skipped_in_a_row} optimizer "
                    "steps in a row had a NaN/inf loss or gradient; none was applied, so the "
                    f"weights are those after step {step - skipped_in_a_row}. Stopped without "
                    "saving. Check the shards (`refdpo inspect`), lower --learning-rate or use "
                    "--dtype fp32, then resume from the last checkpoint; "
                    "--max-nonfinite-steps sets this limit"
                )
            if eval_manifest and cfg.eval_due(step, stream.steps_per_epoch) and step < total_steps:
                log.write(
                    "eval",
                    step,
                    evaluate(
                        engine,
                        cfg,
                        eval_manifest,
                        spec,
                        params,
                        pad_id,
                        packer,
                        running,
                        eval_images,
                    ),
                )
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                save()
            if stop.agreed(engine.device):
                save()
                logger.warning(
                    "stopped by signal after step %d; saved; exit %d to requeue",
                    step,
                    checkpoint.REQUEUE_EXIT_CODE,
                )
                return checkpoint.REQUEUE_EXIT_CODE
        logger.info("trained to step %d in %.1f s; saving", step, time.perf_counter() - built)
        if eval_manifest:
            log.write(
                "eval",
                step,
                evaluate(
                    engine, cfg, eval_manifest, spec, params, pad_id, packer, running, eval_images
                ),
            )
        save()
        if cfg.export != "none":
            export_model(engine, cfg, tokenizer, Path(cfg.output) / "final")
    finally:
        batches.close()
        log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(TrainConfig, argv, "refdpo train", __doc__)
    quiet_libraries(cfg.verbose)  # before DeepSpeed is imported: it logs at import
    rank, world = init_distributed(cfg.dist_timeout)
    setup_logging(rank, world, logging.WARNING, verbose=cfg.verbose)
    for note in config_notes(cfg) if rank == 0 else ():
        logger.warning("%s", note)
    try:
        return run_command(lambda: train(cfg, rank, world), logger)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())
