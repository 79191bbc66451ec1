"""Vision folders on the paths users take after the first run: stage one rerun into a folder
whose image store was cut short or damaged, stage two killed and resumed, bf16 in both
stages, a model the shared layout does not fit (the self-test's fallback through both
stages), and drift of the decoding policy or the processor class between the stages.
Tiny random LLaVA on CPU (tests/vlms.py)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from refdpo.precompute import run as precompute_run
from refdpo.shared.shards import ShardError
from tests import faultkit
from tests.test_faults import assert_same_tensors, optimizer_state
from tests.test_train import ENV, metrics, module_state, run_train, train_command
from tests.vlms import build_llava, images

MANIFEST = "_manifest.json"


def write_dataset(root: Path) -> Path:
    """12 pairs over 6 images, two pairs per image, so that with 4 rows per shard each of the
    3 shards owns (stores) 2 images; the last pair uses the first image again (stored once)."""
    pictures = images(6, [(40, 50), (30, 30), (56, 28), (33, 44), (28, 60), (45, 45)])
    for k, picture in enumerate(pictures):
        picture.save(root / f"img{k}.png")
    rows = [
        {"question": f"What is in picture {k}?", "chosen": f"A fox {k}.",
         "rejected": f"A dog {k} jumps.", "image": f"img{k // 2}.png"}
        for k in range(11)
    ] + [{"question": "Again?", "chosen": "A fox.", "rejected": "A cat.", "image": "img0.png"}]  # fmt: skip
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def precompute(model: Path, dataset: Path, output: Path, *extra) -> int:
    args = ["--model", model, "--dataset", dataset, "--output", output,
            "--prompt-column", "question", "--rows-per-shard", 4, *extra]  # fmt: skip
    return precompute_run.main([str(a) for a in args])


def files(folder: Path) -> dict[str, bytes]:
    """Every file a reader sees (shards, image store, manifest), byte for byte."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "_run.json"
    }


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-reruns")
    model = build_llava(root)
    dataset = write_dataset(root)
    assert precompute(model, dataset, root / "clean") == 0
    manifest = json.loads((root / "clean" / MANIFEST).read_text())
    assert [f["images"] for f in manifest["vision"]["image_files"]] == [2, 2, 2]
    return model, dataset, root / "clean"


SECOND = "part-00000-00001.parquet"


def kill_window(out: Path) -> None:
    """What a writer killed between the second shard's image file and the shard leaves."""
    (out / SECOND).unlink()
    (out / MANIFEST).unlink()


def flip_image_file(out: Path) -> None:
    path = out / "_images" / SECOND
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def delete_image_file(out: Path) -> None:
    (out / "_images" / SECOND).unlink()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (kill_window, None),
        (flip_image_file, "differs from the one it was written with"),
        (delete_image_file, "is missing"),
    ],
    ids=["killed-after-image-file", "flipped-image-byte", "deleted-image-file"],
)
def test_a_rerun_restores_the_image_store_and_equals_a_clean_run(
    clean, tmp_path, caplog, damage, named
):
    model, dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    damage(out)
    caplog.clear()
    assert precompute(model, dataset, out) == 0
    if named:  # the shard is redone, naming its image file
        assert f"{SECOND}: its image file _images/{SECOND} {named}" in caplog.text
    assert files(out) == files(clean_folder)


def test_a_rerun_of_a_complete_vision_folder_loads_no_model(clean, tmp_path, caplog):
    model, dataset, clean_folder = clean
    out = tmp_path / "out"
    shutil.copytree(clean_folder, out)
    caplog.clear()
    assert precompute(model, dataset, out) == 0
    assert "loading reference" not in caplog.text
    assert files(out) == files(clean_folder)


RESUMABLE = ["--max-steps", 4, "--save-steps", 2, "--save-total-limit", 5, "--export", "none",
             "--resume", "auto", "--per-device-train-batch-size", 2, "--learning-rate", "1e-3",
             "--freeze-multi-modal-projector", "false"]  # fmt: skip


def test_killed_vision_run_resumes_to_exactly_the_uninterrupted_run(clean, tmp_path):
    """N steps + kill + resume equals the uninterrupted run: losses, weights (the projector
    trained too), optimizer state, and so the data order with its images."""
    model, _, folder = clean
    straight = tmp_path / "straight"
    args = [str(a) for a in ["--model", model, "--shards", folder, "--output", straight,
                             *RESUMABLE]]  # fmt: skip
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-3000:]

    output = tmp_path / "run"
    args = [a if a != str(straight) else str(output) for a in args]
    faultkit.kill_at(
        faultkit.start(train_command(args), tmp_path / "log", ENV, "train_step=3"), "train_step"
    )
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    for step in range(1, 5):  # bitwise on CPU fp32
        assert metrics(output)[step]["loss"] == metrics(straight)[step]["loss"], step
    mine, theirs = (d / "checkpoints" / "step-00000004" for d in (output, straight))
    assert_same_tensors(module_state(mine), module_state(theirs))
    assert_same_tensors(optimizer_state(mine), optimizer_state(theirs))


def test_bf16_in_both_stages_keeps_the_step0_identity(clean, tmp_path):
    """Stage one in bf16 (as on a GPU), stage two with no dtype flag follows it: the step-0
    check (stage one's batch, the same computation) passes; the first training step's
    micro-batch has other shapes than stage one's batch, so its bf16 values differ from the
    stored ones by rounding only: rewards within 1e-5 of 0, the loss within 1e-6 of ln 2."""
    model, dataset, _ = clean
    shards = tmp_path / "shards"
    assert precompute(model, dataset, shards, "--dtype", "bf16") == 0
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["provenance"]["dtype"] == "bf16"
    test = manifest["vision"]["self_tests"][0]
    assert test["tolerance"]["dtype"] == "bf16" and test["chosen"] == "shared"
    done = run_train(["--model", model, "--shards", shards, "--output", tmp_path / "run",
                      "--max-steps", 1, "--per-device-train-batch-size", 2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "policy dtype bf16: follows the shards" in done.stderr
    first = metrics(tmp_path / "run")[1]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5


def test_the_self_test_falls_back_to_two_sequences_and_stage_two_follows(
    clean, tmp_path, monkeypatch
):
    """A model the shared layout does not fit (here: a LLaVA adapter whose positions never
    restart for the rejected part, as a model that ignores position ids would behave): the
    self-test finds the shared layout wrong, scores with two sequences, and records it;
    the stored values equal the model's own forward; stage two scores in that layout."""
    import torch

    from refdpo.shared.vision.llava import Llava

    model, dataset, clean_folder = clean

    def unrestarted(self, model, layout, vision):
        return torch.arange(layout.input_ids.shape[1]).expand_as(layout.input_ids)

    monkeypatch.setattr(Llava, "positions", unrestarted)
    shards = tmp_path / "shards"
    assert precompute(model, dataset, shards) == 0
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["vision"]["layouts"] == ["two_sequences"]
    test = manifest["vision"]["self_tests"][0]
    assert not test["layouts"]["shared"]["passed"] and test["layouts"]["two_sequences"]["passed"]
    assert test["chosen"] == "two_sequences"
    # the clean folder was scored in the shared layout with restarted positions: both agree
    # with the model's own forward, so the stored values agree with each other
    fell_back = pd.read_parquet(shards).sort_values("id").reset_index(drop=True)
    shared = pd.read_parquet(clean_folder).sort_values("id").reset_index(drop=True)
    for column in ("ref_win_logp", "ref_rej_logp"):
        assert (fell_back[column] - shared[column]).abs().max() < 1e-4, column
    monkeypatch.undo()
    done = run_train(["--model", model, "--shards", shards, "--output", tmp_path / "run",
                      "--max-steps", 1, "--per-device-train-batch-size", 2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vision pairs scored as two_sequences" in done.stderr
    first = metrics(tmp_path / "run")[1]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first


# ------------------------------------------------------------------ drift between the stages


def test_a_changed_decode_policy_is_refused_by_name(clean, monkeypatch):
    """A refdpo whose image decoding changed (here: alpha composited on black) refuses the
    folder, naming the setting, before any image is read."""
    from transformers import AutoConfig, AutoProcessor

    from refdpo.shared.images import DECODE_POLICY
    from refdpo.shared.vision import family_for
    from refdpo.train import vision

    model, _, folder = clean
    manifest = json.loads((folder / MANIFEST).read_text())
    processor = AutoProcessor.from_pretrained(model)
    family = family_for(AutoConfig.from_pretrained(model))
    vision.check_processor(folder, manifest, processor, family)  # today's policy passes
    monkeypatch.setattr(vision, "DECODE_POLICY", {**DECODE_POLICY, "alpha": "on black"})
    with pytest.raises(ShardError, match="alpha differs"):
        vision.check_processor(folder, manifest, processor, family)


def test_another_processor_class_is_refused_by_name(clean):
    """Another processor class with the same settings (a subclass, say a fork's) may process
    pixels differently: refused, naming both classes."""
    from transformers import AutoConfig, LlavaProcessor

    from refdpo.shared.vision import family_for
    from refdpo.train.vision import check_processor

    model, _, folder = clean
    manifest = json.loads((folder / MANIFEST).read_text())
    loaded = LlavaProcessor.from_pretrained(model)

    class ForkedLlavaProcessor(LlavaProcessor):
        pass

    forked = ForkedLlavaProcessor(
        image_processor=loaded.image_processor,
        tokenizer=loaded.tokenizer,
        patch_size=loaded.patch_size,
        vision_feature_select_strategy=loaded.vision_feature_select_strategy,
        num_additional_image_tokens=loaded.num_additional_image_tokens,
        chat_template=loaded.chat_template,
    )
    family = family_for(AutoConfig.from_pretrained(model))
    check_processor(folder, manifest, loaded, family)  # the same class passes
    with pytest.raises(ShardError, match="ForkedLlavaProcessor") as refused:
        check_processor(folder, manifest, forked, family)
    assert "LlavaProcessor" in str(refused.value)


def test_path_mode_trains_from_the_files_and_refuses_a_changed_one(clean, tmp_path):
    """--image-store paths keeps each image's absolute path and sha256, no bytes: stage two
    reads the files (re-hashed) and starts at ln 2; a file changed after stage one is
    refused, naming the image and its path."""
    import pyarrow.parquet as pq

    model, dataset, _ = clean
    shards = tmp_path / "shards"
    assert precompute(model, dataset, shards, "--image-store", "paths") == 0
    stored = pq.read_table(shards / "_images" / "part-00000-00000.parquet").to_pylist()
    assert stored and all(r["bytes"] is None and Path(r["path"]).is_absolute() for r in stored)
    done = run_train(["--model", model, "--shards", shards, "--output", tmp_path / "run",
                      "--max-steps", 1, "--per-device-train-batch-size", 2])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert abs(metrics(tmp_path / "run")[1]["loss"] - math.log(2)) < 1e-6

    changed = Path(stored[0]["path"])
    original = changed.read_bytes()
    try:
        images(1, [(40, 50)], seed=7)[0].save(changed)
        done = run_train(["--model", model, "--shards", shards, "--output", tmp_path / "again",
                          "--max-steps", 1, "--per-device-train-batch-size", 2])  # fmt: skip
    finally:
        changed.write_bytes(original)  # the module's clean folder reads it too
    assert done.returncode != 0
    assert f"image {stored[0]['sha256']}: the bytes read from {changed}" in done.stderr
