"""Stage-two settings, one typed dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refdpo.shared.config import option
from refdpo.shared.models import ATTENTION
from refdpo.shared.shards import MANIFEST

ZERO_STAGES = (0, 1, 2, 3)
SCHEDULERS = ("cosine", "linear", "constant")
EXPORT = ("merged", "adapter", "none")


@dataclass
class TrainConfig:
    shards: str = option(help="training shard folder written by `refdpo precompute`")
    model: str = option(help="policy initialisation: a model folder (normally the reference)")
    output: str = option(help="folder for checkpoints, metrics and the exported model")
    eval_shards: str | None = option(
        None, "eval shard folder (stage one run on an eval split); auto: <shards>-eval if it exists"
    )
    adapter: str | None = option(None, "PEFT adapter merged into --model first (the SFT adapter)")
    loss: str = option("sigmoid", "loss name, or a weighted list such as 'sigmoid:1,sft:0.2'")
    beta: float = option(0.1, "DPO beta: strength of the KL penalty toward the reference")
    label_smoothing: float = option(0.0, "cDPO / robust DPO label noise epsilon")
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma")
    ld_alpha: float = option(1.0, "LD-DPO weight of tokens past the shorter completion")
    token_weight: float = option(
        3.0, "token-weighted DPO: weight of tokens where the completions differ"
    )
    lora: bool = option(False, "train LoRA adapters instead of every weight")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout (0 keeps the step-0 check exact)")
    lora_target_modules: str = option("all-linear", "comma-separated module names, or all-linear")
    dtype: str = option(
        "auto",
        "policy dtype (log-probs are always fp32; bf16 keeps fp32 master weights in the "
        "optimizer); auto: the dtype stage one scored in",
        ("auto", "fp32", "bf16"),
    )
    attn_implementation: str = option("sdpa", "attention kernel", ATTENTION)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    zero_stage: int | None = option(
        None,
        "DeepSpeed ZeRO stage; default: the --deepspeed-config file's, else 0 on one rank "
        "(nothing to partition: ZeRO 1-2 would only add flat copies), 2 on several, 3 with "
        "--offload",
        ZERO_STAGES,
    )
    offload: bool = option(False, "ZeRO-3 with parameters and optimizer state offloaded to CPU")
    deepspeed_config: str | None = option(
        None,
        "a DeepSpeed JSON config: its explicit values win over defaults, a contradiction "
        "with a given option is an error, its 'auto' values are filled from these options",
    )
    micro_batch_size: int = option(4, "pairs per rank per forward")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(5e-7, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("cosine", "schedule after warmup", SCHEDULERS)
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming up linearly")
    max_grad_norm: float = option(1.0, "gradient clipping (0 disables)")
    epochs: float = option(1.0, "passes over the training pairs")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")
    seed: int = option(0, "seed of data order and initialisation")
    logging_steps: int = option(1, "log metrics every N steps")
    eval_steps: int | None = option(None, "evaluate every N steps (and always at the end)")
    save_steps: int | None = option(None, "checkpoint every N steps (and always at the end)")
    save_total_limit: int = option(2, "keep the newest K checkpoints")
    resume: str | None = option(
        None, "'auto' (newest complete checkpoint, else start fresh) or a checkpoint folder"
    )
    step0_check: bool = option(
        True, "check on the first batch that the policy reproduces the stored log-probs"
    )
    step0_tolerance: float | None = option(
        None, "mean |policy - stored| per token allowed (default: by dtypes and layout, see README)"
    )
    export: str = option(
        "merged", "final Hugging Face folder: merged weights, LoRA adapter only, or none", EXPORT
    )
    logit_chunk_size: int = option(1024, "completion tokens per lm_head + log-softmax chunk")
    packing: bool = option(
        True, "pack a micro-batch's pairs into shared rows (padding-free); false: one pair per row"
    )
    pack_length: int = option(
        0, "tokens per packed row (at least the longest pair); 0: the layout of least modeled work"
    )
    length_grouping: int = option(
        0, "sort pairs by length within windows of N global batches (0 or 1: plain shuffle)"
    )
    max_nonfinite_steps: int = option(
        5,
        "abort after this many optimizer steps in a row with a NaN/inf loss or gradient (each "
        "one is skipped on every rank, weights and optimizer state untouched)",
    )
    dist_timeout: int = option(
        1800, "seconds a rank waits in a collective before it fails (a peer died or hangs)"
    )
    device: str = option("auto", "cpu, cuda or auto")

    def __post_init__(self) -> None:
        for name in (
            "micro_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "logit_chunk_size",
            "max_nonfinite_steps",
            "dist_timeout",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("eval_steps", "save_steps", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when given")
        if self.pack_length < 0 or self.length_grouping < 0:
            raise ValueError("pack_length and length_grouping must be >= 0")
        if self.beta <= 0 or self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError("beta, learning_rate and epochs must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.offload and self.zero_stage not in (None, 3):
            raise ValueError("--offload needs --zero-stage 3")
        if self.export == "adapter" and not self.lora:
            raise ValueError("--export adapter needs --lora")

    def resolve_zero_stage(self, world_size: int) -> None:
        """The default stage, once the DeepSpeed file (which may set it) has been read."""
        if self.zero_stage is None:
            self.zero_stage = 3 if self.offload else (0 if world_size == 1 else 2)

    def resolve_eval_shards(self) -> str | None:
        """'auto' becomes stage one's default eval folder when it has a manifest, else None."""
        if self.eval_shards != "auto":
            return self.eval_shards
        folder = Path(f"{self.shards.rstrip('/')}-eval")
        return str(folder) if (folder / MANIFEST).exists() else None

    def tolerance_for(self, stored_dtype: str, same_layout: bool) -> float:
        """The step-0 tolerance against shards scored in `stored_dtype` (train.step's table),
        unless --step0-tolerance sets it."""
        from refdpo.train.step import step0_tolerance

        if self.step0_tolerance is not None:
            return self.step0_tolerance
        return step0_tolerance(self.dtype, stored_dtype, same_layout)
