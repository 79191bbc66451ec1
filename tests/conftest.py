"""Shared fixtures: a tiny random Llama and a byte-level BPE tokenizer built here, no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: What is two plus two? Assistant: Two plus two is four.",
    "Question: how do I sort a list in Python?\n\nAnswer: use sorted(xs) or xs.sort().",
    "Rewrite the sentence politely. Could you please pass the salt? Thank you very much!",
] * 4


def build_tokenizer(bos: bool = False):
    """A byte-level BPE (any Unicode string tokenizes) with ChatML-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<s>" if bos else None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved 2-layer random Llama with the test tokenizer: what `--model` points at."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tiny_model_dir) -> Path:
    """48 training pairs and 16 eval pairs scored by the tiny reference (read-only: copy
    before damaging)."""
    from refdpo.precompute.run import main as precompute_main
    from tests.test_precompute import good_rows

    root = tmp_path_factory.mktemp("shards")
    dataset = write_jsonl(root / "pairs.jsonl", good_rows(64))
    code = precompute_main([
        "--model", str(tiny_model_dir), "--dataset", str(dataset), "--output", str(root / "train"),
        "--eval-fraction", "0.25", "--rows-per-shard", "16", "--max-length", "128", "--max-prompt-length", "64",
    ])  # fmt: skip
    assert code == 0
    return root


def torchrun(nproc: int, port: int, module: str, args: list[str]) -> list[str]:
    """Command line of `torchrun` (torch.distributed.run) starting `module` on nproc ranks."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(port), "-m", module, *args]  # fmt: skip


def wait_for_lines(path: Path, lines: int, timeout: float = 300) -> None:
    """Poll until `path` has at least `lines` lines (e.g. logged training steps)."""
    import time

    deadline = time.monotonic() + timeout
    while (
        not (path.exists() and path.read_text().count("\n") >= lines)
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path
