"""What the vision tower is given, counted at the tower: for bench/vision.py.

`TowerCount` is a forward hook on a family's vision module (`Family.vision_module`) that
adds up, per call, the images (or crops, for Idefics3) and the pixel values it receives.
Calls alone would not do: a batched forward encodes many images in one call, and TRL's
collator hands the tower every image twice in that one call. The count that compares
systems is `encodings`: pixel values received over the pixel values of the pairs' images
each processed once, i.e. how many times each pair's image went through the tower.

`trl_counts` runs TRL's DPOTrainer itself (the installed version, one epoch on CPU, fp32)
on the same tiny VLM and pairs, hooks on the policy's and the reference's towers, reference
online. It also asks for `precompute_ref_log_probs=True`, which TRL 1.16 refuses for vision
datasets (its constructor raises); the refusal is recorded as TRL words it.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass, field

import torch


@dataclass
class TowerCount:
    """Totals over the calls of one vision module while the hook is on."""

    calls: int = 0
    images: int = 0  # first dimension of the pixels (Qwen: rows of image_grid_thw)
    pixels: int = 0  # pixel values received (Qwen: flattened patch values)
    _handle: object = field(default=None, repr=False)

    def hook(self, module, args, kwargs, output) -> None:
        tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
        pixels = [t for t in tensors if t.is_floating_point()]
        grids = [
            t for t in tensors if not t.is_floating_point() and t.dim() == 2 and t.shape[-1] == 3
        ]
        self.calls += 1
        self.pixels += sum(t.numel() for t in pixels)
        self.images += int(grids[0].shape[0]) if grids else int(pixels[0].shape[0]) if pixels else 0

    @classmethod
    def attach(cls, family, model) -> TowerCount:
        counter = cls()
        module = family.vision_module(model)
        counter._handle = module.register_forward_hook(counter.hook, with_kwargs=True)
        return counter

    def detach(self) -> dict:
        """Stop counting; the totals."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return {"calls": self.calls, "images": self.images, "pixels": self.pixels}


def per_pair(totals: dict, pairs: int, own_pixels: int) -> dict:
    """Totals as figures per pair: `encodings` = pixels received / the pairs' own pixels."""
    return {
        **totals,
        "pairs": pairs,
        "images_per_pair": totals["images"] / pairs,
        "encodings": totals["pixels"] / own_pixels,
    }


def trl_rows(pairs) -> list[dict]:
    """The pairs as TRL's vision DPO dataset rows: conversational, one image each."""
    return [
        {
            "images": [p.image],
            "prompt": [{"role": "user", "content": p.prompt}],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
    ]


def trl_counts(folder, family, pairs, batch_size: int, own_pixels: int) -> dict:
    """Tower counts of TRL's DPOTrainer over one epoch of `pairs`, reference online; for
    precompute_ref_log_probs, the counts or TRL's refusal."""
    out = {}
    for mode in ("online", "precompute"):
        try:
            out[mode] = _trl_epoch(folder, family, pairs, batch_size, own_pixels, mode)
        except ValueError as e:
            if mode == "online":
                raise
            out[mode] = {"refused": str(e)}
    return out


def _trl_epoch(folder, family, pairs, batch_size: int, own_pixels: int, mode: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp, num_train_epochs=1, per_device_train_batch_size=batch_size,
            precompute_ref_log_probs=mode == "precompute", max_length=None, bf16=False,
            gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        policy = TowerCount.attach(family, model)
        try:  # the constructor runs the precompute pass, if any
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(trl_rows(pairs)),
                processing_class=processor,
            )
        finally:
            before = policy.detach()
        record = {"precompute": per_pair(before, len(pairs), own_pixels)} if before["calls"] else {}
        policy = TowerCount.attach(family, trainer.model)
        reference = trainer.ref_model and TowerCount.attach(family, trainer.ref_model)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its metrics
            trainer.train()
        record["policy"] = per_pair(policy.detach(), len(pairs), own_pixels)
        if reference:
            record["reference"] = per_pair(reference.detach(), len(pairs), own_pixels)
    return record
