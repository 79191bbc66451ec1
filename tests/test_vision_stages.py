"""Both stages on vision-language pairs, tiny random VLMs on CPU (tests/vlms.py): stage one's
shards and image store, then stage two from them with a fresh processor (step 0 at ln 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from tests.test_train import run_train
from tests.vlms import (
    build_gemma3,
    build_idefics3,
    build_llava,
    build_llava_next,
    build_paligemma,
    build_paligemma2,
    build_qwen2_vl,
    build_qwen3_vl,
    images,
)

BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "paligemma": build_paligemma,
    "paligemma2": build_paligemma2,  # Gemma2's decoder: `auto` loads it eager
    "qwen2_vl": build_qwen2_vl,
    "qwen3_vl": build_qwen3_vl,
    "idefics3": build_idefics3,
    "gemma3": build_gemma3,
}


def write_dataset(root: Path) -> Path:
    """RLAIF-V's layout: question, chosen, rejected, image (a path beside the file). 12 pairs
    over 4 images (each used three times), a text-only pair, a row whose prompt names two
    images for its one, and a row whose image file is cut short."""
    pictures = images(4, [(40, 50), (30, 30), (56, 28), (33, 44)])
    for k, picture in enumerate(pictures):
        picture.save(root / f"img{k}.png")
    (root / "cut.png").write_bytes((root / "img0.png").read_bytes()[:80])
    rows = [
        {"question": f"What is in picture {k}?", "chosen": f"A fox {k}.",
         "rejected": f"A dog {k} jumps.", "image": f"img{k % 4}.png"}
        for k in range(12)
    ]  # fmt: skip
    rows.append({"question": "No image here", "chosen": "yes", "rejected": "no"})
    rows.append(
        {"question": "<image> and <image>?", "chosen": "a", "rejected": "b", "image": "img1.png"}
    )
    rows.append({"question": "Cut?", "chosen": "a", "rejected": "b", "image": "cut.png"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vision_run(request, tmp_path_factory):
    from refdpo.precompute.run import main as precompute_main

    root = tmp_path_factory.mktemp(f"vision-{request.param}")
    model = BUILDERS[request.param](root / "model")
    dataset = write_dataset(root)
    code = precompute_main([
        "--model", str(model), "--dataset", str(dataset), "--output", str(root / "shards"),
        "--prompt-column", "question", "--rows-per-shard", "5", "--max-length", "256",
        "--max-prompt-length", "128",
    ])  # fmt: skip
    assert code == 0
    return root, model


def test_stage_one_writes_pairs_and_images_once(vision_run):
    root, _ = vision_run
    folder = root / "shards"
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert manifest["dropped"] == {"image_count_mismatch": 1, "image_truncated": 1}
    frame = pd.read_parquet(folder)  # the _images/ store stays out of the pairs
    assert len(frame) == manifest["rows"] == 13
    with_images = frame[frame["image_sha256"].map(len) > 0]
    assert len(with_images) == 12 and (frame["image_sha256"].map(len) == 0).sum() == 1
    # each image stored once, though three pairs use each
    stored = pd.concat(
        pq.read_table(folder / f["file"]).to_pandas() for f in manifest["vision"]["image_files"]
    )
    assert sorted(stored["sha256"]) == sorted(set(with_images["image_sha256"].map(lambda s: s[0])))
    assert manifest["vision"]["images"] == 4
    # prompt ids hold the image tokens the pair records
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(vision_run[1])
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    for _, row in with_images.iterrows():
        assert sum(1 for i in row["prompt_ids"] if i == image_id) == sum(row["image_tokens"])
    test = manifest["vision"]["self_tests"][0]
    assert test["chosen"] == "shared" and test["layouts"]["shared"]["passed"]


def test_stage_two_step0_is_ln2_with_a_fresh_processor(vision_run, tmp_path):
    root, model = vision_run
    done = run_train([
        "--model", model, "--shards", root / "shards", "--output", tmp_path,
        "--max-steps", "2", "--per-device-train-batch-size", "2",
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step-0 check" in done.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = records[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6, first
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert first["grad_norm"] > 0


def test_stage_two_refuses_a_changed_processor_setting_by_name(vision_run, tmp_path):
    root, model = vision_run
    if model.name not in ("llava", "qwen2_vl"):  # one check, the same code for every family
        pytest.skip("the processor fingerprint is checked for LLaVA and Qwen2-VL")
    changed = tmp_path / "model"
    import shutil

    shutil.copytree(model, changed)
    config_file = changed / "preprocessor_config.json"
    if not config_file.exists():
        config_file = changed / "processor_config.json"
    settings = json.loads(config_file.read_text())
    target = settings.get("image_processor", settings)
    target["image_mean"] = [0.1, 0.2, 0.3]
    config_file.write_text(json.dumps(settings))
    done = run_train([
        "--model", changed, "--shards", root / "shards", "--output", tmp_path / "o",
        "--max-steps", "1",
    ])  # fmt: skip
    assert done.returncode != 0
    assert "image_mean" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("family_name", sorted(BUILDERS))
def test_a_dummy_image_runs_the_vision_tower_without_changing_values(family_name, tmp_path):
    """ZeRO-3 needs the vision tower on every micro-batch: a text-only one carries a dummy
    image whose features are weighted out (same values and gradients, the tower called once,
    after the token embeddings as in a batch with images)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from refdpo.shared.images import dummy_image
    from refdpo.shared.logprobs import pack_pairs, pair_logps
    from refdpo.shared.vision import VisionPairScorer, count_vision_passes, family_for
    from refdpo.shared.vision.scoring import DUMMY_PREFIX

    folder = BUILDERS[family_name](tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    family = family_for(model.config)
    scorer = VisionPairScorer(model, family)
    text = [processor.tokenizer(t, add_special_tokens=False).input_ids
            for t in ("What is in the picture?", "A fox.", "A dog jumps.")]  # fmt: skip
    packed = pack_pairs([text[0]], [text[1]], [text[2]], pad_token_id=0)

    def logps_and_grads():
        model.zero_grad()
        logps = pair_logps(scorer, packed).token_logps
        logps.sum().backward()
        decoder = family.decoder(model)
        return logps.detach(), [p.grad.clone() for p in decoder.parameters() if p.grad is not None]

    plain, plain_grads = logps_and_grads()
    processed = family.process_images(processor, [dummy_image()])
    packed.vision = {DUMMY_PREFIX + k: v for k, v in processed.items()}
    order = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: order.append(name))
        for name, module in (("embeddings", model.get_input_embeddings()),
                             ("vision", family.vision_module(model)))
    ]  # fmt: skip
    with count_vision_passes(model, family) as passes:
        with_dummy, dummy_grads = logps_and_grads()
    for hook in hooks:
        hook.remove()
    assert passes.calls == 1
    assert order == ["embeddings", "vision"]  # as the model's own forward on image pairs
    assert torch.equal(plain, with_dummy)
    assert len(plain_grads) == len(dummy_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, dummy_grads, strict=True))
    assert dummy_image().getextrema() != ((0, 0), (0, 0), (0, 0))  # not all zero


def image_schedule(folder: Path, world: int, steps: int) -> list[list[bool]]:
    """Per step, whether each rank's micro-batch (one pair) holds images, as stage two will
    draw them (seed 0)."""
    from refdpo.train.data import PairStream, micro_batches

    manifest = json.loads((folder / "_manifest.json").read_text())
    batches = PairStream(folder, manifest, world, seed=0).batches(0)
    schedule = []
    for _ in range(steps):
        rows = next(batches)
        ranks = [micro_batches(rows, 1, world, rank)[0] for rank in range(world)]
        schedule.append([any(len(r["image_sha256"]) for r in mb) for mb in ranks])
    return schedule


@pytest.mark.multirank
@pytest.mark.parametrize("family_name", ["llava", "qwen2_vl"])  # Idefics3, Gemma3 pass too
def test_zero3_two_ranks_with_text_only_pairs_among_image_pairs(family_name, tmp_path):
    """Under ZeRO-3 every module call is a parameter gather: a rank whose micro-batch has no
    image must still run the vision tower (on a dummy image) or the other rank waits in the
    tower's gathers forever. 10 image pairs and 2 text-only ones on 2 ranks, one pair each
    per step: a step where one rank has images and the other none must finish, and step 0
    holds (ln 2) under ZeRO-3."""
    from refdpo.precompute.run import main as precompute_main

    model = BUILDERS[family_name](tmp_path / "model")
    pictures = images(3, [(40, 50), (30, 30), (56, 28)])
    for k, picture in enumerate(pictures):
        picture.save(tmp_path / f"img{k}.png")
    rows = [
        {"question": f"Picture {k}?", "chosen": f"A fox {k}.", "rejected": f"A dog {k}.",
         "image": f"img{k % 3}.png"}
        for k in range(10)
    ] + [{"question": f"Text {k}", "chosen": "yes", "rejected": "no"} for k in range(2)]  # fmt: skip
    dataset = tmp_path / "pairs.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = tmp_path / "shards"
    assert precompute_main([
        "--model", str(model), "--dataset", str(dataset), "--output", str(shards),
        "--prompt-column", "question",
    ]) == 0  # fmt: skip
    schedule = image_schedule(shards, world=2, steps=6)
    assert any(a != b for a, b in schedule), schedule  # the case the test is for does occur
    output = tmp_path / "run"
    done = run_train([
        "--model", model, "--shards", shards, "--output", output, "--max-steps", "6",
        "--per-device-train-batch-size", "1", "--zero-stage", "3", "--export", "none",
        "--dist-timeout", "120",
    ], ranks=2, port=29683)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6, train[0]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)


def test_trl_vision_layout_saved_with_datasets_image_features(tmp_path):
    """TRL's vision layout as HuggingFaceH4/rlaif-v_formatted holds it: `images` a list of
    `datasets.Image`, `prompt` user messages with {"type": "image"} parts, `chosen` and
    `rejected` assistant messages; saved with save_to_disk. Stage one stores each image as
    its file's bytes (the sha256 of the JPEG file, not of a PIL re-encoding), a row with two
    images keeps both in order, and stage two starts at ln 2."""
    import hashlib

    import datasets

    model = build_qwen2_vl(tmp_path / "model")
    files = []
    for k, picture in enumerate(images(3, [(40, 50), (30, 30), (56, 28)])):
        files.append(tmp_path / f"img{k}.jpg")
        picture.save(files[-1], quality=85)

    def turn(role: str, text: str, pictures: int = 0) -> list[dict]:
        parts = [{"type": "image", "text": None}] * pictures + [{"type": "text", "text": text}]
        return [{"role": role, "content": parts}]

    rows = [
        {"prompt": turn("user", f"What is in picture {k}?", 1),
         "chosen": turn("assistant", f"A fox {k}."),
         "rejected": turn("assistant", f"A dog {k} jumps."),
         "images": [str(files[k % 3])]}
        for k in range(6)
    ] + [{"prompt": turn("user", "Which is larger?", 2), "chosen": turn("assistant", "The first."),
          "rejected": turn("assistant", "Both."), "images": [str(files[2]), str(files[0])]}]  # fmt: skip
    message = datasets.List(
        {"role": datasets.Value("string"),
         "content": datasets.List({"type": datasets.Value("string"),
                                   "text": datasets.Value("string")})}
    )  # fmt: skip
    features = datasets.Features(
        {"prompt": message, "chosen": message, "rejected": message,
         "images": datasets.List(datasets.Image())}
    )  # fmt: skip
    saved = tmp_path / "rlaif-v-formatted"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(saved))

    from refdpo.precompute.run import main as precompute_main

    shards = tmp_path / "shards"
    assert precompute_main(["--model", str(model), "--dataset", str(saved), "--output",
                            str(shards), "--image-column", "images"]) == 0  # fmt: skip
    frame = pd.read_parquet(shards)
    assert len(frame) == 7
    file_sha = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    two = frame[frame["image_sha256"].map(len) == 2].iloc[0]
    assert list(two["image_sha256"]) == [file_sha[2], file_sha[0]]
    assert set(frame["image_sha256"].explode()) == set(file_sha)
    done = run_train(["--model", model, "--shards", shards, "--output", tmp_path / "run",
                      "--max-steps", "1", "--per-device-train-batch-size", "2"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - math.log(2)) < 1e-6, first


def test_each_pairs_images_are_processed_once_in_each_stage(vision_run):
    """The image processor is the costly part of reading a vision pair on the CPU (several ms
    per image at real sizes). Stage one's tokenization calls the processor for the prompt and
    both joined texts: the images are processed once (before: 6 times). Stage two processes
    each pair's images once, checks them and joins them into the batch (before: twice)."""
    from transformers import AutoConfig, AutoProcessor

    from refdpo.shared.data import RowFormat, normalize_row
    from refdpo.shared.tokens import Truncation
    from refdpo.shared.vision import family_for
    from refdpo.shared.vision_pairs import VisionContext, tokenize_vision_pair
    from refdpo.train.vision import VisionInputs

    root, model = vision_run
    processor = AutoProcessor.from_pretrained(model)
    family = family_for(AutoConfig.from_pretrained(model))
    calls = []
    preprocess = processor.image_processor.preprocess
    processor.image_processor.preprocess = lambda *a, **k: calls.append(1) or preprocess(*a, **k)

    ctx = VisionContext(processor, family, root)
    fmt = RowFormat(prompt_column="question", vision=True)
    row = {"question": "<image> and <image>?", "chosen": "A fox.", "rejected": "A dog.",
           "image": ["img0.png", "img2.png"]}  # fmt: skip
    pair = normalize_row(row, fmt)
    tokenized = tokenize_vision_pair(pair, processor.tokenizer, Truncation(256, 128), None, ctx)
    assert len(tokenized.images) == 2 and len(calls) == 1

    folder = root / "shards"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rows = stored_rows(folder, manifest)
    with_images = [r for r in rows if len(r["image_sha256"])][:4]
    calls.clear()
    vision = VisionInputs(folder, manifest, processor, family)(with_images)
    assert len(calls) == len(with_images)
    whole = family.process_images(
        processor,
        [vision_image for r in with_images for vision_image in vision_images(folder, manifest, r)],
    )
    assert vision.keys() == whole.keys()
    assert all(torch.equal(vision[k], whole[k]) for k in whole)  # joined = processed together


def vision_images(folder: Path, manifest: dict, row: dict) -> list:
    from refdpo.shared.image_store import ImageStore
    from refdpo.shared.images import decode_image

    store = ImageStore(folder, manifest["vision"]["image_files"])
    return [decode_image(store.get(sha)) for sha in row["image_sha256"]]


def test_stage_two_checks_the_pixels_stage_one_hashed(vision_run):
    """Stage two's processing of the stored images gives stage one's pixels: each shard's
    first pair with images is hashed in stage one and checked in stage two. A processor that
    computes other pixels with the same token counts (here another rescale factor, slipped
    past the fingerprint check) is refused on the first hashed pair."""
    from transformers import AutoConfig, AutoProcessor

    from refdpo.shared.shards import ShardError
    from refdpo.shared.vision import family_for
    from refdpo.train.vision import VisionInputs

    root, model = vision_run
    folder = root / "shards"
    manifest = json.loads((folder / "_manifest.json").read_text())
    rows = stored_rows(folder, manifest)
    family = family_for(AutoConfig.from_pretrained(model))
    processor = AutoProcessor.from_pretrained(model)
    inputs = VisionInputs(folder, manifest, processor, family)
    for row in rows:
        inputs([row])
    hashed = sum(1 for shard in manifest["shards"] if shard["rows"])  # 3 shards, each has one
    assert inputs.checked_pixels == hashed > 0
    processor.image_processor.rescale_factor *= 1.01
    with pytest.raises(ShardError, match="processed pixels differ"):
        changed = VisionInputs(folder, manifest, processor, family)
        for row in rows:
            changed([row])


def stored_rows(folder: Path, manifest: dict) -> list[dict]:
    """Every pair as stage two reads it (lists, not numpy arrays), in shard order."""
    return [r for s in manifest["shards"] for r in pq.read_table(folder / s["file"]).to_pylist()]
