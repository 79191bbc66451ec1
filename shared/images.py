"""Image values from datasets -> encoded bytes -> one decoded RGB image, by a recorded policy.

Both stages decode through `decode_image`, so the pixels stage two trains on are those stage one
scored. The policy is a JSON-able dict kept in the provenance; stage two refuses a folder whose
policy differs (`policy_difference` names the first differing key). Pillow is the decoder.

An image that cannot be used raises `ImageError` with a reason from `IMAGE_DROP_REASONS`; the
caller counts it and drops the row, as with `refdpo.shared.data.RowError`.

The content address of an image is the sha256 of its encoded bytes as the dataset holds them;
`undecoded_rows(dataset, indices)` reads a `datasets` Image column without decoding it to PIL
images, so that the hash is over the original file and not over a re-encoding.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats Pillow may identify an image as. EPS is left out on purpose: Pillow hands it to
# Ghostscript, an outside program, which no dataset image should be able to start.
FORMATS = (
    "AVIF",
    "BMP",
    "DIB",
    "GIF",
    "ICO",
    "JPEG",
    "JPEG2000",
    "MPO",
    "PNG",
    "PPM",
    "QOI",
    "TGA",
    "TIFF",
    "WEBP",
)

DECODE_POLICY: dict[str, Any] = {
    "version": 1,
    "decoder": "Pillow",
    "formats": list(FORMATS),
    "frame": "first",  # animated GIF/WebP/APNG and multi-page TIFF: the first frame
    "exif_orientation": "applied",  # ImageOps.exif_transpose, before anything else
    "alpha": "composited on white",  # RGBA, LA, PA, premultiplied, P/L/RGB with transparency
    "sixteen_bit": "scaled to 8 bits, round(v * 255 / 65535)",  # I;16 modes
    "other_modes": "Pillow convert('RGB')",  # L, 1, CMYK, YCbCr, I, F (I and F clip to 0..255)
    "icc_profile": "ignored",  # as the transformers image processors do
    "output": "RGB",
    "max_pixels": Image.MAX_IMAGE_PIXELS or 89_478_485,  # Pillow's default bomb limit
    "truncated": "refused",  # ImageFile.LOAD_TRUNCATED_IMAGES must stay off
}

IMAGE_DROP_REASONS = {
    "image_null": "the image value is null",
    "image_missing": "an image path that does not exist or is not a file",
    "image_unreadable": "bytes that Pillow cannot identify as an image of an allowed format, "
    "or a file that cannot be read",
    "image_truncated": "an image whose pixel data is truncated or damaged (Pillow fails to load it)",
    "image_empty": "0 bytes, or an image of width or height 0",
    "image_too_large": "more pixels than the policy's max_pixels (a decompression bomb guard)",
    "image_bad_value": "a value that is not an image reference: a wrong type, a dict without "
    "bytes or path, an empty string or a URL",
}

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageError(Exception):
    """An image that is skipped: `reason` is a key of IMAGE_DROP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in IMAGE_DROP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def policy_difference(a: dict, b: dict) -> str | None:
    """The first key (sorted) whose value differs between two decode policies, else None."""
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return key
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------ dataset values


def image_bytes(value: Any, base_dir: Path | None = None) -> tuple[bytes, str | None]:
    """The encoded bytes of one image value and the file they came from (None if inline).

    Accepted: `{"bytes": ..., "path": ...}` (RLAIF-V and an undecoded `datasets` Image; bytes
    win when not None, else the path is read), a path (str or PathLike; a relative one is
    taken from `base_dir`, the dataset file's folder), raw bytes, or a PIL image (re-encoded
    as PNG: prefer `undecoded_rows`, which keeps the original bytes).
    """
    if value is None:
        raise ImageError("image_null")
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ImageError("image_bad_value", f"'bytes' is a {type(data).__name__}")
            return bytes(data), None
        if value.get("path") is None:
            raise ImageError("image_bad_value", "a dict with neither 'bytes' nor 'path'")
        return _read_path(value["path"], base_dir)
    if isinstance(value, (str, os.PathLike)):
        return _read_path(value, base_dir)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, Image.Image):
        return _encode_pil(value), None
    raise ImageError("image_bad_value", f"a {type(value).__name__} is not an image reference")


def _read_path(value: Any, base_dir: Path | None) -> tuple[bytes, str]:
    if not isinstance(value, (str, os.PathLike)):
        raise ImageError("image_bad_value", f"'path' is a {type(value).__name__}")
    text = os.fspath(value)
    if not text.strip():
        raise ImageError("image_bad_value", "an empty path")
    if "://" in text:  # nothing is fetched over a network
        raise ImageError("image_bad_value", f"{text}: a URL, not a local path")
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    path = path.absolute()
    if not path.is_file():
        raise ImageError("image_missing", str(path))
    try:
        return path.read_bytes(), str(path)
    except OSError as err:
        raise ImageError("image_unreadable", f"{path}: {err}") from None


def _encode_pil(image: Image.Image) -> bytes:
    """A PIL image as PNG bytes (lossless; fixed settings, so the same image hashes the same).

    The EXIF orientation is applied first, since PNG does not carry the JPEG's EXIF block;
    modes PNG cannot hold go to RGB as `decode_image` would take them."""
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ImageError("image_truncated", f"a PIL image that fails to load: {err}") from None
    if image.width == 0 or image.height == 0:
        raise ImageError("image_empty", f"a {image.width}x{image.height} PIL image")
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = _to_rgb(image)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6, optimize=False)
    return out.getvalue()


def undecoded_rows(dataset: Any, indices: list[int]) -> list[dict]:
    """Rows `indices` of a `datasets.Dataset` as its Python formatting gives them, except
    that every `datasets.Image` value (also inside lists and dicts) stays the `{"bytes",
    "path"}` dict of its original file instead of a decoded PIL image, so the image's sha256
    is over the file, not a re-encoding. Other features decode as usual (a `Json` column of
    mixed types gives its values back).

    The rows' Arrow table is decoded with the features made `Image(decode=False)`: casting
    the dataset instead would rewrite all of it to the cache when an image column is a list."""
    if not indices:
        return []
    import datasets

    features = datasets.Features({k: _undecode(v) for k, v in dataset.features.items()})
    table = dataset.with_format("arrow")[list(indices)]
    return [features.decode_example(row) for row in table.to_pylist()]


def _undecode(feature: Any) -> Any:
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(mode=feature.mode, decode=False)
    if isinstance(feature, dict):
        return {k: _undecode(v) for k, v in feature.items()}
    if isinstance(feature, list):
        return [_undecode(v) for v in feature]
    if isinstance(feature, datasets.LargeList):
        return datasets.LargeList(_undecode(feature.feature))
    if isinstance(feature, datasets.List):  # what Sequence(...) builds in datasets >= 4
        return datasets.List(_undecode(feature.feature), length=feature.length)
    return feature


# ------------------------------------------------------------------------------- decoding


def _png_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR: Pillow refuses to identify a 0-size PNG, and we
    want to call it empty rather than unreadable."""
    if data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or len(data) < 24:
        return None
    return struct.unpack(">II", data[16:24])


def _open(data: bytes) -> Image.Image:
    """Identify the image (header only) and check its size; no pixel data is decoded."""
    if len(data) == 0:
        raise ImageError("image_empty", "0 bytes")
    size = _png_header_size(data)
    if size is not None and 0 in size:
        raise ImageError("image_empty", f"a {size[0]}x{size[1]} PNG")
    try:
        Image.init()  # every plugin registered; open() fails on a listed name it lacks
        image = Image.open(io.BytesIO(data), formats=[f for f in FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as err:
        raise ImageError("image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error):
        # a damaged header reads as "not an image": Pillow cannot say more
        raise ImageError("image_unreadable", f"not an image ({len(data)} bytes)") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError("image_empty", f"a {width}x{height} {image.format}")
    if width * height > DECODE_POLICY["max_pixels"]:
        raise ImageError(
            "image_too_large",
            f"{width}x{height} is over the policy's {DECODE_POLICY['max_pixels']} pixels",
        )
    return image


def image_format(data: bytes) -> str:
    """Pillow's format name (PNG, JPEG, WEBP ...) from the header, without decoding pixels."""
    return _open(data).format or "unknown"


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as decoded, the EXIF orientation applied, read from the header only."""
    image = _open(data)
    width, height = image.size
    # orientations 5..8 turn the image by 90 degrees: width and height swap
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
        return height, width
    return width, height


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> a fully loaded RGB image by DECODE_POLICY; raises ImageError."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # a global of Pillow's that some code turns on; it would let truncated files through
        # as grey-filled images, and the two stages might not agree on that
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; refdpo's decode "
            "policy refuses truncated images. Leave it off"
        )
    image = _open(data)
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ImageError("image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ImageError("image_truncated", f"{image.format}: {err}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Alpha on white, 16 bits scaled to 8, anything else by Pillow's convert."""
    if image.mode in _SIXTEEN_BIT:
        # Pillow's own I;16 -> RGB clips at 255: most of a 16-bit image would come out white
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8))
    has_alpha = "A" in image.mode or "a" in image.mode or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def dummy_image(size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A fixed RGB gradient (never all zero) for text-only pairs in a vision run: under
    ZeRO-3 every rank must run the vision tower on every micro-step, or the ranks hang."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128.0)], axis=-1)
    return Image.fromarray(np.rint(rgb).astype(np.uint8))
