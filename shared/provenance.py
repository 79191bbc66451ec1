"""What made an artifact: recorded in every shard and manifest, checked by stage two."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("refdpo", "torch", "transformers", "datasets", "pyarrow", "peft", "tokenizers")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
