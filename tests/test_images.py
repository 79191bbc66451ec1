"""Image values, the decode policy and the content-addressed image store (shared/images.py,
shared/image_store.py). Every bad image is a real file Pillow writes or a header built by
hand; expected pixels are derived by hand, not from the code under test."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from refdpo.shared import image_store
from refdpo.shared.image_store import (
    IMAGE_SCHEMA,
    IMAGES_DIR,
    ImageStore,
    StoredImage,
    images_file,
    images_frame,
    write_images,
)
from refdpo.shared.images import (
    DECODE_POLICY,
    IMAGE_DROP_REASONS,
    ImageError,
    decode_image,
    dummy_image,
    image_bytes,
    image_format,
    image_size,
    policy_difference,
    sha256_bytes,
    undecoded_rows,
)
from refdpo.shared.shards import MANIFEST, ShardError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Random RGB content: does not compress, so its bytes appear as they are in a file."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def two_blocks(block: int = 16) -> Image.Image:
    """Left half red, right half blue: (2 * block) wide, block tall."""
    image = Image.new("RGB", (2 * block, block), RED)
    image.paste(BLUE, (block, 0, 2 * block, block))
    return image


def png_header(width: int, height: int) -> bytes:
    """A PNG of signature, IHDR (8-bit RGB) and an empty IDAT: Pillow reads the size from it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def reason(value, base_dir: Path | None = None) -> str:
    with pytest.raises(ImageError) as info:
        decode_image(image_bytes(value, base_dir)[0])
    assert info.value.reason in IMAGE_DROP_REASONS
    return info.value.reason


# ------------------------------------------------------------------- image_bytes, every form


def test_every_value_form_gives_the_file_bytes(tmp_path: Path) -> None:
    data = encode(noise((9, 7), 0))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(data)
    absolute = str(tmp_path / "sub" / "a.png")
    assert image_bytes({"bytes": data, "path": "elsewhere/a.png"}, None) == (data, None)
    assert image_bytes({"bytes": None, "path": "sub/a.png"}, tmp_path) == (data, absolute)
    assert image_bytes({"path": absolute}, None) == (data, absolute)
    assert image_bytes("sub/a.png", tmp_path) == (data, absolute)
    assert image_bytes(absolute, None) == (data, absolute)
    assert image_bytes(Path(absolute), Path("/nowhere")) == (data, absolute)
    assert image_bytes(data) == (data, None)
    assert image_bytes(bytearray(data)) == (data, None)
    assert image_bytes(memoryview(data)) == (data, None)


def test_pil_image_is_reencoded_losslessly_and_stably() -> None:
    original = noise((11, 5), 1)
    first, path = image_bytes(original)
    assert path is None and image_format(first) == "PNG"
    assert np.array_equal(pixels(decode_image(first)), pixels(original))
    assert image_bytes(noise((11, 5), 1))[0] == first  # the same image hashes the same


def test_pil_image_keeps_its_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    opened = Image.open(io.BytesIO(encode(two_blocks(), "JPEG", quality=95, exif=exif.tobytes())))
    data, _ = image_bytes(opened)  # a lazily opened JPEG, as `datasets` decodes it
    assert image_size(data) == (16, 32)


def test_undecoded_rows_of_datasets_image_columns_hash_the_original_files(tmp_path: Path) -> None:
    import datasets

    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for i, path in enumerate(files):
        path.write_bytes(encode(noise((8 + i, 8), i), "JPEG", quality=80))
    inline = encode(noise((5, 5), 9))
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "images": datasets.List(datasets.Image()),
            "meta": {"thumb": datasets.Image()},
            "question": datasets.Value("string"),
        }
    )
    rows = {
        "image": [str(files[0]), {"bytes": inline, "path": None}],
        "images": [[str(files[1]), str(files[2])], [str(files[0])]],
        "meta": [{"thumb": str(files[2])}, {"thumb": str(files[1])}],
        "question": ["a", "b"],
    }
    dataset = datasets.Dataset.from_dict(rows, features=features)
    assert isinstance(dataset[0]["image"], Image.Image)  # what a plain read gives
    second, first = undecoded_rows(dataset, [1, 0])  # in the order asked for
    assert undecoded_rows(dataset, []) == []
    assert first["question"] == "a" and second["question"] == "b"
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert sha256_bytes(image_bytes(first["image"])[0]) == sha[0]
    assert image_bytes(first["image"])[1] == str(files[0])
    assert image_bytes(second["image"]) == (inline, None)
    assert [sha256_bytes(image_bytes(v)[0]) for v in first["images"]] == sha[1:]
    assert [sha256_bytes(image_bytes(v)[0]) for v in second["images"]] == sha[:1]
    assert sha256_bytes(image_bytes(first["meta"]["thumb"])[0]) == sha[2]
    # a decoded PIL image of a JPEG does not hash like the file: why `undecoded_rows` exists
    assert sha256_bytes(image_bytes(dataset[0]["image"])[0]) != sha[0]


# -------------------------------------------------------------------------- error reasons


def test_each_drop_reason_from_a_real_bad_file(tmp_path: Path) -> None:
    jpeg = encode(noise((64, 64), 2), "JPEG", quality=90)
    png = encode(noise((64, 64), 3))
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(4).bytes(2000))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "zero.png").write_bytes(png_header(0, 5))
    (tmp_path / "folder.png").mkdir()
    assert reason("cut.jpg", tmp_path) == "image_truncated"
    assert reason("cut.png", tmp_path) == "image_truncated"
    assert reason("random.bin", tmp_path) == "image_unreadable"
    assert reason("empty.png", tmp_path) == "image_empty"
    assert reason("zero.png", tmp_path) == "image_empty"
    assert reason("absent.png", tmp_path) == "image_missing"
    assert reason("folder.png", tmp_path) == "image_missing"
    assert reason({"bytes": None, "path": "absent.png"}, tmp_path) == "image_missing"
    for value in ({}, {"bytes": None, "path": None}, {"bytes": 3}, {"path": 3}, 7, "", "  "):
        assert reason(value) == "image_bad_value", value
    assert reason("https://example.com/a.png") == "image_bad_value"
    assert reason(None) == "image_null"


def test_pillow_refuses_zero_size_images_itself() -> None:
    # why the 0-size case is a hand-made header: Pillow neither writes nor identifies one
    with pytest.raises(ValueError):
        encode(Image.new("RGB", (0, 0)))
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(png_header(5, 0)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_too_large() -> None:
    # 100 Mpx: over the policy's limit, under Pillow's error threshold (which only warns)
    assert DECODE_POLICY["max_pixels"] < 10_000 * 10_000
    for side in (10_000, 20_000):  # 20_000: Pillow raises DecompressionBombError itself
        with pytest.raises(ImageError) as info:
            decode_image(png_header(side, side))
        assert info.value.reason == "image_too_large"


def test_truncated_images_stay_refused_when_pillow_is_told_to_load_them(monkeypatch) -> None:
    jpeg = encode(noise((64, 64), 5), "JPEG")
    cut = jpeg[: len(jpeg) // 2]
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    Image.open(io.BytesIO(cut)).load()  # the guard matters: Pillow alone would accept it
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(cut)


# ------------------------------------------------------------------------------ the policy


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(two_blocks(), "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(data)
    assert image.size == (16, 32) == image_size(data)
    # turned clockwise, the left (red) half becomes the top, the right (blue) the bottom
    top, bottom = pixels(image)[8, 8], pixels(image)[24, 8]
    assert np.abs(top - RED).max() < 12 and np.abs(bottom - BLUE).max() < 12


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # transparent: white
    rgba.putpixel((2, 0), (0, 0, 0, 102))  # 40% black over white: 255 * 0.6 = 153
    got = pixels(decode_image(encode(rgba)))
    assert got.tolist() == [[[10, 20, 30], [255, 255, 255], [153, 153, 153]]]
    la = Image.new("LA", (2, 1), (0, 255))
    la.putpixel((0, 0), (0, 0))
    assert pixels(decode_image(encode(la))).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_palette_and_colour_key_transparency_become_white() -> None:
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 200, 0, 0])
    palette.putpixel((1, 0), 1)
    data = encode(palette, transparency=0)  # palette entry 0 (black) is transparent
    assert pixels(decode_image(data)).tolist() == [[[255, 255, 255], [200, 0, 0]]]
    gif = encode(palette, "GIF", transparency=0)
    assert pixels(decode_image(gif)).tolist() == [[[255, 255, 255], [200, 0, 0]]]
    keyed = Image.new("RGB", (2, 1), (5, 6, 7))
    keyed.putpixel((1, 0), (9, 9, 9))
    got = pixels(decode_image(encode(keyed, transparency=(5, 6, 7))))  # a tRNS colour key
    assert got.tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_other_modes_become_rgb() -> None:
    grey = Image.new("L", (2, 1), 40)
    grey.putpixel((1, 0), 200)
    assert pixels(decode_image(encode(grey))).tolist() == [[[40] * 3, [200] * 3]]
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))  # full cyan: no red
    cmyk.putpixel((2, 0), (0, 0, 0, 255))  # full black
    got = pixels(decode_image(encode(cmyk, "TIFF")))
    assert got.tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
    deep = Image.frombytes("I;16", (3, 1), np.array([0, 32768, 65535], "<u2").tobytes())
    data = encode(deep)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert pixels(decode_image(data))[0, :, 0].tolist() == [0, 128, 255]
    # Pillow alone clips: the mid grey would come out white
    assert pixels(Image.open(io.BytesIO(data)).convert("RGB"))[0, 1, 0] == 255


def test_decoding_is_deterministic_and_fully_loaded() -> None:
    data = encode(noise((20, 12), 6), "WEBP", quality=70)
    first, second = decode_image(data), decode_image(data)
    assert first.mode == "RGB" and image_format(data) == "WEBP"
    assert np.array_equal(pixels(first), pixels(second))
    assert image_size(data) == first.size == (20, 12)


def test_dummy_image_is_fixed_and_not_blank() -> None:
    image = dummy_image((32, 24))
    assert image.mode == "RGB" and image.size == (32, 24)
    values = pixels(image)
    assert values.any() and len(np.unique(values.reshape(-1, 3), axis=0)) > 100
    assert np.array_equal(values, pixels(dummy_image((32, 24))))


def test_policy_difference_names_the_first_changed_key() -> None:
    same = json.loads(json.dumps(DECODE_POLICY))  # it is JSON-able and survives a round trip
    assert policy_difference(DECODE_POLICY, same) is None
    changed = {**same, "alpha": "composited on black", "version": 2}
    assert policy_difference(DECODE_POLICY, changed) == "alpha"
    fewer = {k: v for k, v in same.items() if k != "max_pixels"}
    assert policy_difference(fewer, DECODE_POLICY) == "max_pixels"


# ---------------------------------------------------------------------------- image store


def stored(image: Image.Image, fmt: str = "PNG") -> StoredImage:
    data = encode(image, fmt)
    return StoredImage(sha256_bytes(data), data, image.width, image.height, fmt, None)


def open_store(folder: Path, names: list[str], verify: bool = True) -> ImageStore:
    entries = [
        {"file": n, "sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest()} for n in names
    ]
    return ImageStore(folder, entries, verify=verify)


def test_store_round_trip_in_small_row_groups(tmp_path: Path) -> None:
    images = [stored(noise((6 + i % 5, 4), i)) for i in range(40)]
    name = images_file(0, 3)
    checksum = write_images(tmp_path / name, images)
    assert checksum == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert pq.ParquetFile(tmp_path / name).num_row_groups == 3  # 16 + 16 + 8
    store = ImageStore.from_manifest(tmp_path, {"images": [{"file": name, "sha256": checksum}]})
    assert len(store) == 40 and images[7].sha256 in store and "0" * 64 not in store
    for image in images:
        assert store.get(image.sha256) == image.data
    with pytest.raises(ShardError, match=r"0{64} is not in the image store"):
        store.get("0" * 64)
    store.close()


def test_store_refuses_duplicates_and_wrong_hashes_when_writing(tmp_path: Path) -> None:
    image = stored(noise((4, 4), 0))
    with pytest.raises(ValueError, match="twice"):
        write_images(tmp_path / "a.parquet", [image, image])
    wrong = StoredImage("ab" * 32, image.data, 4, 4, "PNG")
    with pytest.raises(ValueError, match="another sha256"):
        write_images(tmp_path / "a.parquet", [wrong])
    assert not (tmp_path / "a.parquet").exists()


def test_flipped_byte_in_a_stored_image(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(image_store, "ROW_GROUP_IMAGES", 1)  # one image per row group
    images = [stored(noise((40, 40), i)) for i in range(3)]
    name = images_file(1, 0)
    write_images(tmp_path / name, images)
    checksum = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    raw = bytearray((tmp_path / name).read_bytes())
    start = raw.find(images[1].data)  # noise does not compress: zstd stores it as it is
    assert start > 0
    raw[start + len(images[1].data) // 2] ^= 0x01
    (tmp_path / name).write_bytes(bytes(raw))
    entry = [{"file": name, "sha256": checksum}]
    with pytest.raises(ShardError, match="sha256 differs from the manifest"):
        ImageStore(tmp_path, entry)
    store = ImageStore(tmp_path, entry, verify=False)  # past the file checksum: the page CRC
    assert store.get(images[0].sha256) == images[0].data  # its own row group is intact
    # the page CRC catches it before the per-image re-hash would
    with pytest.raises(ShardError, match=f"image {images[1].sha256}: .* is damaged"):
        store.get(images[1].sha256)


def test_an_image_whose_bytes_do_not_hash_to_its_name(tmp_path: Path) -> None:
    # a hand-edited file (valid Parquet, checksum redone): only the per-image re-hash sees it
    good, other = stored(noise((5, 5), 0)), stored(noise((5, 5), 1))
    name = f"{IMAGES_DIR}/part-00000-00000.parquet"
    (tmp_path / IMAGES_DIR).mkdir()
    row = {"sha256": [good.sha256], "bytes": [other.data], "width": [5], "height": [5]}
    table = pa.Table.from_pydict({**row, "format": ["PNG"], "path": [None]}, schema=IMAGE_SCHEMA)
    pq.write_table(table, tmp_path / name)
    with pytest.raises(ShardError, match=f"image {good.sha256}: the bytes read from"):
        open_store(tmp_path, [name]).get(good.sha256)


def test_path_mode_rehashes_the_file(tmp_path: Path) -> None:
    source = tmp_path / "corpus" / "a.png"
    source.parent.mkdir()
    source.write_bytes(encode(noise((7, 7), 0)))
    sha = sha256_bytes(source.read_bytes())
    name = images_file(0, 0)
    write_images(tmp_path / "out" / name, [StoredImage(sha, None, 7, 7, "PNG", str(source))])
    store = open_store(tmp_path / "out", [name])
    assert store.get(sha) == source.read_bytes()
    source.write_bytes(encode(noise((7, 7), 1)))  # changed after stage one
    with pytest.raises(ShardError, match=re.escape(f"image {sha}: the bytes read from {source}")):
        store.get(sha)
    source.unlink()
    with pytest.raises(ShardError, match=f"image {sha}"):
        store.get(sha)
    with pytest.raises(ValueError, match="absolute path"):
        write_images(tmp_path / "x.parquet", [StoredImage(sha, None, 7, 7, "PNG", "a.png")])


def test_store_refuses_missing_and_stray_files(tmp_path: Path) -> None:
    write_images(tmp_path / images_file(0, 0), [stored(noise((4, 4), 0))])
    write_images(tmp_path / images_file(0, 1), [stored(noise((4, 4), 1))])
    with pytest.raises(
        ShardError, match=re.escape("part-00000-00001.parquet: an image file not in")
    ):
        open_store(tmp_path, [images_file(0, 0)])
    entries = [{"file": images_file(0, 2), "sha256": "0" * 64}]
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        ImageStore(tmp_path, entries)


def test_store_reads_from_threads_with_a_bounded_cache(tmp_path: Path) -> None:
    images = [stored(noise((32, 32), i)) for i in range(64)]
    write_images(tmp_path / images_file(0, 0), images)
    store = open_store(tmp_path, [images_file(0, 0)])
    store.cache_bytes = 1  # at most one row group kept
    failures: list[BaseException] = []

    def read(offset: int) -> None:
        try:
            for i in range(64):
                image = images[(i * 7 + offset) % 64]
                assert store.get(image.sha256) == image.data
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(store._cache) == 1


def test_pandas_reads_one_row_per_pair_beside_the_image_store(tmp_path: Path) -> None:
    images = [stored(noise((4 + i, 4), i)) for i in range(3)]
    pairs = [
        {"id": "p0", "image_sha256": [images[0].sha256, images[1].sha256]},
        {"id": "p1", "image_sha256": [images[1].sha256]},
        {"id": "p2", "image_sha256": []},  # a text-only pair
        {"id": "p3", "image_sha256": [images[2].sha256]},
    ]
    for sequence, chunk in enumerate((pairs[:2], pairs[2:])):
        pq.write_table(pa.Table.from_pylist(chunk), tmp_path / f"part-00000-{sequence:05d}.parquet")
        write_images(tmp_path / images_file(0, sequence), images[sequence * 2 : sequence * 2 + 2])
    (tmp_path / MANIFEST).write_text(json.dumps({"schema_version": 1}))
    frame = pd.read_parquet(tmp_path)
    assert sorted(frame["id"]) == ["p0", "p1", "p2", "p3"]
    assert list(frame.columns) == ["id", "image_sha256"]
    # the join recipe of the module docstring
    rows = frame.explode("image_sha256").merge(
        images_frame(tmp_path), left_on="image_sha256", right_on="sha256", how="left"
    )
    assert len(rows) == 5
    data = {i.sha256: i.data for i in images}
    with_images = rows[rows["id"] != "p2"]
    assert [data[s] for s in with_images["image_sha256"]] == list(with_images["bytes"])
    assert rows.loc[rows["id"] == "p2", "bytes"].isna().all()


def test_an_image_folder_without_the_underscore_breaks_pandas(tmp_path: Path) -> None:
    # the guard shown to matter: pyarrow's discovery does read a folder named `images/`
    pq.write_table(pa.Table.from_pylist([{"id": "p0"}]), tmp_path / "part-00000-00000.parquet")
    write_images(tmp_path / "images" / "part-00000-00000.parquet", [stored(noise((4, 4), 0))])
    frame = pd.read_parquet(tmp_path)
    assert len(frame) == 2  # the image came back as a second "pair"
