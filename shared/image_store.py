"""The content-addressed image store of a vision shard folder: each image stored once.

Pairs name their images by sha256 (the `image_sha256` list column, in prompt order); the
images themselves are rows of `_images/part-RRRRR-SSSSS.parquet` inside the shard folder,
one file per data shard that owns images, listed in the manifest with their checksums:

    sha256 string | bytes binary (null in path mode) | width int32 | height int32
    format string | path string (the source file; null for inline images)

The folder name starts with `_` because pyarrow's dataset discovery (`pandas.read_parquet`)
skips such names, so `pandas.read_parquet(folder)` still gives one row per pair. To join
pairs to their images with pandas:

    import pandas as pd
    from refdpo.shared.image_store import images_frame

    pairs = pd.read_parquet(folder)                    # one row per pair
    images = images_frame(folder)                      # one row per distinct image
    rows = pairs.explode("image_sha256")               # one row per (pair, image)
    rows = rows.merge(images, left_on="image_sha256", right_on="sha256", how="left")

(a text-only pair keeps one row with no image). `PIL.Image.open(io.BytesIO(row.bytes))`
gives the image; `refdpo.shared.images.decode_image` gives it as the model saw it.

Path mode, for corpora too large to copy: a row's `bytes` is null and `path` is the absolute
path of the file whose content has that sha256; reading re-hashes the file and refuses a
mismatch (the file changed or moved since stage one).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from refdpo.shared.images import sha256_bytes
from refdpo.shared.shards import (
    METADATA_KEY,
    ShardError,
    sha256_file,
    shard_name,
    write_output,
)

IMAGES_DIR = "_images"
IMAGE_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("bytes", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("path", pa.string()),
    ]
)
# Small row groups so that one image is read without its neighbours: at most this many rows
# or about this many bytes of images per group (one larger image gets a group of its own).
ROW_GROUP_IMAGES = 16
ROW_GROUP_BYTES = 4 << 20
CACHE_BYTES = 64 << 20  # decoded row groups ImageStore keeps

JOIN_HINT = (
    "pairs = pd.read_parquet(folder).explode('image_sha256'); "
    "pairs.merge(refdpo.shared.image_store.images_frame(folder), left_on='image_sha256', "
    "right_on='sha256', how='left')"
)


@dataclass(frozen=True)
class StoredImage:
    """One row of the store: `data` is the encoded bytes, or None in path mode."""

    sha256: str
    data: bytes | None
    width: int
    height: int
    format: str
    path: str | None = None


def images_file(rank: int, sequence: int) -> str:
    """The image file of a data shard, relative to the shard folder (same name as the shard)."""
    return f"{IMAGES_DIR}/{shard_name(rank, sequence)}"


def _check_rows(images: Sequence[StoredImage]) -> None:
    """Programming errors in the caller, caught before a file is written."""
    seen: set[str] = set()
    for image in images:
        if image.sha256 in seen:
            raise ValueError(f"image {image.sha256} twice in one file; the store holds it once")
        seen.add(image.sha256)
        if image.data is None:
            if not image.path or not Path(image.path).is_absolute():
                raise ValueError(f"image {image.sha256}: path mode needs an absolute path")
        elif sha256_bytes(image.data) != image.sha256:
            raise ValueError(f"image {image.sha256}: its bytes hash to another sha256")


def _row_groups(images: Sequence[StoredImage]) -> list[list[StoredImage]]:
    groups: list[list[StoredImage]] = [[]]
    size = 0
    for image in images:
        n = len(image.data or b"")
        if groups[-1] and (len(groups[-1]) >= ROW_GROUP_IMAGES or size + n > ROW_GROUP_BYTES):
            groups.append([])
            size = 0
        groups[-1].append(image)
        size += n
    return groups


def write_images(path: Path, images: Sequence[StoredImage]) -> str:
    """Write one image file atomically (zstd, page checksums, small row groups); returns its
    sha256, which the manifest lists. The parent folder is created."""
    _check_rows(images)
    metadata = {METADATA_KEY: json.dumps({"kind": "images", "rows": len(images)}).encode()}
    schema = IMAGE_SCHEMA.with_metadata(metadata)
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(
        sink,
        schema,
        compression="zstd",
        write_page_checksum=True,
        # hashes and encoded images never repeat within a file: a dictionary only costs
        use_dictionary=["format"],
    ) as writer:
        for group in _row_groups(images):
            columns = {
                "sha256": [i.sha256 for i in group],
                "bytes": [i.data for i in group],
                "width": [i.width for i in group],
                "height": [i.height for i in group],
                "format": [i.format for i in group],
                "path": [i.path for i in group],
            }
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = sink.getvalue().to_pybytes()
    write_output(path, data, "no partial file was left")
    return sha256_bytes(data)


class ImageStore:
    """Reads images by sha256 from a shard folder's image files, verifying every image.

    `files` are the manifest's entries, `{"file": path relative to the folder, "sha256": the
    file's checksum}`; with `verify` each file is checked against its checksum on open and
    a Parquet file in `_images/` that is not listed is refused. The index (sha256 -> file,
    row group, row) is built from the `sha256` column only. Thread-safe.
    """

    def __init__(
        self,
        folder: Path,
        files: Sequence[Mapping[str, str]],
        verify: bool = True,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.folder = Path(folder)
        self.files = [str(f["file"]) for f in files]
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
        self._cached = 0
        self._readers: dict[int, pq.ParquetFile] = {}
        if verify:
            self._verify(files)
        self._index = self._build_index()

    @classmethod
    def from_manifest(cls, folder: Path, manifest: Mapping, verify: bool = True) -> ImageStore:
        """The store a manifest lists under `images` (no key: an empty store)."""
        return cls(folder, manifest.get("images", []), verify=verify)

    def _verify(self, files: Sequence[Mapping[str, str]]) -> None:
        for entry in files:
            path = self.folder / entry["file"]
            if not path.is_file():
                raise ShardError(
                    f"{entry['file']}: an image file listed in the manifest but missing"
                )
            if sha256_file(path) != entry["sha256"]:
                raise ShardError(
                    f"{entry['file']}: sha256 differs from the manifest (corrupted or replaced)"
                )
        listed = {(self.folder / f).resolve() for f in self.files}
        stray = sorted(
            p.name
            for p in (self.folder / IMAGES_DIR).glob("*.parquet")
            if p.resolve() not in listed
        )
        if stray:
            raise ShardError(
                f"{IMAGES_DIR}/{stray[0]}: an image file not in the manifest; remove it"
            )

    def _reader(self, number: int) -> pq.ParquetFile:
        if number not in self._readers:
            path = self.folder / self.files[number]
            try:
                self._readers[number] = pq.ParquetFile(path, page_checksum_verification=True)
            except Exception as err:  # whatever a damaged or missing file makes pyarrow raise
                raise ShardError(f"{self.files[number]}: unreadable image file ({err})") from None
        return self._readers[number]

    def _build_index(self) -> dict[str, tuple[int, int, int]]:
        index: dict[str, tuple[int, int, int]] = {}
        for number, name in enumerate(self.files):
            reader = self._reader(number)
            if reader.schema_arrow.remove_metadata() != IMAGE_SCHEMA:
                raise ShardError(f"{name}: its columns are not those of an image file")
            for group in range(reader.num_row_groups):
                try:
                    hashes = reader.read_row_group(group, columns=["sha256"])["sha256"]
                except Exception as err:
                    raise ShardError(f"{name}: unreadable image file ({err})") from None
                for row, sha in enumerate(hashes.to_pylist()):
                    # one image owned by two shards (two ranks saw it): the copies are equal
                    index.setdefault(sha, (number, group, row))
        return index

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._index

    def _row_group(self, number: int, group: int, sha256: str) -> pa.Table:
        key = (number, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            table = self._reader(number).read_row_group(group)
        except Exception as err:  # a page whose CRC fails, a damaged file
            raise ShardError(
                f"image {sha256}: {self.files[number]} is damaged, its row group {group} "
                f"does not read ({err})"
            ) from None
        self._cache[key] = table
        self._cached += table.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return table

    def get(self, sha256: str) -> bytes:
        """The encoded bytes of one image, re-hashed; a ShardError names the image and file."""
        if sha256 not in self._index:
            raise ShardError(
                f"image {sha256} is not in the image store of {self.folder} "
                f"({len(self.files)} image files); the folder is incomplete or mixed"
            )
        number, group, row = self._index[sha256]
        with self._lock:
            table = self._row_group(number, group, sha256)
        name = self.files[number]
        data = table["bytes"][row].as_py()
        where = name
        if data is None:  # path mode: the file must still hold the same content
            where = table["path"][row].as_py()
            try:
                data = Path(where).read_bytes()
            except OSError as err:
                raise ShardError(f"image {sha256} ({name}, path mode): {err}") from None
        if sha256_bytes(data) != sha256:
            raise ShardError(
                f"image {sha256}: the bytes read from {where} hash to another sha256 "
                "(damaged, or the file changed since stage one)"
            )
        return data

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            self._cache.clear()
            self._cached = 0

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def images_frame(folder: Path):
    """Every image of a shard folder as a pandas DataFrame, one row per distinct sha256
    (columns as IMAGE_SCHEMA). See the module docstring for the join with the pairs."""
    import pandas as pd

    files = sorted((Path(folder) / IMAGES_DIR).glob("*.parquet"))
    if not files:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in IMAGE_SCHEMA.names})
    table = pa.concat_tables(pq.read_table(f).replace_schema_metadata() for f in files)
    frame = table.to_pandas()
    return frame.drop_duplicates("sha256", ignore_index=True)
