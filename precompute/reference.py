"""Where stage one's reference lives while it scores.

Three placements, one scoring path (score_pairs -> pair_logps):
- whole (default): each worker holds the whole reference on its device;
- ZeRO-3 (--zero-stage 3, --offload): the parameters are partitioned over the job's ranks
  with DeepSpeed's ZeRO-3 and gathered layer by layer in each forward; each rank still
  scores and writes its own shards;
- device map (--device-map): one worker per node, its layers spread over the node's GPUs by
  accelerate, then CPU, then disk (--offload-folder).

Under ZeRO-3 a forward is a series of all-gathers that every rank must join, so ranks run
forwards in lockstep (`Lockstep`): a rank out of pairs keeps joining with a dummy pair until
every rank is done.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from refdpo.precompute.config import PrecomputeConfig
from refdpo.shared.dist import bound_collectives
from refdpo.shared.errors import RefdpoError
from refdpo.shared.logprobs import PairScorer, pack_pairs, pair_logps
from refdpo.shared.models import input_device, load_model, model_fingerprint

logger = logging.getLogger(__name__)


class PeerFailed(RefdpoError):
    """Another rank of a ZeRO-3 job failed its checks; its own log says why. Exits with that
    rank's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest of every rank's `value` (one all-reduce)."""
    found = torch.tensor([value], device=device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return int(found.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank of the process group."""
    return bool(max_over_ranks(int(flag), device))


def collective_device(device: torch.device) -> torch.device:
    """Where a tensor for a collective lives: NCCL takes CUDA tensors only, gloo CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


class Lockstep:
    """A ZeRO-3 engine around PairScorer that every rank calls the same number of times.

    Before each forward the ranks agree, with one all-reduce, whether any of them still has
    work; a rank that has none (drain) runs a dummy pair and throws its values away. So ranks
    with fewer pairs, fewer shards or nothing left to do (a rerun) never leave another
    waiting in an all-gather. Looks like a DeepSpeed engine to pair_logps (`module`,
    `device`, call)."""

    def __init__(self, engine, pad_token_id: int):
        self.engine = engine
        self.pad_token_id = pad_token_id
        self.forwards = self.dummies = 0

    @property
    def module(self) -> PairScorer:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def config(self):
        return self.engine.module.config

    def __call__(self, *inputs) -> torch.Tensor:
        any_rank(True, collective_device(self.device))
        self.forwards += 1
        return self.engine(*inputs)

    @torch.inference_mode()
    def drain(self) -> None:
        """Join the others' forwards with dummy pairs until no rank has work left."""
        pad = self.pad_token_id
        dummy = pack_pairs([[pad, pad]], [[pad]], [[pad]], pad)
        while any_rank(False, collective_device(self.device)):
            self.dummies += 1
            pair_logps(self.engine, dummy)


@dataclass
class Reference:
    """The loaded reference: what scoring calls, its fingerprint (of the whole weights),
    where batches go, and how it is placed (recorded in each shard's scoring record)."""

    model: Any  # a causal LM, or Lockstep around a ZeRO-3 engine
    fingerprint: str
    device: torch.device
    placement: dict = field(default_factory=dict)

    def drain(self) -> None:
        """After a split: under ZeRO-3, join the other ranks' forwards until all are done."""
        if isinstance(self.model, Lockstep):
            self.model.drain()

    @property
    def config(self):
        return self.model.config


def zero3_config(cfg: PrecomputeConfig, dtype: str, model_config: Any) -> dict:
    """DeepSpeed's config for ZeRO-3 inference: no optimizer, batch size 1 (unused), the
    parameters partitioned, offloaded to CPU with --offload. Thresholds as transformers'
    'auto' values: a tensor under 10 x hidden elements (norms, biases) stays whole on every
    rank, and about one layer's worth is prefetched."""
    zero: dict[str, Any] = {"stage": 3}
    hidden = getattr(model_config, "hidden_size", None)
    if hidden:
        zero["stage3_param_persistence_threshold"] = 10 * hidden
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    if cfg.offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        config["fp16"] = {"enabled": True}
    return config


def load_reference(
    cfg: PrecomputeConfig,
    dtype: str,
    device: torch.device,
    pad_token_id: int,
    vision: bool = False,
) -> Reference:
    if vision:  # whole on each worker (open_reading refused the other placements)
        model = load_model(cfg.model, None, dtype, cfg.attn_implementation, device, vision=True)
        model = model.eval()
        return Reference(model, model_fingerprint(model), device, {"placement": "whole"})
    if cfg.zero_stage == 3:
        return load_partitioned(cfg, dtype, device, pad_token_id)
    if cfg.device_map:
        return load_placed(cfg, dtype)
    model = load_model(cfg.model, cfg.adapter, dtype, cfg.attn_implementation, device).eval()
    return Reference(model, model_fingerprint(model), device, {"placement": "whole"})


def load_partitioned(
    cfg: PrecomputeConfig, dtype: str, device: torch.device, pad_token_id: int
) -> Reference:
    """The reference partitioned over the ranks from the moment it loads: transformers builds
    it under DeepSpeed's zero.Init when a ZeRO-3 config is registered (HfDeepSpeedConfig), so
    no rank ever holds the whole weights, not even on CPU."""
    import deepspeed
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    if device.type == "cuda":  # zero.Init places partitions on the current device
        torch.cuda.set_device(device)
    config = zero3_config(cfg, dtype, AutoConfig.from_pretrained(cfg.model))
    registered = HfDeepSpeedConfig(config)
    model = load_model(cfg.model, None, dtype, cfg.attn_implementation, None, device).eval()
    scorer = PairScorer(model, cfg.logit_chunk_size)
    engine, *_ = deepspeed.initialize(model=scorer, config=config)
    bound_collectives(datetime.timedelta(seconds=cfg.dist_timeout))
    # TokenLogps uses the lm_head weight without calling the lm_head module: ZeRO-3 gathers
    # it around TokenLogps's call instead
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    register_external_parameter(scorer.head, scorer.head.lm_head.weight)
    engine.eval()
    del registered
    world = torch.distributed.get_world_size()
    placement = {"placement": "zero3", "ranks": world, "offload": cfg.offload}
    return Reference(Lockstep(engine, pad_token_id), model_fingerprint(model), device, placement)


def load_placed(cfg: PrecomputeConfig, dtype: str) -> Reference:
    """The reference spread over this node's devices by accelerate (--device-map)."""
    runs_on = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    placement_kwargs: dict[str, Any] = {"device_map": cfg.device_map}
    if cfg.memory_limits:
        placement_kwargs["max_memory"] = cfg.memory_limits
    if cfg.offload_folder:
        placement_kwargs["offload_folder"] = cfg.offload_folder
    model = load_model(
        cfg.model, None, dtype, cfg.attn_implementation, None, runs_on, **placement_kwargs
    ).eval()
    where = getattr(model, "hf_device_map", None) or {"": str(runs_on)}
    counts: dict[str, int] = {}
    for value in where.values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    logger.info("device map: modules per device %s", counts)
    placement = {"placement": "device_map", "device_map": cfg.device_map, "devices": counts}
    return Reference(model, model_fingerprint(model), input_device(model), placement)
