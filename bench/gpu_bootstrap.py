"""Make a plain checkout runnable without `pip install`: refdpo from the tree, carried wheels.

Standard library only: this runs before anything else is imported, on a GPU machine that
may have no package registry.

* refdpo: pyproject.toml maps the folders `precompute/`, `train/`, `shared/`, `demo/` to
  `refdpo.precompute`, `refdpo.train`, ... When `refdpo` is not importable from this
  checkout, a one-line package `refdpo/__init__.py` whose `__path__` is the checkout's root
  is written under a folder of the output (`refdpo.train` is then `<checkout>/train`), and
  that folder goes first on `sys.path` and on every child process's PYTHONPATH.
* wheels: the packages the GPU machine lacks (deepspeed, trl, datasets and theirs) travel
  as wheel files; each one whose distribution is not installed already is installed with
  `pip install --no-index --no-deps --target <wheels>/site` (or, without pip, unpacked
  there: a wheel is a zip), and that folder goes on the path too. An installed package is
  never shadowed: only missing distributions are added.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("precompute", "train", "shared", "demo")  # pyproject.toml's package-dir


def refdpo_from_this_tree() -> bool:
    """Whether `import refdpo.shared` gives this checkout's shared/ (an editable install)."""
    try:
        spec = importlib.util.find_spec("refdpo.shared")
    except (ImportError, ValueError):
        return False
    return bool(spec and spec.origin and Path(spec.origin).resolve().parent == REPO / "shared")


def write_shim(folder: Path) -> Path:
    """`folder/refdpo/__init__.py` pointing the `refdpo` package at this checkout."""
    package = folder / "refdpo"
    package.mkdir(parents=True, exist_ok=True)
    text = (
        '"""refdpo from a source checkout (written by bench/gpu_bootstrap.py)."""\n'
        f"__path__ = [{str(REPO)!r}]\n"
    )
    init = package / "__init__.py"
    if not init.exists() or init.read_text() != text:
        init.write_text(text)
    return folder


def distribution_of(wheel: Path) -> str:
    """A wheel file's distribution name, normalized (PEP 503): `py_cpuinfo-9.0.0-...` ->
    `py-cpuinfo`."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def unpack(wheel: Path, target: Path) -> None:
    """What `pip install --target` does for a wheel: its files at the top, the contents of
    `*.data/purelib` and `*.data/platlib` too (scripts and headers are not needed here)."""
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            parts = Path(member).parts
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            destination = target.joinpath(*parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, destination.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def install_wheels(folder: Path) -> tuple[Path | None, list[str]]:
    """Install every wheel in `folder` whose distribution is missing into `folder/site`.
    Returns (the site folder, or None without wheels; what was installed now)."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return None, []
    site = folder / "site"
    site.mkdir(exist_ok=True)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    missing = [w for w in wheels if not installed(distribution_of(w))]
    if missing:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet"]
        has_pip = importlib.util.find_spec("pip") is not None
        done = has_pip and subprocess.run(
            [*pip, "--target", str(site), *map(str, missing)], check=False
        ).returncode == 0  # fmt: skip
        if not done:
            for wheel in missing:
                unpack(wheel, site)
        importlib.invalidate_caches()
    return site, [w.name for w in missing]


def prepare(shim_folder: Path, wheels: Path | None) -> dict:
    """Make refdpo and the carried wheels importable here; returns what children need:
    `pythonpath` (folders to put first on PYTHONPATH) and notes of what was done."""
    paths, notes = [], []
    site, added = install_wheels(wheels) if wheels else (None, [])
    if site:
        paths.append(str(site))
        if added:
            notes.append(f"installed {len(added)} carried wheel(s) into {site}: {', '.join(added)}")
    if not refdpo_from_this_tree():
        write_shim(shim_folder)
        paths.insert(0, str(shim_folder))
        sys.path.insert(0, str(shim_folder))
        for name in [m for m in sys.modules if m == "refdpo" or m.startswith("refdpo.")]:
            del sys.modules[name]  # an installed refdpo from elsewhere, imported already
        importlib.invalidate_caches()
        notes.append(f"refdpo runs from this checkout ({REPO}) through {shim_folder}/refdpo")
    paths.append(str(REPO))  # `python -m bench.…` in children, whatever their cwd
    return {"pythonpath": paths, "notes": notes}


def child_environment(paths: list[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) with `paths` first on PYTHONPATH; nothing from a hub."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([*paths, *([old] if old else [])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    return env


def missing_modules(names: tuple[str, ...]) -> list[str]:
    """Which of these top-level modules cannot be imported here."""
    importlib.invalidate_caches()
    return [name for name in names if importlib.util.find_spec(name) is None]
