"""Build the policy and its DeepSpeed engine: model, LoRA, optimizer, schedule, ZeRO config."""

from __future__ import annotations

import datetime
import math
import types

import torch

from refdpo.shared.dist import bound_collectives, init_distributed  # noqa: F401 (re-exported)
from refdpo.shared.errors import UsageError
from refdpo.shared.logprobs import PairScorer
from refdpo.shared.models import is_vision_model, load_model, resolve_device
from refdpo.shared.vision import SHARED, VisionPairScorer
from refdpo.train.config import TrainConfig
from refdpo.train.ds_config import CONFIG_DIR, deepspeed_config  # noqa: F401 (CONFIG_DIR re-exported)


def build_policy(cfg: TrainConfig) -> torch.nn.Module:
    """The policy on CPU (DeepSpeed moves it): the reference weights, optionally with LoRA."""
    runs_on = resolve_device(cfg.device)
    if cfg.attn_implementation == "flex_attention" and runs_on.type != "cuda":
        raise UsageError(
            f"--attn-implementation flex_attention trains on CUDA only (FlexAttention has no "
            f"backward on {runs_on.type}); use auto or sdpa_pairs, which keep memory linear in "
            "the row length there too"
        )
    vision = is_vision_model(cfg.model)
    model = load_model(
        cfg.model, cfg.adapter, cfg.dtype, cfg.attn_implementation, torch.device("cpu"), runs_on,
        vision=vision,
    )  # fmt: skip
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not cfg.lora:
        # PEFT leaves the base weights frozen when it merges an --adapter: full fine-tuning
        # trains all of them
        model.requires_grad_(True)
        if vision:
            freeze_vision_parts(model, cfg.freeze_vision_tower, cfg.freeze_multi_modal_projector)
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    chosen = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    if vision:  # LoRA on the language model only, never on the vision tower or projector
        chosen = language_model_linears(model, None if chosen == "all-linear" else chosen)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=chosen,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise UsageError(
            f"--lora-target-modules {targets!r} matches no module of the model: {err}"
        ) from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


# where the parts of a vision-language model live, by module name, across the families
# transformers has (LLaVA, Gemma3: vision_tower, multi_modal_projector, language_model;
# Qwen2-VL: visual with its merger; Idefics3 / SmolVLM: vision_model, connector, text_model)
VISION_TOWERS = ("vision_tower", "visual", "vision_model")
PROJECTORS = ("multi_modal_projector", "visual.merger", "connector")
LANGUAGE_MODELS = ("language_model", "text_model")


def _under(name: str, parts: tuple[str, ...]) -> bool:
    return any(f".{p}." in f".{name}." for p in parts)


def freeze_vision_parts(model: torch.nn.Module, tower: bool, projector: bool) -> None:
    """--freeze-vision-tower / --freeze-multi-modal-projector: those weights stay fixed."""
    for name, param in model.named_parameters():
        if _under(name, PROJECTORS):
            param.requires_grad_(not projector)
        elif _under(name, VISION_TOWERS):
            param.requires_grad_(not tower)


def language_model_linears(model: torch.nn.Module, suffixes: list[str] | None) -> list[str]:
    """Full names of the language model's linear layers (all of them, or those ending in one
    of `suffixes`), its output layer excluded: LoRA's targets in a vision-language model."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and _under(name, LANGUAGE_MODELS)
        and not _under(name, VISION_TOWERS + PROJECTORS)
        and (suffixes is None or any(name.split(".")[-1] == s for s in suffixes))
    ]
    if not found:
        raise UsageError(f"--lora-target-modules {suffixes} matches no language-model layer")
    return found


def lr_lambda(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate, as transformers' schedules: linear warmup, then
    cosine or linear decay, or constant (constant_with_warmup); `constant` has no warmup."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make `optimizer` skip its update, on every rank together, when a gradient is NaN/inf.

    DeepSpeed 0.19 skips such steps itself only in some set-ups (ZeRO 1-3 when it computes a
    gradient norm, bf16); under ZeRO-0 in fp32 it would write NaN into every weight. The
    optimizer sits under DeepSpeed, so it sees the gradients an update would use at any ZeRO
    stage (all of them under ZeRO-0, this rank's partition under ZeRO 1-3); the ranks agree
    by an all-reduce, so no rank steps alone. `overflow` is the attribute DeepSpeed's engine
    reads to count a skipped step and hold the learning-rate schedule. The step method is
    wrapped on the instance (as torch's LR schedulers do), not by subclassing: DeepSpeed
    refuses optimizer classes it does not know under ZeRO.
    """
    update = optimizer.step

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        )
        bad = torch.zeros((), device=device)
        if grads:
            # one sum per tensor: a NaN or inf anywhere makes it non-finite, and it reads the
            # gradients once without isfinite()'s per-element mask (about 20x cheaper on CPU:
            # bench/guard_cost.py); a finite gradient whose sum passes fp32's 3e38 would also
            # count: none does
            sums = torch.stack([g.sum().to(bad.device, torch.float32) for g in grads])
            bad = (~torch.isfinite(sums)).any().float()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        self.overflow = bool(bad.item())
        return None if self.overflow else update(closure)

    optimizer.step = types.MethodType(step, optimizer)  # bound, as LR schedulers expect
    optimizer.overflow = False  # the last step() was skipped
    return optimizer


def build_engine(
    cfg: TrainConfig,
    model: torch.nn.Module,
    world_size: int,
    total_steps: int,
    adamw_kwargs: dict | None = None,
    family=None,
    layout: str = SHARED,
):
    """The DeepSpeed engine around PairScorer(model): the forward that training calls is the
    pair log-prob computation itself, so ZeRO-3's module hooks see every call (they record
    the parameter trace and prefetch from it; called around the engine, every gather would
    block). Its module is the scorer; the policy is `engine.module.policy`."""
    import deepspeed

    if family is None:
        scorer = PairScorer(model, cfg.logit_chunk_size)
    else:  # a vision-language policy: the family's adapter, in stage one's layout
        scorer = VisionPairScorer(model, family, layout, cfg.logit_chunk_size)
    params = [p for p in scorer.parameters() if p.requires_grad]
    optimizer = skip_nonfinite_steps(
        torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **(adamw_kwargs or {})
        )
    )
    warmup = cfg.warmup_for(total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, total_steps, warmup, cfg.lr_scheduler)
    )
    engine, *_ = deepspeed.initialize(
        model=scorer,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, getattr(model, "config", None)),
    )
    bound_collectives(datetime.timedelta(seconds=cfg.dist_timeout))
    if engine.zero_optimization_stage() == 3:
        # TokenLogps uses the lm_head weight without calling the lm_head module: ZeRO-3 must
        # gather it around TokenLogps's forward and backward (once each per micro-batch)
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(scorer.head, scorer.head.lm_head.weight)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # Averaging gradients over one rank changes nothing, but DeepSpeed still copies them
        # all into flat buffers to do it: extra peak memory and time for nothing.
        # (ZeRO 1-3 need this call: it moves gradients into their partitions.)
        engine.enable_backward_allreduce = False
    return engine
