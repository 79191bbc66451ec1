"""The DeepSpeed JSON a run uses: the user's file (or a built-in one) settled against the
options, then its "auto" values filled by dotted path.

A setting both the file and an option control is decided once, before a model loads
(`apply_user_file`): an explicit value in the file wins over an option the user left at its
default, and contradicts one the user gave (an error); "auto" or absent leaves it to the
option. `deepspeed_config` then builds what DeepSpeed gets. Batch sizes, clipping, ZeRO stage
and dtype are always written from the settled options, so DeepSpeed, checkpointing and export
see the same run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from refdpo.shared.config import flag_name, given_fields
from refdpo.shared.errors import UsageError
from refdpo.train.config import ZERO_STAGES, TrainConfig

CONFIG_DIR = Path(__file__).parent / "ds_configs"
AUTO = "auto"
logger = logging.getLogger("refdpo.train")

# dotted path in the JSON -> (TrainConfig field, type, test of a valid value, what is valid)
SCALARS: dict[str, tuple[str, type, Callable[[Any], bool], str]] = {
    "train_micro_batch_size_per_gpu": ("micro_batch_size", int, lambda v: v >= 1, ">= 1"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", int, lambda v: v >= 1, ">= 1"),
    "gradient_clipping": ("max_grad_norm", float, lambda v: v >= 0, ">= 0"),
    "zero_optimization.stage": ("zero_stage", int, lambda v: v in ZERO_STAGES, "0, 1, 2 or 3"),
    "optimizer.params.lr": ("learning_rate", float, lambda v: v > 0, "> 0"),
    "optimizer.params.weight_decay": ("weight_decay", float, lambda v: v >= 0, ">= 0"),
}
OFFLOAD_PATHS = (
    "zero_optimization.offload_param.device",
    "zero_optimization.offload_optimizer.device",
)
OFFLOADED = ("cpu", "nvme")
# what refdpo's torch.optim.AdamW takes from the optimizer section (lr and weight_decay
# through their options); adam_w_mode true is DeepSpeed's way of saying AdamW
ADAMW_PARAMS = ("lr", "betas", "eps", "weight_decay")


def _get(config: dict, path: str) -> Any:
    """The value at a dotted path; None where a part of it is absent."""
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _explicit(config: dict, path: str) -> Any:
    """The value at `path` when the file decides it: present and not "auto"; else None."""
    value = _get(config, path)
    return None if isinstance(value, str) and value == AUTO else value


def _set(config: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _quote(path: str, value: Any) -> str:
    return f'"{path}": {json.dumps(value)}'


def _flag(field: str, value: Any) -> str:
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{flag_name(TrainConfig, field)} {shown}"


def _cast(value: Any, kind: type, path: str, label: str) -> Any:
    """`value` as `kind`; bools are not numbers here, and 4.0 counts as the integer 4."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        bool: isinstance(value, bool),
        int: number and float(value).is_integer(),
        float: number,
    }[kind]
    if not ok:
        raise UsageError(f"{_quote(path, value)} in {label}: expected {kind.__name__}")
    return kind(value)


def read_file(path: str | Path) -> dict:
    """A DeepSpeed JSON as a dict, with DeepSpeed's older section name `bfloat16` as `bf16`."""
    try:
        loaded = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a JSON object")
    if "bfloat16" in loaded and "bf16" not in loaded:
        loaded["bf16"] = loaded.pop("bfloat16")
    return loaded


def file_settings(raw: dict, label: str) -> dict[str, tuple[Any, str]]:
    """The options the file decides: field -> (its value in refdpo's terms, the JSON that
    says so, for messages)."""
    settings = {}
    for path, (field, kind, valid, rule) in SCALARS.items():
        value = _explicit(raw, path)
        if value is not None:
            settings[field] = (_cast(value, kind, path, label), _quote(path, value))
            if not valid(settings[field][0]):
                raise UsageError(f"{_quote(path, value)} in {label}: must be {rule}")
    devices = [(p, _explicit(raw, p)) for p in OFFLOAD_PATHS if _explicit(raw, p) is not None]
    if devices:
        # refdpo's --offload means "offloaded": either device set to cpu or nvme says so
        path, device = next(((p, d) for p, d in devices if d in OFFLOADED), devices[0])
        settings["offload"] = (device in OFFLOADED, _quote(path, device))
    bf16 = _explicit(raw, "bf16.enabled")
    if bf16 is not None:
        enabled = _cast(bf16, bool, "bf16.enabled", label)
        settings["dtype"] = ("bf16" if enabled else "fp32", _quote("bf16.enabled", bf16))
    return settings


def _settle(cfg: TrainConfig, field: str, value: Any, quoted: str, label: str) -> None:
    """Make cfg agree with one explicit setting of the file, or fail if the user chose
    otherwise. A dtype of "auto" is not a choice yet (it would follow the shards)."""
    current = getattr(cfg, field)
    if current == value:
        return
    if field in given_fields(cfg) and not (field == "dtype" and current == AUTO):
        raise UsageError(
            f"{_flag(field, current)} contradicts {quoted} in {label}; drop one of them"
        )
    setattr(cfg, field, value)
    logger.info("%s in %s sets %s", quoted, label, _flag(field, value))


def _settle_batch(cfg: TrainConfig, raw: dict, label: str, world_size: int) -> None:
    """An explicit train_batch_size must be micro x accumulation x ranks. Where neither the
    user nor the file chose the accumulation, it is derived from it (as DeepSpeed does)."""
    total = _explicit(raw, "train_batch_size")
    if total is None:
        return
    total = _cast(total, int, "train_batch_size", label)
    per_step = cfg.micro_batch_size * world_size
    open_accumulation = (
        "gradient_accumulation_steps" not in given_fields(cfg)
        and _explicit(raw, "gradient_accumulation_steps") is None
    )
    derived = total // per_step
    if (
        open_accumulation
        and total % per_step == 0
        and derived not in (0, cfg.gradient_accumulation_steps)
    ):
        cfg.gradient_accumulation_steps = derived
        logger.info(
            "%s in %s sets --gradient-accumulation-steps %d (%d ranks x micro batch %d)",
            _quote("train_batch_size", total), label, derived, world_size, cfg.micro_batch_size,
        )  # fmt: skip
    product = per_step * cfg.gradient_accumulation_steps
    if product != total:
        raise UsageError(
            f"{_quote('train_batch_size', total)} in {label} is not micro batch "
            f"{cfg.micro_batch_size} x accumulation {cfg.gradient_accumulation_steps} x "
            f"{world_size} ranks = {product}; drop it or change one of them"
        )


def _check_optimizer(section: Any, label: str) -> None:
    if section is None:
        return
    kind = section.get("type")
    if kind is not None and str(kind).lower() not in ("adam", "adamw"):
        raise UsageError(
            f"{_quote('optimizer.type', kind)} in {label}: refdpo always trains with AdamW (its "
            'NaN/inf step guard wraps it); drop the optimizer section or make it "AdamW"'
        )
    params = section.get("params") or {}
    other = sorted(
        k
        for k, v in params.items()
        if v != AUTO and k not in ADAMW_PARAMS and not (k == "adam_w_mode" and v is True)
    )
    if other:
        raise UsageError(
            f'"optimizer.params" {other} in {label}: refdpo\'s AdamW takes only lr, betas, eps '
            "and weight_decay; drop the others"
        )


def _check_scheduler(section: Any, cfg: TrainConfig, label: str) -> None:
    if section is None:
        return
    explicit = sorted(k for k, v in (section.get("params") or {}).items() if v != AUTO)
    if explicit:
        raise UsageError(
            f'"scheduler.params" {explicit} in {label}: refdpo runs its own schedule; drop the '
            "scheduler section and use --lr-scheduler-type and --warmup-ratio or --warmup-steps"
        )
    logger.info(
        "%s: scheduler section dropped; refdpo's schedule applies (--lr-scheduler-type %s, "
        "--warmup-ratio %s, --warmup-steps %s)",
        label, cfg.lr_scheduler, cfg.warmup_ratio, cfg.warmup_steps,
    )  # fmt: skip


def _check_sections(raw: dict, cfg: TrainConfig, label: str) -> None:
    """What refdpo cannot honour, refused before a model loads."""
    if _explicit(raw, "fp16.enabled") is True:
        raise UsageError(
            f'"fp16.enabled": true in {label}: refdpo trains in fp32 or bf16 (fp16 would need '
            'loss scaling, which refdpo does not set up); use "bf16" or --dtype bf16'
        )
    if raw.get("zero_force_ds_cpu_optimizer") is True:
        raise UsageError(
            f'"zero_force_ds_cpu_optimizer": true in {label}: refdpo passes its own AdamW '
            "(with its NaN/inf step guard), which this setting refuses; drop it"
        )
    _check_optimizer(raw.get("optimizer"), label)
    _check_scheduler(raw.get("scheduler"), cfg, label)


def adamw_kwargs(raw: dict, label: str) -> dict:
    """The optimizer section's explicit betas and eps, as torch.optim.AdamW arguments."""
    params = (raw.get("optimizer") or {}).get("params") or {}
    extra: dict[str, Any] = {}
    betas = _explicit(params, "betas")
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == 2):
            raise UsageError(
                f"{_quote('optimizer.params.betas', betas)} in {label}: expected [b1, b2]"
            )
        extra["betas"] = tuple(_cast(b, float, "optimizer.params.betas", label) for b in betas)
    eps = _explicit(params, "eps")
    if eps is not None:
        extra["eps"] = _cast(eps, float, "optimizer.params.eps", label)
    return extra


def apply_user_file(cfg: TrainConfig, world_size: int) -> dict:
    """Settle cfg against its --deepspeed file (see the module docstring) and check
    what refdpo cannot honour; returns the file's extra AdamW arguments (betas, eps).

    Call once, early, on every rank: the errors are the same everywhere, before any
    collective or model load. The stage the file gives becomes cfg.zero_stage, so
    checkpointing and export gather the weights the way the engine partitioned them.
    """
    if not cfg.deepspeed_config:
        return {}
    label = cfg.deepspeed_config
    raw = read_file(label)
    _check_sections(raw, cfg, label)
    for field, (value, quoted) in file_settings(raw, label).items():
        _settle(cfg, field, value, quoted, label)
    _settle_batch(cfg, raw, label, world_size)
    return adamw_kwargs(raw, label)


def _hidden_size(model_config: Any) -> int | None:
    """The model width, found where the Hugging Face DeepSpeed integration looks for it."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if getattr(config, "hidden_size", None):
            return config.hidden_size
        if getattr(config, "hidden_sizes", None):
            return max(config.hidden_sizes)
    return None


def auto_values(cfg: TrainConfig, world_size: int, model_config: Any) -> dict[str, Any]:
    """Value of each "auto" refdpo knows how to fill, by dotted path."""
    values: dict[str, Any] = {
        "fp16.enabled": False,
        # on CPU (gloo) or one rank there is nothing to overlap: it only adds buffers
        "zero_optimization.overlap_comm": torch.cuda.is_available() and world_size > 1,
        **{path: "cpu" if cfg.offload else "none" for path in OFFLOAD_PATHS},
    }
    hidden = _hidden_size(model_config)
    if hidden:
        # the sizes transformers' DeepSpeed integration fills for "auto"
        # (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig.
        # trainer_config_finalize): buckets of one hidden x hidden matrix instead of
        # DeepSpeed's fixed 5e8 elements, which cost gigabytes whatever the model size. It
        # fills the stage3_* two under ZeRO-3 only; other stages ignore them. DeepSpeed 0.19
        # reads allgather_bucket_size only where torch lacks all_gather_into_tensor
        # (runtime/utils.py all_gather_dp_groups), so it is left alone.
        values["zero_optimization.reduce_bucket_size"] = hidden * hidden
        values["zero_optimization.stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
        values["zero_optimization.stage3_param_persistence_threshold"] = 10 * hidden
    return values


def _shared_values(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """Settings refdpo's own code also relies on: written where the file is "auto" or silent
    (DeepSpeed's defaults there, such as no clipping or ZeRO-0, would differ from refdpo's)."""
    accumulation = cfg.gradient_accumulation_steps
    return {
        "train_batch_size": cfg.micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization.stage": cfg.zero_stage,
        "bf16.enabled": cfg.dtype == "bf16",
    }


def _fill_auto(node: Any, values: dict[str, Any], path: str = "") -> Any:
    """A copy of `node` with each "auto" at a dotted path in `values` replaced by its value."""
    if isinstance(node, dict):
        return {k: _fill_auto(v, values, f"{path}.{k}" if path else k) for k, v in node.items()}
    if isinstance(node, str) and node == AUTO:
        return values.get(path, node)
    return node


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def deepspeed_config(cfg: TrainConfig, world_size: int, model_config: Any) -> dict:
    """What DeepSpeed gets: cfg.deepspeed_config (settled by apply_user_file) or the built-in
    file for cfg's stage and offload, with every "auto" filled by its dotted path.

    `model_config` is the policy's Hugging Face config: its hidden size sizes the buckets.
    The optimizer and scheduler sections are removed: refdpo passes its own AdamW and
    schedule.
    """
    cfg.resolve_zero_stage(world_size)  # a no-op once train() has resolved it
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
    else:
        path = CONFIG_DIR / ("zero3_offload.json" if cfg.offload else f"zero{cfg.zero_stage}.json")
    config = read_file(path)
    for field, (value, quoted) in file_settings(config, str(path)).items():
        if getattr(cfg, field) != value:  # apply_user_file was not called
            raise UsageError(
                f"{quoted} in {path} disagrees with {_flag(field, getattr(cfg, field))}"
            )
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    for key, value in _shared_values(cfg, world_size).items():
        if _explicit(config, key) is None:
            _set(config, key, value)
    if cfg.offload and all(_get(config, p) is None for p in OFFLOAD_PATHS):
        for key in OFFLOAD_PATHS:
            _set(config, key, "cpu")
    config = _fill_auto(config, auto_values(cfg, world_size, model_config))
    if any(_get(config, p) in OFFLOADED for p in OFFLOAD_PATHS):
        # DeepSpeed refuses a client optimizer with offload unless told it is meant
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    leftover = [k for k, v in _walk(config) if v == AUTO]
    if leftover:
        raise UsageError(f"{path}: no value for 'auto' in {leftover}; give them one")
    return config
