"""Vision pairs: a pair's images read and decoded once, the pair tokenized by the processor.

Stage one calls `tokenize_vision_pair` where a text run calls `tokenize_pair`: the images are
read from the row's values (shared/images.py: bytes, {bytes, path}, a path relative to the
dataset file), decoded by the recorded policy, and given to the processor with the prompt, so
the stored prompt ids hold every image's tokens (tokenize once: stage two never re-tokenizes
text, it only runs the image processor on the same pixels). Each image keeps its sha256, its
encoded bytes (for the image store) and what the family records about it (`ImageInfo`:
token count, grid or crops), which stage two asserts against its own processing.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdpo.shared.data import Pair, RowError, image_key
from refdpo.shared.errors import UsageError
from refdpo.shared.images import (
    DECODE_POLICY,
    ImageError,
    decode_image,
    image_bytes,
    image_format,
    sha256_bytes,
)
from refdpo.shared.tokens import Encoder, TokenizedPair, Truncation, tokenize_pair
from refdpo.shared.vision import ImageInfo, encode_prompt


@dataclass(frozen=True)
class PairImage:
    """One image of a pair, as the shard and the image store record it."""

    sha256: str
    data: bytes  # the encoded file, as the dataset held it
    width: int
    height: int
    format: str
    path: str | None  # where it was read from (None: inline bytes)
    info: ImageInfo
    key: str = ""  # refdpo.shared.data.image_key of the row's value (which shard stores it)


class ProcessedOnce:
    """A processor's image processor that returns its last output again when called with the
    same image objects and arguments. Tokenizing a pair calls the processor three times with
    the pair's decoded images (the prompt and both joined texts, which hold the same image
    placeholders): the images are processed once. It keeps the images it keyed on, so their
    ids cannot pass to other images while its output is held; each call gets a shallow copy
    (a processor may pop keys from it, as Idefics3's pops rows and cols)."""

    def __init__(self, inner):
        self._inner = inner
        self._last: tuple[list, str, Any] | None = None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __call__(self, images=None, *args, **kwargs):
        flat, key, last = _flatten(images), repr((args, sorted(kwargs.items()))), self._last
        same = (
            last is not None
            and last[1] == key
            and len(last[0]) == len(flat)
            and all(a is b for a, b in zip(last[0], flat, strict=True))
        )
        if not same:
            self._last = last = (flat, key, self._inner(images, *args, **kwargs))
        return copy.copy(last[2])


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flatten(item)]
    return [images]


@dataclass(frozen=True)
class VisionContext:
    """What a vision run tokenizes with: the processor, the model family's adapter, and the
    folder relative image paths are read from (the dataset file's)."""

    processor: Any
    family: Any
    base_dir: Path | None = None

    @functools.cached_property
    def encoding_processor(self):
        """The processor whose image processor runs once per pair's images (ProcessedOnce)."""
        processor = copy.copy(self.processor)
        processor.image_processor = ProcessedOnce(self.processor.image_processor)
        return processor

    @property
    def image_token_ids(self) -> frozenset[int]:
        """The id each image placeholder expands into (a cut must not touch it)."""
        return frozenset({self.family.processor_token_id(self.processor)})


def read_images(pair: Pair, base_dir: Path | None) -> list[tuple[bytes, str | None, Any]]:
    """(encoded bytes, source path, decoded RGB image) of each of the pair's images; an image
    that cannot be used raises RowError with its reason (image_missing, image_truncated...)."""
    found = []
    for k, value in enumerate(pair.images):
        try:
            data, path = image_bytes(value, base_dir)
            found.append((data, path, decode_image(data)))
        except ImageError as err:
            raise RowError(err.reason, f"image {k + 1}: {err}") from None
    return found


def _with_family_placeholders(pair: Pair, family, processor) -> Pair:
    """A string prompt written as the family's processor expects it (`Family.prompt_text`:
    Qwen's vision-start / pad / vision-end for `<image>`, PaliGemma's prefix); chat prompts
    hold image parts, which the processor's chat template renders."""
    if pair.is_conversational:
        return pair
    return dataclasses.replace(pair, prompt=family.prompt_text(processor, pair.prompt))


def tokenize_vision_pair(
    pair: Pair,
    tokenizer,
    trunc: Truncation,
    template_kwargs: dict | None,
    ctx: VisionContext,
) -> TokenizedPair:
    """tokenize_pair with the processor: the prompt ids hold the images' tokens, and
    `images` the pair's PairImage records in prompt order. RowError when it cannot be used."""
    read = read_images(pair, ctx.base_dir)
    pair = _with_family_placeholders(pair, ctx.family, ctx.processor)
    decoded = [image for _, _, image in read]
    processed: list[dict] = []

    def encode(texts: list[str]) -> list[list[int]]:
        if not decoded:
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        for text in texts:
            try:
                ids, tensors = encode_prompt(ctx.encoding_processor, ctx.family, text, decoded)
            except (UsageError, ValueError) as err:  # the placeholder / image count checks
                raise RowError("image_count_mismatch", str(err)) from None
            processed.append(tensors)
            out.append(ids)
        return out

    encoder = Encoder(ctx.processor, encode, ctx.image_token_ids)
    tokenized = tokenize_pair(pair, tokenizer, trunc, template_kwargs, encoder)
    if not decoded:
        return tokenized
    infos = ctx.family.image_infos(ctx.processor, processed[0], tokenized.prompt_ids)
    expected = sum(info.tokens for info in infos)
    held = sum(1 for i in tokenized.prompt_ids if i in ctx.image_token_ids)
    if len(infos) != len(read) or held < expected:
        raise RowError(
            "image_count_mismatch",
            f"the prompt ids hold {held} image tokens for {len(infos)} image(s) of "
            f"{expected} tokens",
        )
    tokenized.images = [
        PairImage(
            sha256_bytes(data), data, image.width, image.height, image_format(data), path, info,
            image_key(value),
        )
        for (data, path, image), info, value in zip(read, infos, pair.images, strict=True)
    ]  # fmt: skip
    return tokenized


def processor_fingerprint(processor, family) -> dict:
    """What stage two must match: the processor's class and every setting that changes
    pixels or token counts (the family says which), with their sha256."""
    settings = family.processor_settings(processor)
    blob = json.dumps(settings, sort_keys=True, default=str)
    return {
        "class": type(processor).__name__,
        "settings": settings,
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
    }


def vision_provenance(ctx: VisionContext, image_store: str) -> dict:
    """The vision part of a folder's provenance: family, processor, decoding policy, store."""
    return {
        "family": ctx.family.name,
        "extras_fields": list(ctx.family.extras_fields),
        "processor": processor_fingerprint(ctx.processor, ctx.family),
        "decode_policy": DECODE_POLICY,
        "image_store": image_store,
    }


def pixel_digest(tensors: dict) -> str:
    """sha256 of the image processor's tensors, by name in sorted order (fp32 bytes)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        if torch.is_tensor(value):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
