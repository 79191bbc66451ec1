"""LLaVA-1.5 (and other one-crop LLaVA checkpoints): one row of pixel_values per image, a
fixed number of `<image>` tokens per image, 1D positions, the plain 4D pair mask."""

from __future__ import annotations

from refdpo.shared.errors import UsageError
from refdpo.shared.vision.base import Family, ImageInfo, runs


class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    extras_fields = ()
    placeholder = "<image>"
    vision_keys = ("pixel_values",)
    processor_fields = (
        "patch_size",
        "num_additional_image_tokens",
        "vision_feature_select_strategy",
    )

    def check_processor(self, processor) -> None:
        super().check_processor(processor)
        if getattr(processor, "patch_size", None) is None:
            raise UsageError("the LLaVA processor has no patch_size: it cannot expand <image>")

    def image_infos(self, processor, processed: dict, prompt_ids: list[int]) -> list[ImageInfo]:
        """The processor's own count per image: (height / patch) x (width / patch) patches,
        plus its extra tokens (CLS), less the CLS the "default" strategy drops."""
        infos = []
        for pixels in processed.get("pixel_values", [])[: self.num_images(processed)]:
            h, w = pixels.shape[-2:]
            n = (h // processor.patch_size) * (w // processor.patch_size)
            n += processor.num_additional_image_tokens
            n -= processor.vision_feature_select_strategy == "default"
            infos.append(ImageInfo(int(n)))
        found = sum(runs(list(prompt_ids), self.processor_token_id(processor)))
        if found != sum(i.tokens for i in infos):
            raise ValueError(f"{found} image tokens in the prompt ids for {len(infos)} images")
        return infos

    def image_token_counts(self, config, ids: list[int]) -> list[int]:
        """Images written back to back ("<image><image>") give one run of ids: cut every run
        into images of the model's fixed count (patches, + CLS under "full")."""
        vision = config.vision_config
        per_image = (vision.image_size // vision.patch_size) ** 2
        per_image += config.vision_feature_select_strategy == "full"
        counts = []
        for run in runs(list(ids), self.image_token_id(config)):
            if run % per_image:
                raise ValueError(f"a run of {run} image tokens, images have {per_image}")
            counts += [per_image] * (run // per_image)
        return counts
