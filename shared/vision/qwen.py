"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: images as flat patch rows with a (t, h, w) grid each,
M-RoPE (Qwen3-VL adds DeepStack, see Qwen3VL).

Positions. The decoder rotates with three position axes (temporal, height, width). The
prompt's come from the model's own rope-index function (text tokens count up on all three
axes, an image's tokens take their grid coordinates); both completions then continue from
the prompt's maximum + 1 on all three axes, as each would in its own forward. Plain 1D
restart positions are wrong here (the guard test shows it).
"""

from __future__ import annotations

import torch

from refdpo.shared.attention import PROMPT
from refdpo.shared.vision.base import Family, ImageInfo, runs


class Qwen2VL(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    extras_fields = ("t", "h", "w")
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    vision_keys = ("pixel_values", "image_grid_thw")

    def num_images(self, processed: dict) -> int:
        return 0 if not processed else int(processed["image_grid_thw"].shape[0])

    def image_infos(self, processor, processed: dict, prompt_ids: list[int]) -> list[ImageInfo]:
        """Per image: t x h x w patches, merged merge_size^2 to a token; extras the grid."""
        merge = processor.image_processor.merge_size
        grids = processed["image_grid_thw"].tolist() if processed else []
        infos = [ImageInfo(t * h * w // merge**2, (t, h, w)) for t, h, w in grids]
        found = runs(list(prompt_ids), self.processor_token_id(processor))
        if found != [i.tokens for i in infos]:
            raise ValueError(f"image tokens per image in the prompt ids {found}, grids {grids}")
        return infos

    def split_images(self, vision: dict, counts: list[int]) -> list[dict]:
        grids = vision["image_grid_thw"]
        rows = torch.split(vision["pixel_values"], grids.prod(dim=-1).tolist())
        return [{"pixel_values": r, "image_grid_thw": grids[i : i + 1]} for i, r in enumerate(rows)]

    def vision_module(self, model) -> torch.nn.Module:
        return model.model.visual

    def naive_kwargs(self, config, input_ids: torch.Tensor, prompt_len: int | None = None) -> dict:
        # what the processor returns beside the ids: which tokens are image tokens (M-RoPE)
        return {"mm_token_type_ids": (input_ids == self.image_token_id(config)).int()}

    def positions(self, model, layout, vision: dict) -> torch.Tensor:
        """M-RoPE positions of every pair. Shape: (3, rows, length); padding at 0."""
        ids, part = layout.input_ids, layout.part.tolist()
        out = torch.zeros(3, *ids.shape, dtype=torch.long, device=ids.device)
        token_id = self.image_token_id(model.config)
        for s in layout.segments:
            prompt = ids[s.row : s.row + 1, s.start : s.start + s.prompt_len]
            grids = layout.pair_vision[s.pair].get("image_grid_thw")
            prompt_pos, _ = model.model.get_rope_index(
                prompt,
                mm_token_type_ids=(prompt == token_id).int(),
                image_grid_thw=grids,
            )
            out[:, s.row, s.start : s.start + s.prompt_len] = prompt_pos[:, 0]
            at = s.start + s.prompt_len
            out[:, s.row, at : s.stop] = restarts(
                part[s.row][at : s.stop], int(prompt_pos.max()) + 1
            )
        return out


def restarts(parts: list[int], first: int) -> torch.Tensor:
    """Positions of a pair's completion tokens (their `part` values, chosen then rejected):
    each completion counts from `first` (the prompt's largest M-RoPE position + 1), on all
    three axes alike. Shape: (len(parts),)."""
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    kinds = torch.tensor(parts)
    assert not bool((kinds == PROMPT).any()), "a prompt token after the pair's completions"
    index = torch.arange(len(parts))
    begins = torch.ones(len(parts), dtype=torch.bool)
    begins[1:] = kinds[1:] != kinds[:-1]
    run_start = torch.cummax(torch.where(begins, index, 0), dim=0).values
    return first + index - run_start


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: Qwen2-VL's processing and M-RoPE positions (from its own rope-index
    function, interleaved axes inside the rotary embedding), plus DeepStack: the vision tower
    also returns features from some of its layers, which the decoder adds to the image
    tokens' hidden states after its first layers. The scorer lays them out like the image
    features and hands them to the decoder with the image tokens' mask."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def image_features(self, model, vision: dict) -> torch.Tensor:
        """Every per-token output of the tower, the DeepStack ones after the others. Shape:
        ((1 + DeepStack layers) x image tokens, hidden). The scorer calls it where the
        features are weighted out (a text-only micro-batch's dummy image): every output
        takes part, so every tower parameter gets its zero gradient on every rank (ZeRO-3)."""
        return torch.cat(self.encode_images(model, vision))

    def encode_images(self, model, vision: dict) -> list[torch.Tensor]:
        out = self.base(model).get_image_features(**vision, return_dict=True)
        deepstack = [torch.cat(layer) for layer in out.deepstack_features]
        return [torch.cat(out.pooler_output), *deepstack]

    def decoder_inputs(self, is_image: torch.Tensor, extra: list[torch.Tensor]) -> dict:
        if not extra:
            return {}
        return {"visual_pos_masks": is_image, "deepstack_visual_embeds": extra}
