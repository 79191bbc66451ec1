"""Vision-language pairs: one adapter per model family, found from the model's config.

family = family_for(model)                  # by config.model_type
ids, vision = encode_prompt(processor, family, text, images)
logps = vision_pair_logps(model, family, pack_pairs(...), family.process_images(...))
"""

from __future__ import annotations

from refdpo.shared.errors import UsageError
from refdpo.shared.vision.base import Family, ImageInfo
from refdpo.shared.vision.gemma import Gemma3
from refdpo.shared.vision.idefics import Idefics3
from refdpo.shared.vision.llava import Llava
from refdpo.shared.vision.llava_next import LlavaNext
from refdpo.shared.vision.paligemma import PaliGemma
from refdpo.shared.vision.qwen import Qwen2VL, Qwen3VL
from refdpo.shared.vision.scoring import (
    SHARED,
    TWO_SEQUENCES,
    VisionPairScorer,
    VisionPasses,
    count_vision_passes,
    encode_prompt,
    fallback_pair_logps,
    naive_pair_logps,
    two_sequence_layout,
    vision_pair_logps,
)

FAMILIES: tuple[Family, ...] = (
    Llava(),
    LlavaNext(),
    Qwen2VL(),
    Qwen3VL(),
    Idefics3(),
    Gemma3(),
    PaliGemma(),
)


def family_for(model_or_config) -> Family:
    """The adapter serving a model (or its config), by config.model_type."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    served = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UsageError(f"no vision adapter for model_type {model_type!r} (served: {served})")


__all__ = [
    "FAMILIES",
    "SHARED",
    "TWO_SEQUENCES",
    "Family",
    "ImageInfo",
    "VisionPairScorer",
    "VisionPasses",
    "count_vision_passes",
    "encode_prompt",
    "fallback_pair_logps",
    "family_for",
    "naive_pair_logps",
    "two_sequence_layout",
    "vision_pair_logps",
]
