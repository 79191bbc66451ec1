"""PaliGemma and PaliGemma 2: images first, then a prefix the model reads both ways.

The processor writes a prompt as `<image>` x images, BOS, the text, "\\n" (each `<image>`
expanded to image_seq_length image tokens) and the model's own forward lets that whole
prefix attend to itself bidirectionally (token_type_ids 0), the suffix (the completion,
token_type_ids 1) causally. Its positions count from 1. PaliGemma 2 (a Gemma2 text model)
adds sliding-window layers and a final-logit softcap, which its forward applies.

Text. refdpo encodes the prompt and prompt + completion texts (the completion is what the
joined ids add after the prompt ids); the processor would append "\\n" to each and insert a
BOS after the images. So the family writes the prefix itself (`prompt_text`: images, BOS,
text, "\\n") and `encode` expands only the image tokens, as the processor's own expansion
does, without its additions: the prompt's ids are the processor's, the completion follows.

Mask (shared layout): the pair mask (rejected never sees chosen) plus every prompt token of
a pair seeing every prompt token of the same pair; with sliding layers, {"full_attention",
"sliding_attention"} where the window cuts only the causal part (as the model's own mask:
(causal AND window) OR same prefix), measured on logical positions.
"""

from __future__ import annotations

import torch

from refdpo.shared.attention import PROMPT, attention_bias
from refdpo.shared.data import IMAGE_PLACEHOLDER
from refdpo.shared.vision.base import Family, ImageInfo, runs


def prefix_blocks(pair_index: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """Bool Shape (rows, 1, L, L): query and key are prompt tokens of the same pair."""
    prompt = (part == PROMPT) & (pair_index >= 0)
    same_pair = pair_index[:, :, None] == pair_index[:, None, :]
    return (same_pair & prompt[:, :, None] & prompt[:, None, :])[:, None]


class PaliGemma(Family):
    name = "paligemma"
    model_types = ("paligemma",)
    extras_fields = ()
    placeholder = "<image>"
    vision_keys = ("pixel_values",)
    processor_fields = ("image_seq_length",)

    # -- processor side -------------------------------------------------------------------
    def prompt_text(self, processor, prompt: str) -> str:
        """The images first (PaliGemma reads no image inside the text), BOS, the text less
        its placeholders, "\\n": the prefix the processor builds."""
        images = prompt.count(IMAGE_PLACEHOLDER)
        text = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        return self.placeholder * images + processor.tokenizer.bos_token + text + "\n"

    def encode(self, processor, text: str, images: list, add_special_tokens: bool = False):
        """Ids of a text that already holds PaliGemma's prefix (prompt_text), each `<image>`
        expanded to image_seq_length image tokens; the images' pixel_values."""
        expanded = text.replace(
            processor.image_token, processor.image_token * processor.image_seq_length
        )
        ids = processor.tokenizer(
            [expanded], add_special_tokens=add_special_tokens, return_tensors="pt"
        )["input_ids"]
        return {"input_ids": ids, **self.process_images(processor, images)}

    def image_infos(self, processor, processed: dict, prompt_ids: list[int]) -> list[ImageInfo]:
        """image_seq_length tokens per image (images back to back make one run)."""
        infos = [ImageInfo(int(processor.image_seq_length))] * self.num_images(processed)
        found = sum(runs(list(prompt_ids), self.processor_token_id(processor)))
        if found != sum(i.tokens for i in infos):
            raise ValueError(f"{found} image tokens in the prompt ids for {len(infos)} images")
        return infos

    # -- token side -----------------------------------------------------------------------
    def image_token_counts(self, config, ids: list[int]) -> list[int]:
        per_image = int(config.text_config.num_image_tokens)
        counts = []
        for run in runs(list(ids), self.image_token_id(config)):
            if run % per_image:
                raise ValueError(f"a run of {run} image tokens, images have {per_image}")
            counts += [per_image] * (run // per_image)
        return counts

    # -- model side -----------------------------------------------------------------------
    def naive_kwargs(self, config, input_ids: torch.Tensor, prompt_len: int | None = None) -> dict:
        # what the processor returns with a suffix: 0 on the prefix (bidirectional), 1 after
        if prompt_len is None:
            raise ValueError("PaliGemma's forward needs the prompt length (its prefix)")
        token_type_ids = torch.ones_like(input_ids)
        token_type_ids[:, :prompt_len] = 0
        return {"token_type_ids": token_type_ids}

    def positions(self, model, layout, vision: dict) -> torch.Tensor:
        # PaliGemma counts positions from 1 (its forward: arange + 1)
        return layout.position_ids + 1

    def attention_mask(self, model, layout, positions: torch.Tensor, dtype: torch.dtype):
        """The pair mask OR the pair's prefix both ways; a dict when the text model has
        sliding layers. 4D additive, Shape (rows, 1, L, L)."""
        causal = attention_bias(layout.pair_index, layout.part, torch.float32) == 0
        prefix = prefix_blocks(layout.pair_index, layout.part)
        low = torch.finfo(dtype).min

        def additive(ok: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, low)

        window = getattr(model.config.get_text_config(), "sliding_window", None)
        if window is None:
            return additive(causal | prefix)
        near = (positions[:, :, None] - positions[:, None, :]) < window
        return {
            "full_attention": additive(causal | prefix),
            "sliding_attention": additive((causal & near[:, None]) | prefix),
        }
