"""LLaVA-NeXT (LLaVA-1.6, "anyres"): each image is a base crop plus a grid of crops picked
from the image's original size, so its token count depends on that size.

Extras per image: its original (height, width), the `image_sizes` row the processor returns.
The model reads it twice: to pick the crop grid and unpad the features (which fixes the token
count), and to know how many of the image's `pixel_values` crops are real. pixel_values are
Shape (images, crops, 3, H, W), padded with zero crops to the batch's most crops; the model
ignores the padding (it takes the first crops that `image_sizes` implies), so pairs processed
alone and joined (stage two) pad again to the joined batch's most crops, which gives exactly
the tensors of processing the whole batch at once.

Each image must be one run of image tokens: the count of a run cannot be cut into images
without the sizes (LLaVA-1.5's fixed count can), so a prompt with images back to back
("<image><image>") is refused (the chat template writes "<image>\\n" per image).
"""

from __future__ import annotations

import torch

from refdpo.shared.errors import UsageError
from refdpo.shared.vision.base import Family, runs
from refdpo.shared.vision.llava import Llava


class LlavaNext(Llava):
    name = "llava_next"
    model_types = ("llava_next",)
    extras_fields = ("height", "width")
    vision_keys = ("pixel_values", "image_sizes")

    def check_processor(self, processor) -> None:
        super().check_processor(processor)
        if not getattr(processor.image_processor, "do_pad", True):
            # without it the crops of a batch's images are a ragged list, not one tensor
            raise UsageError("the LLaVA-NeXT image processor's do_pad is off: turn it on")

    # one run of image tokens per image, its extras the image size (Family's check)
    image_infos = Family.image_infos

    def image_extras(self, processor, processed: dict, prompt_ids: list[int]) -> list[tuple]:
        if not processed:
            return []
        return [tuple(int(v) for v in size) for size in processed["image_sizes"].tolist()]

    def image_token_counts(self, config, ids: list[int]) -> list[int]:
        return runs(list(ids), self.image_token_id(config))

    def split_images(self, vision: dict, counts: list[int]) -> list[dict]:
        images = vision["pixel_values"].shape[0]
        if images != len(counts):
            raise ValueError(f"{len(counts)} images in the prompts, {images} in pixel_values")
        return [{k: v[i : i + 1] for k, v in vision.items()} for i in range(images)]

    def join_images(self, pieces: list[dict]) -> dict:
        """Pieces concatenated, pixel_values padded with zero crops to the most crops (what
        the image processor does for a batch)."""
        if not pieces:
            return {}
        crops = max(p["pixel_values"].shape[1] for p in pieces)
        pixels = [
            torch.nn.functional.pad(
                p["pixel_values"], (0, 0) * 3 + (0, crops - p["pixel_values"].shape[1])
            )
            for p in pieces
        ]
        sizes = torch.cat([p["image_sizes"] for p in pieces])
        return {"pixel_values": torch.cat(pixels), "image_sizes": sizes}
