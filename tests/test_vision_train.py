"""Stage two's vision options: which weights train (--freeze-vision-tower and
--freeze-multi-modal-projector, both true by default) and LoRA on the language model only
(--use-peft). Tiny random LLaVA on CPU (tests/vlms.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from refdpo.train.config import TrainConfig
from refdpo.train.engine import build_policy
from tests.test_train import metrics, run_train
from tests.test_vision_reruns import precompute, write_dataset
from tests.vlms import build_llava

TOWER, PROJECTOR, LANGUAGE = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.language_model.",
)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-train")
    model = build_llava(root)
    assert precompute(model, write_dataset(root), root / "shards") == 0
    return model, root / "shards"


def trainable(cfg: TrainConfig) -> set[str]:
    """Which parts of the policy have trainable weights: tower, projector, language."""
    parts = {TOWER: "tower", PROJECTOR: "projector", LANGUAGE: "language"}
    found = set()
    for name, param in build_policy(cfg).named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model.")  # PEFT's wrapper
            found |= {label for prefix, label in parts.items() if name.startswith(prefix)}
    return found


@pytest.mark.parametrize(
    ("flags", "parts"),
    [({}, {"language"}),
     ({"freeze_vision_tower": False}, {"language", "tower"}),
     ({"freeze_multi_modal_projector": False}, {"language", "projector"}),
     ({"freeze_vision_tower": False, "freeze_multi_modal_projector": False},
      {"language", "tower", "projector"})],
    ids=["defaults", "tower", "projector", "both"],
)  # fmt: skip
def test_freeze_options_decide_which_parts_train(llava_run, tmp_path, flags, parts):
    model, shards = llava_run
    cfg = TrainConfig(
        shards=str(shards), model=str(model), output=str(tmp_path), dtype="fp32", **flags
    )
    assert trainable(cfg) == parts


def test_lora_goes_on_the_language_model_only(llava_run, tmp_path):
    model, shards = llava_run
    cfg = TrainConfig(
        shards=str(shards), model=str(model), output=str(tmp_path), dtype="fp32", lora=True
    )
    policy = build_policy(cfg)
    adapted = [n for n, m in policy.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(LANGUAGE in n for n in adapted), adapted
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)
    # --freeze-vision-tower false has nothing to add to LoRA: the tower stays as it is
    assert trainable(cfg) == {"language"}


def test_default_training_leaves_tower_and_projector_unchanged(llava_run, tmp_path):
    """Two steps with the defaults and a large learning rate: the exported language model
    moved, the vision tower and the projector are the reference's to the bit; step 0 at ln 2."""
    model, shards = llava_run
    done = run_train(["--model", model, "--shards", shards, "--output", tmp_path,
                      "--max-steps", 2, "--per-device-train-batch-size", 2,
                      "--learning-rate", "1e-2"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert abs(metrics(tmp_path)[1]["loss"] - math.log(2)) < 1e-6
    exported = next(tmp_path.rglob("model.safetensors"))
    before, after = load_file(Path(model) / "model.safetensors"), load_file(exported)
    assert before.keys() == after.keys()
    # a LLaVA checkpoint names its parts without the leading "model."
    fixed = [n for n in before if n.startswith(("vision_tower.", "multi_modal_projector."))]
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert fixed and not set(fixed) & set(moved)
    assert moved and all(n.startswith("language_model.") for n in moved)
    # the export loads back as a vision-language model with its processor
    assert json.loads((exported.parent / "config.json").read_text())["model_type"] == "llava"
    assert any(exported.parent.glob("*processor*"))
