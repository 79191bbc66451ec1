"""Idefics3 and SmolVLM: each image split into rows x cols crops plus a global image.

A prompt's image becomes, per crop, `<fake_token_around_image><row_i_col_j>` + image_seq_len
`<image>` ids, then the global image's `<fake_token_around_image><global-img>` + the same
number of `<image>` ids. pixel_values hold every crop of a sample: Shape (1, crops, 3, H, W)
(pixel_attention_mask (1, crops, H, W) marks padding). The model side cuts the batch per
crop (one run of image tokens per crop), which is all the layouts need: a pair's images
are a run of crops. 1D positions, the plain 4D pair mask.
"""

from __future__ import annotations

import torch

from refdpo.shared.errors import UsageError
from refdpo.shared.vision.base import Family, ImageInfo


class Idefics3(Family):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    extras_fields = ("rows", "cols")
    placeholder = "<image>"
    vision_keys = ("pixel_values", "pixel_attention_mask")
    processor_fields = ("image_seq_len",)

    def check_processor(self, processor) -> None:
        super().check_processor(processor)
        if getattr(processor, "image_seq_len", None) is None:
            raise UsageError("the Idefics3 processor has no image_seq_len")

    def process_images(self, processor, images: list) -> dict[str, torch.Tensor]:
        """All images as the crops of one sample, in order (no padding images)."""
        if not images:
            return {}
        out = processor.image_processor(images=[list(images)], return_tensors="pt")
        return {k: out[k] for k in self.vision_keys if k in out}

    def num_images(self, processed: dict) -> int:
        raise NotImplementedError("Idefics3 counts images from the prompt ids")

    def image_infos(self, processor, processed: dict, prompt_ids: list[int]) -> list[ImageInfo]:
        """Per image: its image tokens and (rows, cols) read from its crop tags; (0, 0) for an
        image not split. The crops they imply must be the processed ones."""
        tok = processor.tokenizer
        image_id = self.processor_token_id(processor)
        global_id = tok.convert_tokens_to_ids(processor.global_image_tag)
        tags = {tok.convert_tokens_to_ids(f"<row_{i}_col_{j}>"): (i, j)
                for i in range(1, 7) for j in range(1, 7)}  # fmt: skip
        infos, rows, cols, tokens, closing = [], 0, 0, 0, False
        for t in [*prompt_ids, None]:
            if closing and t != image_id:  # the global image's run has ended: one image
                infos.append(ImageInfo(tokens, (rows, cols)))
                rows, cols, tokens, closing = 0, 0, 0, False
            if t == image_id:
                tokens += 1
            elif t == global_id:
                closing = True
            elif t in tags:
                rows, cols = max(rows, tags[t][0]), max(cols, tags[t][1])
        crops = sum(r * c + 1 for r, c in (i.extras for i in infos))
        have = 0 if not processed else int(processed["pixel_values"].shape[1])
        if crops != have:
            raise ValueError(f"the prompt ids imply {crops} crops, the images have {have}")
        return infos

    def split_images(self, vision: dict, counts: list[int]) -> list[dict]:
        """One piece per crop (counts: one run of image tokens per crop)."""
        crops = vision["pixel_values"].shape[1]
        if crops != len(counts):
            raise ValueError(f"{len(counts)} crops in the prompts, {crops} in pixel_values")
        return [{k: v[:, i : i + 1] for k, v in vision.items()} for i in range(crops)]

    def join_images(self, pieces: list[dict]) -> dict:
        if not pieces:
            return {}
        return {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}

    def decoder(self, model):
        return model.model.text_model

    def vision_module(self, model) -> torch.nn.Module:
        return model.model.vision_model
