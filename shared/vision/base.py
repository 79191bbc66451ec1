"""What a vision-language family must say for pairs to be scored with their images.

A `Family` knows one family's processor and model: how a prompt's text and images become
ids and tensors (`prompt_text`, `encode`: PaliGemma writes its own prefix; `process_images`,
`image_infos`), how many image tokens each image of a prompt holds (`image_token_counts`),
how to take the tensors of some images out of a batch's (`split_images`, `join_images`),
what the encoded images give the decoder (`encode_images`, `decoder_inputs`: Qwen3-VL's
DeepStack), and what the pair layout needs from the model: position ids (`positions`: Qwen's
M-RoPE differs) and the attention mask (`attention_mask`: Gemma3's is a dict, PaliGemma's
prefix bidirectional). The scoring code in `refdpo.shared.vision.scoring` calls nothing
else, so a new family is one small module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from refdpo.shared.attention import attention_bias
from refdpo.shared.data import IMAGE_PLACEHOLDER
from refdpo.shared.errors import UsageError

# Image-processor settings that draw random numbers: scores would not be reproducible, and
# stage two could not check its pixels against stage one's.
RANDOM_HINTS = ("random", "augment", "jitter")


@dataclass(frozen=True)
class ImageInfo:
    """One image of a prompt as stored by stage one and asserted by stage two.

    tokens: image-token ids this image became in prompt_ids.
    extras: the family's extras (Qwen: grid t, h, w; Idefics3: rows, cols; LLaVA: ()).
    """

    tokens: int
    extras: tuple[int, ...] = ()


def runs(ids: list[int], token: int) -> list[int]:
    """Lengths of the maximal runs of `token` in `ids`, in order."""
    out: list[int] = []
    previous = None
    for t in ids:
        if t == token:
            if previous == token:
                out[-1] += 1
            else:
                out.append(1)
        previous = t
    return out


def to_jsonable(value):
    """A processor setting as JSON (tuples as lists, enums and classes as their names)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class Family:
    """One model family's adapter (see the module docstring). Subclasses set the names and
    override what differs; the defaults fit a decoder with one row of `pixel_values` per image
    and plain 1D positions (LLaVA-1.5)."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    extras_fields: tuple[str, ...] = ()
    placeholder: str = "<image>"
    vision_keys: tuple[str, ...] = ("pixel_values",)
    # settings of the processor itself (not its image processor) that change token counts
    processor_fields: tuple[str, ...] = ()

    # -- processor side -------------------------------------------------------------------
    def check_processor(self, processor) -> None:
        """Refuse processors whose output is random or that the adapter does not support."""
        settings = processor.image_processor.to_dict()
        for key, value in sorted(settings.items()):
            if any(h in key.lower() for h in RANDOM_HINTS) and value not in (None, False, 0):
                raise UsageError(
                    f"the image processor's {key}={value!r} makes images random: turn it off "
                    "(both stages must see the same pixels)"
                )

    def processor_settings(self, processor) -> dict:
        """Everything of the processor that changes pixels or token counts, JSON-able: the
        classes, the whole image-processor config, the processor's own token settings and
        its chat template."""
        image = dict(processor.image_processor.to_dict())
        image.pop("processor_class", None)
        return to_jsonable({
            "processor_class": type(processor).__name__,
            "image_processor_class": type(processor.image_processor).__name__,
            "image_processor": image,
            "processor": {f: getattr(processor, f, None) for f in self.processor_fields},
            "image_token": getattr(processor, "image_token", None),
            "chat_template": getattr(processor, "chat_template", None),
        })  # fmt: skip

    def prompt_text(self, processor, prompt: str) -> str:
        """A string prompt (images as `<image>`) as the family's processor expects its text
        (Qwen: vision-start / pad / vision-end). Chat prompts are the chat template's."""
        return prompt.replace(IMAGE_PLACEHOLDER, self.placeholder)

    def encode(self, processor, text: str, images: list, add_special_tokens: bool = False):
        """The processor on one rendered text and its images: input_ids (Shape (1, length),
        every placeholder expanded into its image's tokens) and the vision tensors."""
        return processor(
            text=[text],
            images=[images] if images else None,
            return_tensors="pt",
            add_special_tokens=add_special_tokens,
        )

    def process_images(self, processor, images: list) -> dict[str, torch.Tensor]:
        """The model-forward tensors of `images` (a batch's, in layout order); {} for none."""
        if not images:
            return {}
        out = processor.image_processor(images=list(images), return_tensors="pt")
        return {k: out[k] for k in self.vision_keys if k in out}

    def image_infos(self, processor, processed: dict, prompt_ids: list[int]) -> list[ImageInfo]:
        """Per image of one pair (processed = process_images of that pair's images)."""
        counts = runs(list(prompt_ids), self.processor_token_id(processor))
        extras = self.image_extras(processor, processed, prompt_ids)
        if len(extras) != len(counts):
            raise ValueError(f"{len(counts)} images in the prompt ids, {len(extras)} processed")
        return [ImageInfo(n, tuple(e)) for n, e in zip(counts, extras, strict=True)]

    def processor_token_id(self, processor) -> int:
        """The id the processor expands each image placeholder into."""
        token_id = getattr(processor, "image_token_id", None)
        if token_id is None:
            token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        return int(token_id)

    def image_extras(self, processor, processed: dict, prompt_ids: list[int]) -> list[tuple]:
        """The extras of each image (default: none), one entry per processed image."""
        return [() for _ in range(self.num_images(processed))]

    def num_images(self, processed: dict) -> int:
        return 0 if not processed else int(processed["pixel_values"].shape[0])

    # -- token side (model config) --------------------------------------------------------
    def image_token_id(self, config) -> int:
        return int(config.image_token_id)

    def image_token_counts(self, config, ids: list[int]) -> list[int]:
        """Image-token count of each image of a prompt, from its ids and the model config
        (default: one run of image tokens per image)."""
        return runs(list(ids), self.image_token_id(config))

    def split_images(self, vision: dict, counts: list[int]) -> list[dict]:
        """The batch's vision tensors cut per image; counts: image tokens per image."""
        return [{k: v[i : i + 1] for k, v in vision.items()} for i in range(len(counts))]

    def join_images(self, pieces: list[dict]) -> dict:
        """The inverse of split_images for any run of images; {} for none."""
        if not pieces:
            return {}
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    # -- model side ----------------------------------------------------------------------
    def base(self, model):
        """The VLM without its lm_head: encodes images, scatters them, runs the decoder."""
        return model.model

    def decoder(self, model):
        """The language model alone (inputs_embeds in: the scorer writes the images in)."""
        return model.model.language_model

    def vision_module(self, model) -> torch.nn.Module:
        """The module whose calls count as vision-tower passes."""
        return model.model.vision_tower

    def image_features(self, model, vision: dict) -> torch.Tensor:
        """All images encoded once: Shape (image tokens of the batch, hidden), in order."""
        out = self.base(model).get_image_features(**vision, return_dict=True).pooler_output
        if isinstance(out, (list, tuple)):
            out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
        return out.reshape(-1, out.shape[-1])

    def encode_images(self, model, vision: dict) -> list[torch.Tensor]:
        """All images encoded once, per image token in order, Shape (image tokens, hidden)
        each: first the features written into the image tokens' embeddings, then any the
        decoder also takes at the image tokens (Qwen3-VL's deepstack features)."""
        return [self.image_features(model, vision)]

    def decoder_inputs(self, is_image: torch.Tensor, extra: list[torch.Tensor]) -> dict:
        """The decoder's inputs beside embeddings, mask and positions, from the image tokens
        (is_image: Shape (rows, length)) and encode_images' extra features in their order."""
        return {}

    def softcap(self, model) -> float | None:
        """The final-logit softcap the model's own forward applies (TokenLogps applies the
        lm_head by hand, so it must apply the same)."""
        return getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def naive_kwargs(self, config, input_ids: torch.Tensor, prompt_len: int | None = None) -> dict:
        """Extra inputs the model's own forward needs beside ids and pixels, for one sequence
        [prompt, completion] (input_ids Shape (1, length)) whose prompt is prompt_len ids."""
        return {}

    def positions(self, model, layout, vision: dict) -> torch.Tensor:
        """Position ids of a layout (PackedPairs-like: input_ids, position_ids, pair_index,
        part). Default: the layout's own restart positions. Shape: (rows, length)."""
        return layout.position_ids

    def attention_mask(self, model, layout, positions: torch.Tensor, dtype: torch.dtype):
        """The 4D additive pair mask (Shape (rows, 1, L, L)); a family may return a dict."""
        return attention_bias(layout.pair_index, layout.part, dtype)
