"""Stage one for vision-language references: scoring through the family's layout, the
self-test that picks the layout, and each shard's part of the image store.

Layouts (shared/vision): "shared", one sequence [prompt with its images, chosen, rejected]
per pair, the image encoded once; "two_sequences", the fallback, [prompt, chosen] and
[prompt, rejected] with the image encoder's output reused. The self-test scores the first
pairs with images of the run with the chosen layout and with the model's own forward per
sequence (`naive_pair_logps`, no refdpo layout code) and refuses the shared layout when they
disagree; the result goes in every shard's scoring record and in the manifest.

Image store: the first row of the split that refers to an image (Survey.image_owners) owns
it; its shard's image file (`_images/<shard name>`) holds it, written before the shard, so a
complete shard always has its images. An image many pairs share is stored once per split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refdpo.shared.data import RowFormat, RowSource, image_key, row_images
from refdpo.shared.image_store import IMAGES_DIR, StoredImage, write_images
from refdpo.shared.images import ImageError, decode_image, image_bytes, image_format, sha256_bytes
from refdpo.shared.logprobs import PackedPairs, PairLogps, pack_pairs
from refdpo.shared.tokens import TokenizedPair
from refdpo.shared.vision import fallback_pair_logps, naive_pair_logps, vision_pair_logps
from refdpo.shared.vision_pairs import VisionContext, pixel_digest

logger = logging.getLogger(__name__)
LAYOUTS = {"shared": vision_pair_logps, "two_sequences": fallback_pair_logps}
SELF_TEST_PAIRS = 4
# largest per-token |layout - naive| the self-test accepts: fp32 agrees to rounding; in bf16
# and fp16 the two computations round differently (other shapes, other kernels), so the mean
# over the tested tokens is compared instead, far below what a wrong position or mask gives
SELF_TEST_TOLERANCE = {"fp32": ("max", 1e-4), "bf16": ("mean", 5e-2), "fp16": ("mean", 2e-2)}


@dataclass
class VisionScoring:
    """How a vision run scores a batch: the processor and family, and the layout the
    self-test chose (its record kept for the shards' metadata)."""

    ctx: VisionContext
    layout: str = "shared"
    self_test: dict | None = None
    passes: dict = field(default_factory=dict)

    def inputs(self, pairs: list[TokenizedPair]) -> dict:
        """The image processor's tensors for every image of `pairs`, in their order (the
        order their image tokens appear in the packed rows)."""
        images = [decode_image(image.data) for pair in pairs for image in pair.images]
        return self.ctx.family.process_images(self.ctx.processor, images)

    def pair_logps(
        self, model, batch: PackedPairs, pairs: list[TokenizedPair], chunk_size: int
    ) -> PairLogps:
        vision = self.inputs(pairs)
        return LAYOUTS[self.layout](model, self.ctx.family, batch, vision, chunk_size)

    def record(self, pairs: list[TokenizedPair]) -> dict:
        """The shard's vision scoring record: the layout, the self-test, and the processed
        pixels' sha256 of its first pair with images (stage two checks its processing)."""
        first = next((p for p in pairs if p.images), None)
        digests = {first.id: pixel_digest(self.inputs([first]))} if first else {}
        return {"layout": self.layout, "self_test": self.self_test, "pixel_sha256": digests}


def _difference(model, family, packed: PackedPairs, vision: dict, layout: str) -> torch.Tensor:
    """|layout - naive| per completion token, fp32."""
    with torch.inference_mode():
        ours = LAYOUTS[layout](model, family, packed, vision).token_logps.float().cpu()
        naive = naive_pair_logps(model, family, packed, vision).token_logps.float().cpu()
    return (ours - naive).abs()


def run_self_test(
    scoring: VisionScoring, model, pairs: list[TokenizedPair], pad_token_id: int, dtype: str
) -> None:
    """Pick the layout on this run's first pairs with images: the shared layout if it agrees
    with the model's own forward per sequence, else the two-sequence fallback, which must
    agree then (else the family adapter is wrong for this model: an error, not a guess)."""
    if scoring.self_test is not None:
        return
    tested = [p for p in pairs if p.images][:SELF_TEST_PAIRS]
    if not tested:
        return
    packed = pack_pairs(
        [p.prompt_ids for p in tested],
        [p.chosen_ids for p in tested],
        [p.rejected_ids for p in tested],
        pad_token_id,
    )
    vision = scoring.inputs(tested)
    kind, tolerance = SELF_TEST_TOLERANCE.get(dtype, ("mean", 5e-2))
    results = {}
    for layout in LAYOUTS:
        diff = _difference(model, scoring.ctx.family, packed, vision, layout)
        found = float(diff.max() if kind == "max" else diff.mean())
        results[layout] = {f"{kind}_abs_diff": found, "passed": found <= tolerance}
        if found <= tolerance:
            break
    chosen = next((name for name, r in results.items() if r["passed"]), None)
    scoring.self_test = {
        "pairs": len(tested),
        "tokens": int(packed.target_ids.numel()),
        "tolerance": {"statistic": kind, "value": tolerance, "dtype": dtype},
        "layouts": results,
        "chosen": chosen,
    }
    if chosen is None:
        raise RuntimeError(
            f"vision self-test: neither layout matches the model's own forward on "
            f"{len(tested)} pairs ({results}); the {scoring.ctx.family.name} adapter does not "
            "fit this model"
        )
    if chosen != "shared":
        logger.warning(
            "vision self-test: the shared layout differs from the model's own forward (%s); "
            "scoring with two sequences per pair (the image encoded once, its output reused)",
            results["shared"],
        )
    else:
        logger.info("vision self-test on %d pairs: shared layout agrees (%s)", len(tested), results)
    scoring.layout = chosen


def owned_positions(owners: dict[str, int]) -> dict[int, set[str]]:
    """Position -> the image keys whose first referring row it is."""
    found: dict[int, set[str]] = {}
    for key, position in owners.items():
        found.setdefault(position, set()).add(key)
    return found


def shard_images(
    pairs: list[TokenizedPair],
    owned: dict[int, set[str]],
    source: RowSource,
    start: int,
    stop: int,
    fmt: RowFormat,
    ctx: VisionContext,
    store: str,
) -> list[StoredImage]:
    """The images shard [start, stop) stores: those its rows own, whether or not the owning
    row became a pair (a later row may use the image). Taken from the kept pairs, else read
    again from the row; an image that does not decode is no one's (every row with it drops)."""
    keys = set().union(*(owned.get(p, set()) for p in range(start, stop)))
    found: dict[str, StoredImage] = {}
    for pair in pairs:
        for image in pair.images:
            if image.key in keys and image.key not in found:
                found[image.key] = _stored(image.data, image.path, image.width, image.height, store)
    for position in range(start, stop):
        missing = owned.get(position, set()) - set(found)
        if not missing:
            continue
        for value in row_images(source.get(position, position + 1)[0], fmt):
            key = image_key(value)
            if key in missing and key not in found:
                try:
                    data, path = image_bytes(value, ctx.base_dir)
                    decoded = decode_image(data)
                except ImageError:
                    continue
                found[key] = _stored(data, path, decoded.width, decoded.height, store)
    unique = {image.sha256: image for image in found.values()}  # two paths, one content
    return sorted(unique.values(), key=lambda image: image.sha256)


def _stored(data: bytes, path: str | None, width: int, height: int, store: str) -> StoredImage:
    """The store's record: the bytes, or with --image-store paths (and an image read from a
    file) only its absolute path and sha256, re-hashed when read."""
    by_path = store == "paths" and path is not None
    return StoredImage(
        sha256=sha256_bytes(data),
        data=None if by_path else data,
        width=width,
        height=height,
        format=image_format(data),
        path=str(Path(path).resolve()) if path else None,
    )


def write_shard_images(folder: Path, shard: str, images: list[StoredImage]) -> dict | None:
    """The shard's image file, written before the shard; its record for the shard metadata
    (None: the shard owns no image)."""
    if not images:
        return None
    (folder / IMAGES_DIR).mkdir(exist_ok=True)
    name = f"{IMAGES_DIR}/{shard}"
    digest = write_images(folder / name, images)
    return {"file": name, "sha256": digest, "images": len(images)}
