"""Build the folder of wheels (and SmolLM2's tokenizer) that bench.gpu needs on a GPU machine
without a package registry. Run it on a machine that has one:

    python -m bench.gpu_wheels [--output wheels] [--python-version 3.12]

then carry the folder inside the checkout; `python -m bench.gpu` installs, on the GPU
machine, the wheels whose package is missing there, and reads the tokenizer (and the rasbt
pairs, when ../shared/data is not there) from it. What it runs:

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels/ PKG==V ...
    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation -w wheels/ deepspeed==V

with the versions installed here (the ones refdpo's tests ran with). DeepSpeed publishes no
wheel, only a source archive; built with DS_BUILD_OPS=0 it is pure Python
(py3-none-any): its CUDA ops compile just in time if ever used, and refdpo's default path
(ZeRO-0, torch's AdamW) uses none. Pure-Python wheels (py3-none-any) fit any Python; the
compiled ones (xxhash, msgpack, pydantic-core, ninja) are for --python-version on x86-64
Linux. Prints every file's size; fails above 64 MiB in total.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# what refdpo and bench.gpu need beyond torch, transformers, accelerate, peft, pyarrow and
# pandas, with what those need in turn; bench.gpu installs only those missing there
CARRIED = (
    "trl", "datasets", "dill", "multiprocess", "xxhash", "hjson", "msgpack", "ninja",
    "py-cpuinfo", "einops", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
)  # fmt: skip
BUILT = ("deepspeed",)
LIMIT_MB = 64.0
DATA = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "instruction-data-with-preference.json"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # fmt: skip


def pinned(names: tuple[str, ...]) -> list[str]:
    specs = []
    for name in names:
        try:
            specs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: install refdpo's extras first "
                             "(pip install -e '.[test,bench]')") from None  # fmt: skip
    return specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_wheels", description=__doc__.split("\n")[0]
    )
    p.add_argument("--output", type=Path, default=Path("wheels"))
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    p.add_argument("--tokenizer", default=None, help="default: refdpo's demo model (SmolLM2)")
    args = p.parse_args(argv)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    args.python_version, "--platform", "manylinux2014_x86_64", "--platform",
                    "manylinux_2_28_x86_64", "-d", str(out), *pinned(CARRIED)], check=True)  # fmt: skip
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                    *pinned(BUILT)], check=True, env=env)  # fmt: skip
    if args.tokenizer:
        source = Path(args.tokenizer)
    else:
        from refdpo.shared.demo_model import fetch_demo_model

        source = fetch_demo_model()
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / "tokenizer" / name)
    if DATA.exists():  # the rasbt pairs (Apache-2.0), in case ../shared does not travel
        (out / "data").mkdir(exist_ok=True)
        shutil.copy2(DATA, out / "data" / DATA.name)
    files = sorted(
        f for f in out.rglob("*") if f.is_file() and "site" not in f.relative_to(out).parts
    )
    total = 0.0
    for f in files:
        size = f.stat().st_size / 2**20
        total += size
        print(f"{size:8.2f} MiB  {f.relative_to(out)}")
    print(f"{total:8.2f} MiB  in all ({len(files)} files)")
    if total > LIMIT_MB:
        print(f"more than {LIMIT_MB:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
