"""Stage two for vision folders: the processor checked against the one stage one used, and
each micro-batch's image inputs rebuilt from the image store.

Nothing is re-tokenized: the stored prompt ids already hold every image's tokens. Per pair
the images are fetched by sha256 (the store re-hashes them), decoded by the recorded policy
and run through the image processor only; the token count and the family's extras of each
image must equal the stored ones (else the pixels would not line up with the ids), and on
the pairs stage one hashed, the processed pixels must hash the same.

Under ZeRO-3 every module call is a collective: a micro-batch without images on one rank
while another rank's has some would leave the vision tower's gathers unmatched. In a vision
run every micro-batch therefore carries images: a text-only one gets a fixed dummy image
(not all zero: a constant image normalizes to NaN in some towers), whose features are
multiplied by zero (the scorer's `dummy` input).
"""

from __future__ import annotations

import threading
from pathlib import Path

from refdpo.precompute.finalize import first_difference
from refdpo.shared.image_store import ImageStore
from refdpo.shared.images import DECODE_POLICY, decode_image, dummy_image, policy_difference
from refdpo.shared.shards import ShardError, shard_metadata
from refdpo.shared.vision.scoring import DUMMY_PREFIX, SHARED, TWO_SEQUENCES
from refdpo.shared.vision_pairs import pixel_digest, processor_fingerprint


def check_processor(folder: Path, manifest: dict, processor, family) -> None:
    """Refuse, by name, a processor, family or decoding policy other than stage one's."""
    recorded = manifest["provenance"].get("vision")
    if recorded is None:
        raise ShardError(
            f"{folder}: text shards, but --model is a vision-language model; precompute with "
            "it (and a dataset with images), or train a text model on these shards"
        )
    if recorded["family"] != family.name:
        raise ShardError(
            f"{folder}: scored with a {recorded['family']} model, --model is {family.name}"
        )
    now = processor_fingerprint(processor, family)
    if recorded["processor"]["class"] != now["class"]:
        raise ShardError(
            f"{folder}: provenance.vision.processor.class is {recorded['processor']['class']}, "
            f"the policy's processor is {now['class']}; the pixels would differ"
        )
    if recorded["processor"]["fingerprint"] != now["fingerprint"]:
        field = first_difference(recorded["processor"]["settings"], now["settings"])
        raise ShardError(
            f"{folder}: the policy's processor differs from stage one's in setting {field!r} "
            f"(stored {_at(recorded['processor']['settings'], field)!r}, now "
            f"{_at(now['settings'], field)!r}); use the processor stage one used, or "
            "precompute again"
        )
    if difference := policy_difference(recorded["decode_policy"], DECODE_POLICY):
        raise ShardError(
            f"{folder}: images were decoded with another policy ({difference} differs: "
            "refdpo's image decoding changed); precompute again with this refdpo"
        )


def recorded_layout(manifest: dict) -> str:
    """The layout stage one scored in: two sequences when a worker's self-test refused the
    shared layout for this model (the policy must then score the same way, or the step-0
    identity and the rewards compare two computations)."""
    layouts = manifest.get("vision", {}).get("layouts", [])
    return TWO_SEQUENCES if TWO_SEQUENCES in layouts else SHARED


def _at(settings: dict, path: str | None):
    value = settings
    for key in (path or "").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


class VisionInputs:
    """Builds a micro-batch's image inputs from its rows (in layout order), checking each
    pair's images against what stage one stored. Thread-safe (the prefetch thread calls it)."""

    def __init__(
        self,
        folder: Path,
        manifest: dict,
        processor,
        family,
        dummy: bool = False,
        verify: bool = True,
    ):
        self.processor, self.family, self.dummy = processor, family, dummy
        files = manifest.get("vision", {}).get("image_files", [])
        self.store = ImageStore(Path(folder), files, verify=verify)
        self.pixel_hashes = recorded_pixel_hashes(Path(folder), manifest)
        self.checked_pixels = 0
        self._lock = threading.Lock()

    def __call__(self, rows: list[dict]) -> dict:
        """The model inputs of `rows`' images; with none, the dummy image's (`dummy`: the
        run needs the vision tower on every micro-batch, ZeRO-3) or {}."""
        pieces = []  # each pair's images processed once, checked, then joined
        for row in rows:
            mine = [decode_image(self.store.get(sha)) for sha in row["image_sha256"] or []]
            if mine:
                processed = self.family.process_images(self.processor, mine)
                self.check(row, processed)
                pieces.append(processed)
        if pieces:
            return self.family.join_images(pieces)
        if not self.dummy:
            return {}
        processed = self.family.process_images(self.processor, [dummy_image()])
        return {DUMMY_PREFIX + name: value for name, value in processed.items()}

    def check(self, row: dict, processed: dict) -> None:
        """The pair's images as processed now must give the tokens stage one put in
        prompt_ids (and, on the pairs stage one hashed, the same pixels)."""
        infos = self.family.image_infos(self.processor, processed, row["prompt_ids"])
        stored = list(zip(row["image_tokens"], row["image_extras"], strict=True))
        now = [(info.tokens, list(info.extras)) for info in infos]
        if [(t, list(e)) for t, e in stored] != now:
            raise ShardError(
                f"pair {row['id']}: its images now process to (tokens, {self.family.extras_fields})"
                f" {now}, stage one stored {stored}; the processor or the images changed"
            )
        expected = self.pixel_hashes.get(row["id"])
        if expected is not None:
            if pixel_digest(processed) != expected:
                raise ShardError(
                    f"pair {row['id']}: its processed pixels differ from stage one's (same "
                    "token counts): the image processor computes differently here"
                )
            with self._lock:
                self.checked_pixels += 1


def recorded_pixel_hashes(folder: Path, manifest: dict) -> dict[str, str]:
    """Pair id -> the processed-pixel sha256 stage one recorded (a sample: each shard's first
    pair with images)."""
    found = {}
    for shard in manifest["shards"]:
        vision = shard_metadata(folder / shard["file"]).get("scoring", {}).get("vision") or {}
        found.update(vision.get("pixel_sha256") or {})
    return found
