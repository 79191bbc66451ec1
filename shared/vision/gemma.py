"""Gemma3: one row of pixel_values per image (no pan-and-scan), a fixed number of image soft
tokens between `<start_of_image>` and `<end_of_image>`, and two masks.

Masks. Gemma3 alternates sliding-window and full-attention layers and lets the tokens of an
image attend to each other both ways. Its decoder takes a dict {"full_attention": ...,
"sliding_attention": ...}; given one tensor it would use it for both kinds of layers. Here
both are 4D additive masks built from the pair layout:

    full     = pair mask  OR  same image block (of the same pair)
    sliding  = full  AND  (position[q] - position[k] < sliding_window)

with the window measured on logical positions (the rejected part's restart after the
prompt), as each sequence's own forward measures it, not on indices in the packed row.
"""

from __future__ import annotations

import torch

from refdpo.shared.attention import attention_bias
from refdpo.shared.errors import UsageError
from refdpo.shared.vision.base import Family


def image_blocks(input_ids: torch.Tensor, pair_index: torch.Tensor, image_id: int) -> torch.Tensor:
    """A block number for every image token (one per run of image tokens), -1 elsewhere.
    Shape: (rows, length)."""
    is_image = input_ids == image_id
    previous = torch.nn.functional.pad(is_image[:, :-1], (1, 0), value=False)
    starts = is_image & ~previous
    block = starts.long().cumsum(dim=1) - 1
    return torch.where(is_image & (pair_index >= 0), block, torch.full_like(block, -1))


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    extras_fields = ()
    placeholder = "<start_of_image>"
    vision_keys = ("pixel_values",)
    processor_fields = ("image_seq_length",)

    def check_processor(self, processor) -> None:
        super().check_processor(processor)
        if getattr(processor.image_processor, "do_pan_and_scan", None):
            raise UsageError(
                "the Gemma3 image processor's do_pan_and_scan is on: it is not supported "
                "(turn it off; each image must be one crop)"
            )

    def processor_token_id(self, processor) -> int:
        # processor.image_token is <start_of_image>, which expands into the soft tokens
        return int(processor.tokenizer.image_token_id)

    def softcap(self, model) -> None:
        # Gemma3ForConditionalGeneration's forward applies no final-logit softcapping, even
        # when its text config names one (Gemma3ForCausalLM's does; transformers 5.24)
        return None

    def naive_kwargs(self, config, input_ids: torch.Tensor, prompt_len: int | None = None) -> dict:
        # what the processor returns: image tokens marked 1 (bidirectional image blocks)
        return {"token_type_ids": (input_ids == self.image_token_id(config)).long()}

    def window_positions(self, layout, positions: torch.Tensor) -> torch.Tensor:
        """The positions the sliding window is measured on: logical ones."""
        return positions

    def attention_mask(self, model, layout, positions: torch.Tensor, dtype: torch.dtype):
        """{"full_attention", "sliding_attention"}: 4D additive masks, Shape (rows, 1, L, L)."""
        allowed = attention_bias(layout.pair_index, layout.part, torch.float32) == 0
        blocks = image_blocks(
            layout.input_ids, layout.pair_index, self.image_token_id(model.config)
        )
        same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        full = allowed | same_block[:, None]
        window = model.config.get_text_config().sliding_window
        pos = self.window_positions(layout, positions)
        near = (pos[:, :, None] - pos[:, None, :]) < window
        sliding = full & near[:, None]
        low = torch.finfo(dtype).min

        def additive(ok: torch.Tensor) -> torch.Tensor:
            return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, low)

        return {"full_attention": additive(full), "sliding_attention": additive(sliding)}
