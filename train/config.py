"""Stage-two settings, one typed dataclass.

Flags follow TRL's DPOConfig and transformers' TrainingArguments where those have the same
setting (`--per-device-train-batch-size`), with refdpo's older names as aliases
(`--micro-batch-size`); FOREIGN says what becomes of their options that have no meaning
here. The README's "Coming from TRL" table lists both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from refdpo.shared.config import (
    Foreign,
    accept,
    flag_name,
    ignore,
    option,
    parse_bool,
    refuse,
    translate,
)
from refdpo.shared.errors import UsageError
from refdpo.shared.losses import parse_loss_spec, spec_from_trl
from refdpo.shared.models import ATTENTION
from refdpo.shared.shards import MANIFEST

logger = logging.getLogger("refdpo.train")

ZERO_STAGES = (0, 1, 2, 3)
# transformers' names; "constant" has no warmup there, "constant_with_warmup" has
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
EXPORT = ("merged", "adapter", "none")
EVAL_STRATEGIES = ("no", "steps", "epoch")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train/metrics.py has one backend per name
REPORTERS = ("auto", "all", "none", *TRACKERS)
# transformers' other integrations: known names, so the sentence says "not yet", not "unknown"
LATER_REPORTERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "dvclive",
                   "neptune", "swanlab", "trackio")  # fmt: skip
DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32"}

OFFLINE = (
    "refdpo has no reference model at training time: the reference log-probs are stage "
    "one's shards (--shards), computed once; drop this option"
)
NO_DATASET = "the pairs come from --shards (stage one read the dataset)"
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw")
FOREIGN: dict[str, Foreign] = {
    # the reference model: there is none here
    **dict.fromkeys(
        ("precompute_ref_log_probs", "precompute_ref_batch_size", "ref_model",
         "ref_model_init_kwargs", "force_use_ref_model", "sync_ref_model",
         "ref_model_mixup_alpha", "ref_model_sync_steps", "ref_adapter_name",
         "model_adapter_name"),
        refuse(OFFLINE),
    ),
    "reference_free": refuse(
        "refdpo always uses the stored reference; --loss-type simpo is its reference-free loss",
        quiet=(False,),
    ),
    # precision, optimizer and model loading
    "bf16": translate(
        lambda v: {"dtype": "bf16" if parse_bool(v) else "fp32"},
        "--dtype bf16; false: --dtype fp32",
    ),
    "use_cpu": translate(lambda v: {"device": "cpu"} if parse_bool(v) else {}),
    "fp16": refuse("refdpo trains in fp32 or bf16 (--bf16)", quiet=(False,)),
    "optim": refuse("refdpo trains with torch's AdamW (adamw_torch)", quiet=ADAMW),
    "lr_scheduler_kwargs": refuse("refdpo's schedules take no arguments", quiet=(None, "{}")),
    "model_init_kwargs": refuse(
        "refdpo loads --model with --dtype and --attn-implementation only", quiet=(None, "{}")
    ),
    "trust_remote_code": refuse("refdpo loads no remote code", quiet=(False,)),
    "load_in_4bit": refuse("refdpo does not quantize the policy (no QLoRA)", quiet=(False,)),
    "load_in_8bit": refuse("refdpo does not quantize the policy (no QLoRA)", quiet=(False,)),
    "use_dora": refuse("DoRA is not supported; LoRA is (--use-peft)", quiet=(False,)),
    "use_rslora": refuse("rsLoRA is not supported; LoRA is (--use-peft)", quiet=(False,)),
    "use_weighting": refuse("WPO weighting is not implemented", quiet=(False,)),
    "f_divergence_type": refuse("only the reverse KL is implemented", quiet=("reverse_kl",)),
    "gradient_checkpointing_kwargs": ignore(
        "refdpo checkpoints with use_reentrant=False", quiet=({"use_reentrant": False}, None)
    ),
    "disable_dropout": ignore("refdpo keeps the model's dropout as configured", quiet=(False,)),
    "activation_offloading": ignore(
        "use --gradient-checkpointing or --offload instead", quiet=(False,)
    ),
    # evaluation, saving, logging
    "do_eval": translate(lambda v: {} if parse_bool(v) else {"eval_strategy": "no"}),
    "save_strategy": ignore("refdpo saves every --save-steps and at the end", quiet=("steps",)),
    "logging_strategy": ignore("refdpo logs every --logging-steps", quiet=("steps",)),
    "log_level": ignore("refdpo logs at INFO on rank 0", quiet=("info", "passive")),
    "logging_first_step": accept("refdpo always logs step 1"),
    "do_train": accept("refdpo train trains"),
    # the hub: nothing is uploaded
    **dict.fromkeys(
        ("push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_model_revision"),
        ignore("refdpo does not upload; push OUTPUT/final yourself", quiet=(False, None)),
    ),
    # data: stage one's
    **dict.fromkeys(
        ("dataset_name", "dataset_mixture", "dataset_mixer", "dataset_splits", "dataset_config",
         "dataset_train_split", "dataset_test_split"),
        ignore(NO_DATASET),
    ),
    **dict.fromkeys(
        ("dataset_num_proc", "preprocessing_num_workers", "remove_unused_columns",
         "pad_to_multiple_of"),
        accept("no effect on stored token ids"),
    ),
    "truncation_mode": ignore("stage one truncated the pairs", quiet=("keep_start",)),
}  # fmt: skip


@dataclass
class TrainConfig:
    shards: str = option(help="training shard folder written by `refdpo precompute`", path="path")
    model: str = option(
        help="policy initialisation: a model folder (normally the reference)",
        aliases=("model_name_or_path",),
        path="path_or_hub",
        metavar="DIR",
    )
    output: str = option(
        help="folder for checkpoints, metrics and the exported model",
        flag="output_dir",
        path="path",
    )
    eval_shards: str | None = option(
        "auto",
        "eval shard folder (stage one run on an eval split); default auto: <shards>-eval when "
        "it exists; none: no eval",
        path="path",
    )
    adapter: str | None = option(
        None, "PEFT adapter merged into --model first (the SFT adapter)", path="path"
    )
    loss: str = option(
        "sigmoid",
        "loss name(s), e.g. sigmoid, or 'sigmoid sft' with --loss-weights, or 'sigmoid:1,sft:0.2'",
        flag="loss_type",
        many=True,
        metavar="NAME",
    )
    loss_weights: str | None = option(
        None, "one weight per --loss-type name", many=True, metavar="W"
    )
    rpo_alpha: float | None = option(None, "RPO (TRL 0.x): adds the sft loss with this weight")
    beta: float = option(0.1, "DPO beta: strength of the KL penalty toward the reference")
    label_smoothing: float = option(0.0, "cDPO / robust DPO label noise epsilon")
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma")
    ld_alpha: float | None = option(
        None,
        "LD-DPO: weight of tokens past the shorter completion; with the sigmoid loss it makes "
        "it ld_dpo, as in TRL (ld_dpo's default: 1.0)",
    )
    token_weight: float = option(
        3.0, "token-weighted DPO: weight of tokens where the completions differ"
    )
    lora: bool = option(False, "train LoRA adapters instead of every weight", flag="use_peft")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout (0 keeps the step-0 check exact)")
    lora_target_modules: str = option(
        "all-linear", "module names, or all-linear", many=True, metavar="NAME"
    )
    freeze_vision_tower: bool = option(
        True,
        "vision-language models: keep the vision encoder's weights fixed (LLaMA-Factory's "
        "default); false trains it too",
        aliases=("freeze_vit",),
    )
    freeze_multi_modal_projector: bool = option(
        True,
        "vision-language models: keep the projector from image features to the language "
        "model fixed",
        aliases=("freeze_aligner",),
    )
    dtype: str = option(
        "auto",
        "policy dtype (log-probs are always fp32; bf16 keeps fp32 master weights in the "
        "optimizer); default auto: the dtype stage one scored in",
        ("auto", "fp32", "bf16"),
        aliases=("torch_dtype",),
        synonyms=DTYPE_NAMES,
    )
    attn_implementation: str = option(
        "auto",
        "attention kernel: auto (flex_attention on CUDA when the model supports it, else sdpa),"
        " sdpa, eager or flex_attention",
        ATTENTION,
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    zero_stage: int | None = option(
        None,
        "DeepSpeed ZeRO stage; default: the --deepspeed file's, else 0 on one rank "
        "(nothing to partition: ZeRO 1-2 would only add flat copies), 2 on several, 3 with "
        "--offload",
        ZERO_STAGES,
    )
    offload: bool = option(False, "ZeRO-3 with parameters and optimizer state offloaded to CPU")
    deepspeed_config: str | None = option(
        None,
        "a DeepSpeed JSON config: its explicit values win over defaults, a contradiction "
        "with a given option is an error, its 'auto' values are filled from these options",
        flag="deepspeed",
        path="path",
        metavar="FILE",
    )
    micro_batch_size: int = option(
        4, "pairs per rank per forward", flag="per_device_train_batch_size"
    )
    eval_micro_batch_size: int | None = option(
        None,
        "eval pairs per rank per forward (default: --per-device-train-batch-size)",
        flag="per_device_eval_batch_size",
    )
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    max_tokens_per_batch: int = option(
        0,
        "cut each rank's pairs of a step into micro-batches of at most N tokens (prompt + "
        "chosen + rejected; a longer pair alone), as many on every rank; the global batch "
        "stays micro batch x accumulation x ranks pairs. 0: micro-batches of "
        "--per-device-train-batch-size pairs",
        metavar="N",
    )
    learning_rate: float = option(5e-7, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option(
        "cosine",
        "schedule, as transformers': cosine and linear decay after the warmup, "
        "constant_with_warmup holds after it, constant has no warmup",
        SCHEDULERS,
        flag="lr_scheduler_type",
    )
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming up linearly")
    warmup_steps: float = option(
        0, "warmup steps; overrides --warmup-ratio when > 0 (below 1: a ratio, as transformers)"
    )
    max_grad_norm: float = option(1.0, "gradient clipping (0 disables)")
    epochs: float = option(1.0, "passes over the training pairs", flag="num_train_epochs")
    max_steps: int | None = option(
        None, "stop after this many optimizer steps (overrides epochs; -1: unset)",
        synonyms={"-1": None},
    )  # fmt: skip
    seed: int = option(0, "seed of data order and initialisation")
    logging_steps: int = option(1, "log metrics every N steps")
    eval_steps: int | None = option(None, "evaluate every N steps (and at the end)")
    eval_strategy: str | None = option(
        None,
        "no, steps (every --eval-steps, which defaults to --logging-steps) or epoch (at each "
        "epoch's end); unset: every --eval-steps when given. All but no also evaluate at the end",
        EVAL_STRATEGIES,
        aliases=("evaluation_strategy",),
    )
    save_steps: int | None = option(None, "checkpoint every N steps (and always at the end)")
    save_total_limit: int = option(2, "keep the newest K checkpoints")
    overwrite_output_dir: bool = option(
        False,
        "replace the run an --output-dir holds (its checkpoints, metrics, final model); without "
        "it or --resume-from-checkpoint a folder holding another run is refused",
    )
    resume: str | None = option(
        None,
        "auto or true (the newest complete checkpoint, else start fresh) or a checkpoint folder",
        flag="resume_from_checkpoint",
        synonyms={"true": "auto", "false": None},
        path="path",
    )
    report_to: str = option(
        "auto",
        "tensorboard (OUTPUT/tensorboard), wandb, mlflow, a comma list of them, all (every one "
        "installed) or none; default auto: tensorboard when installed. metrics.jsonl is always "
        "written",
        many=True,
        metavar="NAME",
    )
    run_name: str | None = option(
        None, "name of the run in TensorBoard (its folder), W&B and MLflow", metavar="NAME"
    )
    max_length: int | None = option(
        None, "stage one's limit: when given, the shards must have been cut at it"
    )
    max_prompt_length: int | None = option(
        None, "stage one's prompt limit: when given, the shards must have been cut at it"
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
        True,
        "pack a micro-batch's pairs into shared rows (padding-free); false: one pair per row",
        aliases=("padding_free",),
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
        1800,
        "seconds a rank waits in a collective before it fails (a peer died or hangs)",
        aliases=("ddp_timeout",),
    )
    device: str = option("auto", "cpu, cuda or auto")
    verbose: bool = option(
        False, "also show other libraries' info lines and progress bars (weights loading, ...)"
    )

    FOREIGN: ClassVar[dict[str, Foreign]] = FOREIGN

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
        for name in ("eval_steps", "save_steps", "max_steps", "eval_micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 when given")
        if self.pack_length < 0 or self.length_grouping < 0 or self.max_tokens_per_batch < 0:
            raise ValueError("pack_length, length_grouping and max_tokens_per_batch must be >= 0")
        if self.beta <= 0 or self.learning_rate <= 0 or self.epochs <= 0:
            raise ValueError("beta, learning_rate and epochs must be > 0")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("weight_decay and max_grad_norm must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps % 1):
            raise ValueError("warmup_steps must be a ratio in [0, 1) or a whole number of steps")
        if self.offload and self.zero_stage not in (None, 3):
            raise ValueError("--offload needs --zero-stage 3")
        if self.export == "adapter" and not self.lora:
            raise ValueError("--export adapter needs --use-peft")
        self._settle_loss()
        self._check_report_to()

    def _settle_loss(self) -> None:
        """TRL's ways of saying the loss, as one refdpo spec (the extra fields folded in)."""
        self.loss = spec_from_trl(self.loss, self.loss_weights, self.rpo_alpha, self.ld_alpha)
        self.loss_weights = self.rpo_alpha = None
        parse_loss_spec(self.loss)  # an unknown name or bad weight: one sentence, here

    def _check_report_to(self) -> None:
        """One spelling: names in the order given, without repeats ("wandb,tensorboard").
        "all" stays "all": which trackers are installed is train/metrics.py's question."""
        wanted = list(dict.fromkeys(n.strip().lower() for n in self.report_to.split(",")))
        wanted = [name for name in wanted if name] or [""]
        valid = "give tensorboard, wandb, mlflow, a comma list of them, all or none"
        later = [name for name in wanted if name in LATER_REPORTERS]
        if later:
            raise ValueError(f"--report-to {', '.join(later)} is not supported yet; {valid}")
        unknown = [name for name in wanted if name not in REPORTERS]
        if unknown:
            raise ValueError(f"--report-to {', '.join(unknown) or repr('')}: unknown name; {valid}")
        alone = [name for name in wanted if name in ("auto", "all", "none")]
        if alone and len(wanted) > 1:
            raise ValueError(f"--report-to {','.join(wanted)}: {alone[0]} goes alone; {valid}")
        self.report_to = ",".join(wanted)

    def resolve_zero_stage(self, world_size: int) -> None:
        """The default stage, once the DeepSpeed file (which may set it) has been read."""
        if self.zero_stage is None:
            self.zero_stage = 3 if self.offload else (0 if world_size == 1 else 2)

    def resolve_eval(self) -> None:
        """The eval folder and schedule, before anything loads: 'auto' becomes stage one's
        default eval folder when it has a manifest; asking for an eval without eval shards is
        an error; --eval-strategy no turns eval off."""
        default = Path(f"{self.shards.rstrip('/')}-eval")
        if self.eval_shards == "auto":
            self.eval_shards = str(default) if (default / MANIFEST).exists() else None
            if self.eval_shards and self.eval_strategy != "no":
                logger.info(
                    "evaluating on %s, found beside --shards (--eval-shards none: no eval)",
                    self.eval_shards,
                )
        if self.eval_strategy == "no":
            self.eval_shards = None
            return
        if not self.eval_shards and (self.eval_strategy or self.eval_steps):
            asked = (
                f"--eval-strategy {self.eval_strategy}" if self.eval_strategy else "--eval-steps"
            )
            raise UsageError(
                f"{asked} needs eval shards: give --eval-shards DIR (none at {default}; stage "
                "one writes them with --eval-fraction or --eval-dataset)"
            )
        if self.eval_strategy == "steps" and self.eval_steps is None:
            self.eval_steps = self.logging_steps  # transformers' default
        if self.eval_strategy == "epoch" and self.eval_steps:
            logger.warning("--eval-strategy epoch: --eval-steps %d is ignored", self.eval_steps)
            self.eval_steps = None

    def eval_due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether to evaluate after `step` (the end of training aside, which always does)."""
        if self.eval_strategy == "epoch":
            return step % steps_per_epoch == 0
        return bool(self.eval_steps) and step % self.eval_steps == 0

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps, as transformers counts them (`constant` has none)."""
        if self.warmup_steps >= 1:
            warmup = int(self.warmup_steps)
        else:
            warmup = round((self.warmup_steps or self.warmup_ratio) * total_steps)
        if self.lr_scheduler == "constant" and warmup:
            logger.warning(
                "--lr-scheduler-type constant has no warmup (as in transformers): %d warmup "
                "steps are not applied; constant_with_warmup has them", warmup,
            )  # fmt: skip
            return 0
        return min(warmup, total_steps)

    def check_truncation(self, manifest: dict) -> None:
        """--max-length / --max-prompt-length, given to stage two, must be the shards'."""
        stored = manifest["provenance"].get("truncation", {})
        for name in ("max_length", "max_prompt_length"):
            wanted = getattr(self, name)
            if wanted is not None and stored.get(name) != wanted:
                raise UsageError(
                    f"{flag_name(TrainConfig, name)} {wanted}: stage one cut the pairs in "
                    f"{self.shards} at {name}={stored.get(name)}; drop it or rerun "
                    "refdpo precompute with it"
                )

    def tolerance_for(self, stored_dtype: str, same_layout: bool) -> float:
        """The step-0 tolerance against shards scored in `stored_dtype` (train.step's table),
        unless --step0-tolerance sets it."""
        from refdpo.train.step import step0_tolerance

        if self.step0_tolerance is not None:
            return self.step0_tolerance
        return step0_tolerance(self.dtype, stored_dtype, same_layout)
