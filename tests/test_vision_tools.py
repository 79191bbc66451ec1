"""`refdpo inspect` and `refdpo eval` on a vision folder: one stage-one run of a tiny random
LLaVA (tests/vlms.py) over the RLAIF-V-style rows of tests/test_vision_stages.py (12 pairs
over 4 images, one text-only pair), shared by every test here. Expected numbers are derived
from the written data and images, not from the code under test."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from refdpo.precompute.inspect import main as inspect_main
from refdpo.precompute.inspect import validate
from refdpo.shared.image_store import StoredImage, write_images
from refdpo.shared.shards import MANIFEST, ShardError, sha256_file
from tests.test_vision_stages import write_dataset
from tests.vlms import build_llava


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(dataset root, model folder, shard folder) of one vision stage-one run."""
    from refdpo.precompute.run import main as precompute_main

    root = tmp_path_factory.mktemp("vision-tools")
    model = build_llava(root / "model")
    dataset = write_dataset(root)
    code = precompute_main([
        "--model", str(model), "--dataset", str(dataset), "--output", str(root / "shards"),
        "--prompt-column", "question", "--rows-per-shard", "5", "--max-length", "256",
        "--max-prompt-length", "128",
    ])  # fmt: skip
    assert code == 0
    return root, model, root / "shards"


def copied(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def image_token_id(model: Path) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return getattr(config, "image_token_id", None) or config.image_token_index


def test_inspect_passes_and_counts_the_images(stage_one, capsys):
    root, model, folder = stage_one
    pairs = pd.read_parquet(folder)
    refs = pairs["image_sha256"].map(len)
    # what the data says: rows 0-11 use img{k % 4}.png, the text-only row none
    assert (refs == 1).sum() == 12 and (refs == 0).sum() == 1
    hashes = {s for shas in pairs["image_sha256"] for s in shas}
    assert len(hashes) == 4 and refs.sum() == 12
    # each image's tokens, counted in prompt_ids by the model's image token id
    token_id = image_token_id(model)
    in_prompt = pairs["prompt_ids"].map(lambda ids: sum(1 for i in ids if i == token_id))
    per_image = in_prompt[refs == 1]
    assert per_image.nunique() == 1  # LLaVA: the same count for every image

    _, summary = validate(folder)
    v = summary["vision"]
    assert v["pairs_with_images"] == 12 and v["text_only_pairs"] == 1
    assert v["images_stored"] == 4 and v["image_references"] == 12 and v["reuse"] == 3.0
    assert v["images_per_pair"] == {"p50": 1, "p90": 1, "p99": 1, "max": 1}
    assert v["image_tokens_per_pair"]["max"] == v["image_tokens_per_pair"]["p50"]
    assert v["image_tokens_per_pair"]["max"] == int(per_image.iloc[0])
    sizes = [Image.open(root / f"img{k}.png").size for k in range(4)]
    assert sorted(w for w, _ in sizes) == [30, 33, 40, 56]
    assert v["width"] == {"p50": 36, "p90": 51, "p99": 55, "max": 56}  # by hand: 36.5, 51.2, 55.52
    assert v["height"]["max"] == max(h for _, h in sizes)
    assert (v["family"], v["processor"], v["image_store"]) == ("llava", "LlavaProcessor", "bytes")
    (test,) = v["self_tests"]
    assert test["chosen"] == "shared" and 0 <= test["difference"] <= test["tolerance"] == 1e-4

    capsys.readouterr()
    assert inspect_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert "12 pairs with images, 1 text-only; 4 stored, 12 references (reuse 3.00x)" in text
    assert "store mode bytes" in text and "family llava, processor LlavaProcessor" in text
    assert "layout self-test: shared chosen" in text
    assert inspect_main([str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vision"] == v


def test_inspect_names_a_damaged_image_file(stage_one, tmp_path, capsys):
    _, _, clean = stage_one
    folder = copied(clean, tmp_path / "shards")
    (entry,) = json.loads((folder / MANIFEST).read_text())["vision"]["image_files"]
    target = folder / entry["file"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    capsys.readouterr()
    assert inspect_main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert "_images/part-00000-00000.parquet" in err and "sha256" in err, err


def test_inspect_names_a_pair_whose_image_is_not_stored(stage_one, tmp_path, capsys):
    """The image store lost an image (its file rewritten without it, checksums redone): the
    first pair, in shard order, that names it is reported."""
    _, _, clean = stage_one
    folder = copied(clean, tmp_path / "shards")
    manifest = json.loads((folder / MANIFEST).read_text())
    entry = manifest["vision"]["image_files"][0]
    rows = pq.read_table(folder / entry["file"]).to_pylist()
    lost, kept = rows[0], rows[1:]
    entry["sha256"] = write_images(
        folder / entry["file"],
        [StoredImage(r["sha256"], r["bytes"], r["width"], r["height"], r["format"]) for r in kept],
    )
    entry["images"] = len(kept)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    first = next(
        pair["id"]
        for shard in manifest["shards"]
        for pair in pq.read_table(folder / shard["file"]).to_pylist()
        if lost["sha256"] in pair["image_sha256"]
    )
    capsys.readouterr()
    assert inspect_main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"pair {first} refers to image {lost['sha256']}" in err, err


@pytest.mark.parametrize("damage", ["tokens_list_short", "tokens_exceed_prompt"])
def test_inspect_names_a_pair_whose_image_columns_disagree(stage_one, tmp_path, capsys, damage):
    """A shard rewritten (metadata kept, checksum redone) with one pair's image_tokens one
    entry short, or counting more image tokens than its prompt holds."""
    import pyarrow as pa

    _, _, clean = stage_one
    folder = copied(clean, tmp_path / "shards")
    manifest = json.loads((folder / MANIFEST).read_text())
    path = folder / manifest["shards"][0]["file"]
    table = pq.read_table(path)
    tokens = table["image_tokens"].to_pylist()
    row = 1
    if damage == "tokens_list_short":
        tokens[row] = []
        want = "has 1 image_sha256 but 0 image_tokens"
    else:
        tokens[row] = [len(table["prompt_ids"][row]) + 1]
        want = f"has {tokens[row][0]} image tokens in a prompt of {tokens[row][0] - 1}"
    index = table.schema.get_field_index("image_tokens")
    column = pa.array(tokens, type=table.schema.field(index).type)
    pq.write_table(table.set_column(index, table.schema.field(index), column), path)
    manifest["shards"][0]["sha256"] = sha256_file(path)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert inspect_main([str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{path.name}: pair {table['id'][row]} {want}" in err, err


def test_eval_pairwise_with_the_reference_is_the_step0_identity(stage_one, tmp_path):
    """The reference model against its own stored values, its images rebuilt from the store:
    every reward is 0 (margin within float noise), all ties, loss ln 2, every pair counted."""
    from refdpo.train.evaluate import main as eval_main

    _, model, folder = stage_one
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (
        eval_main(["--model", str(model), "--shards", str(folder), "--output", str(tmp_path)]) == 0
    )
    result = json.loads((tmp_path / "summary.json").read_text())["pairwise"]
    assert result["pairs"] == manifest["rows"] == 13
    assert abs(result["reward_margin"]) < 1e-4
    assert result["reward_accuracy"] == 0.5
    assert result["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_eval_pairwise_runs_the_vision_tower_on_the_stored_images(stage_one):
    """Batches never cross a shard (5, 5 and 3 pairs here, each shard under the batch size of
    8): one tower pass per shard that holds a pair with images."""
    from refdpo.shared.models import load_model, load_processor
    from refdpo.shared.vision import count_vision_passes, family_for
    from refdpo.train.evaluate import pairwise

    _, model_dir, folder = stage_one
    manifest = json.loads((folder / MANIFEST).read_text())
    with_images = sum(
        any(pq.read_table(folder / s["file"])["image_sha256"].to_pylist())
        for s in manifest["shards"]
    )
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 3] and with_images == 3
    processor = load_processor(str(model_dir))
    model = load_model(str(model_dir), None, "fp32", "auto", None, vision=True).eval()
    with count_vision_passes(model, family_for(model.config)) as passes:
        result = pairwise(model, processor.tokenizer, folder, 0.1, 8, processor)
    assert passes.calls == with_images and result["pairs"] == 13


def test_eval_refuses_another_processor_by_setting(stage_one, tmp_path):
    from refdpo.shared.models import load_processor
    from refdpo.train.evaluate import preflight

    _, model, folder = stage_one
    changed = copied(model, tmp_path / "model")
    config_file = changed / "preprocessor_config.json"
    if not config_file.exists():
        config_file = changed / "processor_config.json"
    settings = json.loads(config_file.read_text())
    settings.get("image_processor", settings)["image_mean"] = [0.1, 0.2, 0.3]
    config_file.write_text(json.dumps(settings))
    processor = load_processor(str(changed))
    with pytest.raises(ShardError, match="image_mean"):
        preflight(str(changed), str(folder), processor.tokenizer, processor)


def test_eval_generates_for_prompts_with_images(stage_one, tmp_path):
    """Rows with an `image` path (relative to the prompts file), an `images` list in chat
    form, and none; the vision tower runs for the batch that has images."""
    from refdpo.shared.models import load_model, load_processor
    from refdpo.shared.vision import count_vision_passes, family_for
    from refdpo.train.evaluate import generate, read_prompts

    root, model_dir, _ = stage_one
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    rows = [
        {"prompt": "What is in the picture?", "image": "img0.png"},
        {"prompt": "No image here", "answer": "yes"},
        {"prompt": chat, "images": ["img1.png"]},
    ]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = load_processor(str(model_dir))
    model = load_model(str(model_dir), None, "fp32", "auto", None, vision=True).eval()
    with count_vision_passes(model, family_for(model.config)) as passes:
        out = generate(
            model, processor.tokenizer, read_prompts(prompts), 3, 8, processor, prompts.parent
        )
    assert passes.calls >= 1
    assert [o["prompt"] for o in out] == [r["prompt"] for r in rows]
    assert all(isinstance(o["generation"], str) for o in out) and "correct" in out[1]
