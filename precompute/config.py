"""Stage-one settings, one typed dataclass.

Flags follow TRL where it has the same setting (`--max-length`, `--per-device-batch-size`),
with refdpo's older names as aliases (`--batch-size`); FOREIGN says what becomes of TRL's
options that have no meaning here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from refdpo.shared.config import Foreign, accept, option, parse_bool, refuse, translate
from refdpo.shared.data import RowFormat
from refdpo.shared.models import ATTENTION, DTYPES
from refdpo.shared.tokens import PROMPT_OVERFLOW, Truncation

# neither limit given: refdpo's defaults; only --max-length: TRL 1.x's rule, which has no
# prompt limit (a prompt shorter than max_length is kept, a row whose prompt fills it dropped)
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
ZERO_STAGES = (0, 3)  # ZeRO 1-2 partition optimizer state and gradients: stage one has neither
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float": "fp32", "float16": "fp16"}
FOREIGN: dict[str, Foreign] = {
    "bf16": translate(
        lambda v: {"dtype": "bf16" if parse_bool(v) else "fp32"},
        "--dtype bf16; false: --dtype fp32",
    ),
    "use_cpu": translate(lambda v: {"device": "cpu"} if parse_bool(v) else {}),
    "truncation_mode": refuse(
        "refdpo keeps each completion's start (TRL's keep_start); --prompt-overflow keep_end "
        "keeps a long prompt's end",
        quiet=("keep_start",),
    ),
    "trust_remote_code": refuse("refdpo loads no remote code", quiet=(False,)),
    "model_init_kwargs": refuse(
        "refdpo loads --model with --dtype and --attn-implementation only", quiet=(None, "{}")
    ),
    "dataset_config": refuse(
        "save the dataset configuration you want to a file or folder first", quiet=(None,)
    ),
    "dataset_test_split": refuse(
        "give the eval split as --eval-dataset (a file or folder) or --eval-fraction"
    ),
    "dataset_num_proc": accept("tokenizing is not the slow part of stage one"),
}


@dataclass
class PrecomputeConfig:
    model: str = option(
        help="reference (SFT) model folder",
        aliases=("model_name_or_path",),
        path="path_or_hub",
        metavar="DIR",
    )
    dataset: str = option(
        help="JSON/JSONL/Parquet/CSV file, datasets.save_to_disk folder, or hub name",
        aliases=("dataset_name",),
        path="path_or_hub",
    )
    output: str = option(
        help="folder for the training shards", aliases=("output_dir",), path="path"
    )
    adapter: str | None = option(
        None, "PEFT adapter folder applied to --model (merged)", path="path"
    )
    split: str = option(
        "train",
        "split to read from a hub dataset or a saved DatasetDict",
        aliases=("dataset_train_split",),
    )
    eval_dataset: str | None = option(
        None, "separate eval file/folder, precomputed into --eval-output", path="path_or_hub"
    )
    eval_fraction: float = option(0.0, "hold out this fraction of --dataset as the eval split")
    eval_output: str | None = option(
        None, "folder for eval shards (default: <output>-eval)", path="path"
    )
    seed: int = option(0, "seed of the held-out eval split")
    limit: int | None = option(None, "use only the first N rows (quick runs)")
    prompt_column: str = option("prompt", "column holding the prompt")
    chosen_column: str = option("chosen", "column holding the preferred response")
    rejected_column: str = option("rejected", "column holding the other response")
    id_column: str = option("id", "column with a stable pair id; else a content hash is used")
    prompt_template: str | None = option(
        None, "Jinja template over the row's columns, e.g. 'Question: {{ question }}\\n\\nAnswer:'"
    )
    prompt_marker: str = option(
        "\n\nAssistant:", "implicit-prompt rows: the prompt ends after the last shared marker"
    )
    chat_template: bool = option(
        False,
        "render string rows as a user turn and an assistant turn with the tokenizer's chat template",
    )
    chat_template_kwargs: str | None = option(
        None,
        "JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'; a "
        "row's own chat_template_kwargs column wins",
        mapping=True,
        metavar="JSON",
    )
    max_length: int | None = option(
        None, f"max tokens of prompt + one completion (default: {MAX_LENGTH})"
    )
    max_prompt_length: int | None = option(
        None,
        f"max prompt tokens (default: {MAX_PROMPT_LENGTH}, or max_length - 1 when only "
        "--max-length is given: TRL 1.x has no prompt limit)",
    )
    prompt_overflow: str = option(
        "drop",
        "prompt longer than --max-prompt-length: drop the row or keep its end",
        PROMPT_OVERFLOW,
    )
    max_tokens_per_batch: int = option(
        16384,
        "tokens per forward pass (prompt + chosen + rejected of its length-sorted pairs, padding "
        "excluded); a longer pair is scored alone",
    )
    batch_size: int | None = option(
        None,
        "at most this many pairs per forward pass (default: no cap, --max-tokens-per-batch "
        "decides)",
        flag="per_device_batch_size",
        aliases=("precompute_ref_batch_size",),
    )
    packing: bool = option(
        True,
        "pack a forward's pairs into shared rows (padding-free); false: one pair per row",
        aliases=("padding_free",),
    )
    pack_length: int = option(
        0, "tokens per packed row (at least the longest pair); 0: the layout of least modeled work"
    )
    rows_per_shard: int = option(2000, "dataset rows per shard file (unit of resume)")
    dtype: str = option(
        "auto",
        "model dtype; log-probs are always fp32 (default auto: bf16 on GPU, fp32 on CPU)",
        ("auto", *DTYPES),
        aliases=("torch_dtype",),
        synonyms=DTYPE_NAMES,
    )
    attn_implementation: str = option(
        "auto",
        "attention kernel: auto (flex_attention on CUDA when the model supports it, else sdpa),"
        " sdpa, eager or flex_attention",
        ATTENTION,
    )
    device: str = option("auto", "cpu, cuda, cuda:N, or auto")
    zero_stage: int = option(
        0,
        "0: each worker holds the whole reference; 3: its parameters are partitioned over the "
        "job's ranks with DeepSpeed ZeRO-3 (for references that do not fit on one GPU; "
        "launch with torchrun, deepspeed or srun)",
        ZERO_STAGES,
    )
    offload: bool = option(
        False, "with --zero-stage 3: keep the partitioned parameters in CPU memory"
    )
    device_map: str | None = option(
        None,
        "one worker per node places the reference's layers over the node's GPUs with "
        "accelerate, then CPU, then --offload-folder (auto, balanced, balanced_low_0, "
        "sequential)",
        DEVICE_MAPS,
    )
    max_memory: str | None = option(
        None,
        'with --device-map: memory per device, e.g. \'{"0": "70GiB", "cpu": "200GiB"}\'',
        mapping=True,
        metavar="JSON",
    )
    offload_folder: str | None = option(
        None,
        "with --device-map: folder for layers that fit on no device (disk offload)",
        path="path",
    )
    dist_timeout: int = option(
        1800,
        "with --zero-stage 3: seconds a rank waits in a collective before it fails",
        aliases=("ddp_timeout",),
    )
    logit_chunk_size: int = option(1024, "completion tokens per lm_head + log-softmax chunk")
    keep_text: bool = option(True, "store prompt/chosen/rejected text beside the ids")
    image_column: str = option(
        "image",
        "vision-language models: column holding each row's image, or a list of images "
        "(TRL's layout: --image-column images)",
    )
    image_store: str = option(
        "bytes",
        "vision: keep each image's bytes once in the folder's _images/ store, or only its "
        "path and sha256 (paths: for very large corpora; re-hashed when read)",
        ("bytes", "paths"),
    )
    overwrite: bool = option(False, "delete an existing output (and eval output) first")
    rank: int | None = option(
        None, "this worker's rank (default: from torchrun/deepspeed/SLURM env)"
    )
    world_size: int | None = option(None, "number of workers (default: from env)")
    finalize_only: bool = option(
        False, "only write the manifest once every shard exists (after a job array)"
    )
    verbose: bool = option(
        False, "also show other libraries' info lines and progress bars (weights loading, ...)"
    )

    FOREIGN: ClassVar[dict[str, Foreign]] = FOREIGN

    def __post_init__(self) -> None:
        if self.max_prompt_length is None:
            alone = self.max_length is not None
            self.max_prompt_length = self.max_length - 1 if alone else MAX_PROMPT_LENGTH
        if self.max_length is None:
            self.max_length = MAX_LENGTH
        self.truncation  # validates the lengths  # noqa: B018
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        if self.eval_fraction and self.eval_dataset:
            raise ValueError("give --eval-dataset or --eval-fraction, not both")
        for name in ("max_tokens_per_batch", "rows_per_shard", "logit_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 when given (none: no cap on pairs)")
        if self.pack_length < 0:
            raise ValueError("pack_length must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        self.template_kwargs  # validates the JSON  # noqa: B018
        if self.offload and self.zero_stage != 3:
            raise ValueError(
                "--offload needs --zero-stage 3 (with --device-map, layers that fit on no GPU "
                "go to CPU already, and to disk with --offload-folder)"
            )
        if self.zero_stage == 3 and self.device_map:
            raise ValueError(
                "give --zero-stage 3 (ranks share the reference) or --device-map (one worker "
                "spreads it over its node's GPUs), not both"
            )
        if (self.max_memory or self.offload_folder) and not self.device_map:
            raise ValueError("--max-memory and --offload-folder need --device-map")
        self.memory_limits  # validates the JSON  # noqa: B018
        if self.dist_timeout < 1:
            raise ValueError("dist_timeout must be >= 1")

    @property
    def memory_limits(self) -> dict | None:
        """--max-memory as accelerate takes it: GPU indices as ints, 'cpu' and 'disk' as
        given (None when not given)."""
        if self.max_memory is None:
            return None
        try:
            value = json.loads(self.max_memory)
        except json.JSONDecodeError as err:
            raise ValueError(f"max_memory is not JSON ({err})") from None
        if not isinstance(value, dict):
            raise ValueError('max_memory must be a JSON object, e.g. \'{"0": "70GiB"}\'')
        return {int(k) if str(k).isdigit() else k: v for k, v in value.items()}

    @property
    def template_kwargs(self) -> dict | None:
        """--chat-template-kwargs as a dict (None when not given)."""
        if self.chat_template_kwargs is None:
            return None
        try:
            value = json.loads(self.chat_template_kwargs)
        except json.JSONDecodeError as err:
            raise ValueError(f"chat_template_kwargs is not JSON ({err})") from None
        if not isinstance(value, dict):
            raise ValueError(
                "chat_template_kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'"
            )
        return value

    @property
    def truncation(self) -> Truncation:
        return Truncation(self.max_length, self.max_prompt_length, self.prompt_overflow)

    @property
    def row_format(self) -> RowFormat:
        return RowFormat(
            prompt_column=self.prompt_column,
            chosen_column=self.chosen_column,
            rejected_column=self.rejected_column,
            id_column=self.id_column,
            prompt_template=self.prompt_template,
            prompt_marker=self.prompt_marker,
            chat_template=self.chat_template,
            image_column=self.image_column,
        )

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_dataset or self.eval_fraction)

    @property
    def eval_folder(self) -> Path:
        return (
            Path(self.eval_output) if self.eval_output else Path(f"{self.output.rstrip('/')}-eval")
        )
