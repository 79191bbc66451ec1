"""The final Hugging Face folder: full weights (ZeRO-3 shards gathered), merged LoRA, or the
LoRA adapter alone. Rank 0 writes; every rank takes part in gathering ZeRO-3 weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from refdpo.shared.models import is_vision_model, load_model, load_processor
from refdpo.train.config import TrainConfig

logger = logging.getLogger(__name__)


POLICY_PREFIX = "policy."  # the engine's module is PairScorer; the model is its child `policy`


def policy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's own names: the engine's state dict without the scorer's prefix."""
    return {k.removeprefix(POLICY_PREFIX): v for k, v in state.items()}


def gathered_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The policy's full state dict on rank 0 (None elsewhere); ZeRO-3 gathers its partitions."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return policy_state(state) if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.policy.state_dict().items()}


def export_model(engine, cfg: TrainConfig, tokenizer, folder: Path) -> None:
    state = gathered_state_dict(engine, cfg.zero_stage)
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.lora and cfg.export == "adapter":
            engine.module.policy.save_pretrained(folder, state_dict=state)
        elif cfg.lora:
            _save_merged(cfg, engine.module.policy.peft_config["default"], state, folder)
        else:
            _fresh_copy(cfg, state).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if is_vision_model(cfg.model):  # the image processor and chat template too
            load_processor(cfg.model).save_pretrained(folder)
        logger.info(
            "exported the %s model to %s",
            "adapter of the" if cfg.export == "adapter" else "trained",
            folder,
        )
    dist.barrier()


def _fresh_copy(cfg: TrainConfig, state: dict) -> torch.nn.Module:
    """A plain CPU model holding `state`: independent of the engine's (maybe partitioned) one."""
    model = load_model(
        cfg.model, cfg.adapter, cfg.dtype, cfg.attn_implementation, torch.device("cpu"),
        vision=is_vision_model(cfg.model),
    )  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    shared = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tied = {"lm_head.weight"} if shared else set()  # tied: stored once, under the embedding
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"export: state dict mismatch, missing {missing}, unexpected {unexpected}"
        )
    return model


def _save_merged(cfg: TrainConfig, lora_config, state: dict, folder: Path) -> None:
    from peft import get_peft_model

    base = load_model(
        cfg.model, cfg.adapter, cfg.dtype, cfg.attn_implementation, torch.device("cpu"),
        vision=is_vision_model(cfg.model),
    )  # fmt: skip
    peft_model = get_peft_model(base, lora_config)
    missing, unexpected = peft_model.load_state_dict(state, strict=False)
    if unexpected or any("lora_" in k for k in missing):
        raise RuntimeError(
            f"export: LoRA state mismatch, missing {missing}, unexpected {unexpected}"
        )
    peft_model.merge_and_unload().save_pretrained(folder)
