"""The vision pair layouts against the model's own forward, on tiny random VLMs (CPU, fp32).

For every family: the shared layout ([prompt with images, chosen, rejected] in one sequence,
one model call) and the two-sequence fallback give the same per-token log-probs as the
naive HF forward of each sequence alone, with one image, several, a batch of mixed sizes
with a text-only pair, and several pairs per row. Guards show that what the adapters do is
needed: without it the log-probs move past the tolerance (or the call raises).
"""

from __future__ import annotations

import pytest
import torch

from refdpo.shared.errors import UsageError
from refdpo.shared.logprobs import pack_pairs
from refdpo.shared.vision import (
    count_vision_passes,
    encode_prompt,
    fallback_pair_logps,
    family_for,
    naive_pair_logps,
    vision_pair_logps,
)
from tests import vlms

TOL = 1e-5
FAMILIES = ["llava", "qwen2_vl", "idefics3", "gemma3"]
QUESTION = "What is two plus two?"
CHOSEN = ["Two plus two is four.", "Use sorted(xs).", "Thank you very much!", "The lazy dog."]
REJECTED = ["The quick brown fox.", "Please pass the salt?", "four", "Human: sort a list"]


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """Each family's tiny checkpoint, built once per session on first use."""
    root, built = tmp_path_factory.mktemp("vlms"), {}

    def get(name: str):
        if name not in built:
            built[name] = getattr(vlms, f"build_{name}")(root)
        return built[name]

    return get


def load(folder, attn: str = "sdpa"):
    """The checkpoint as stage one loads it."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attn)
    return model.eval(), AutoProcessor.from_pretrained(folder)


def make_batch(processor, family, images_per_pair, rows=None, seed=0):
    """Pairs whose prompts hold images_per_pair[i] images (mixed sizes): the PackedPairs of
    their expanded ids and the vision tensors of all images in layout order."""
    tok = processor.tokenizer
    images = vlms.images(sum(images_per_pair), seed=seed)
    prompts, per_pair, at = [], [], 0
    for n in images_per_pair:
        content = [{"type": "image"}] * n + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        ids, _ = encode_prompt(processor, family, text, images[at : at + n])
        prompts.append(ids)
        per_pair.append(images[at : at + n])
        at += n
    k = len(prompts)
    chosen = [[*tok.encode(CHOSEN[i % 4]), tok.eos_token_id] for i in range(k)]
    rejected = [[*tok.encode(REJECTED[i % 4]), tok.eos_token_id] for i in range(k)]
    packed = pack_pairs(prompts, chosen, rejected, tok.pad_token_id, rows=rows)
    order = [p for row in rows or [[i] for i in range(k)] for p in row]
    vision = family.process_images(processor, [im for p in order for im in per_pair[p]])
    return packed, vision


def all_three(model, family, packed, vision):
    with torch.no_grad():
        return (
            vision_pair_logps(model, family, packed, vision),
            fallback_pair_logps(model, family, packed, vision),
            naive_pair_logps(model, family, packed, vision),
        )


def gap(a, b) -> float:
    return (a.token_logps - b.token_logps).abs().max().item()


CASES = {
    "one_image": dict(images_per_pair=[1]),
    "several_images": dict(images_per_pair=[3]),
    "mixed_batch": dict(images_per_pair=[1, 2, 0, 1]),
    "packed_rows": dict(images_per_pair=[2, 0, 1, 1], rows=[[0, 1], [2], [3]]),
}


@pytest.mark.parametrize(
    "name, attn",
    [(f, a) for f in FAMILIES for a in ("sdpa", "eager")]
    + [("smolvlm", "sdpa"), ("qwen2_5_vl", "sdpa")],
)
def test_layouts_equal_naive(folders, name, attn):
    model, processor = load(folders(name), attn)
    family = family_for(model)
    for case, spec in CASES.items():
        packed, vision = make_batch(processor, family, **spec)
        shared, fallback, naive = all_three(model, family, packed, vision)
        assert gap(shared, naive) < TOL, (case, gap(shared, naive))
        assert gap(fallback, naive) < TOL, (case, gap(fallback, naive))
        torch.testing.assert_close(shared.chosen_logps, naive.chosen_logps, atol=1e-4, rtol=0)
        torch.testing.assert_close(shared.rejected_logps, naive.rejected_logps, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_images_matter(folders, name):
    """The fixtures' images reach the log-probs (no zero-initialised projector)."""
    model, processor = load(folders(name))
    family = family_for(model)
    packed, vision = make_batch(processor, family, [2], seed=0)
    _, other = make_batch(processor, family, [2], seed=1)
    with torch.no_grad():
        a = vision_pair_logps(model, family, packed, vision)
        b = vision_pair_logps(model, family, packed, other)
    assert gap(a, b) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_shared_layout_backward(folders, name):
    """Stage two's use: gradients reach the language model and the vision tower."""
    model, processor = load(folders(name))
    family = family_for(model)
    packed, vision = make_batch(processor, family, [1, 0])
    logps = vision_pair_logps(model, family, packed, vision)
    (logps.chosen_logps - logps.rejected_logps).sum().backward()
    for module in (family.vision_module(model), family.decoder(model)):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_vision_tower_passes(folders, name):
    """One pair with two images: the tower runs once in the shared and fallback layouts (all
    images in one call), twice in the naive forward (once per sequence)."""
    model, processor = load(folders(name))
    family = family_for(model)
    packed, vision = make_batch(processor, family, [2])
    calls = []
    for score in (vision_pair_logps, fallback_pair_logps, naive_pair_logps):
        with torch.no_grad(), count_vision_passes(model) as passes:
            score(model, family, packed, vision)
        calls.append(passes.calls)
    assert calls == [1, 1, 2]


@pytest.mark.parametrize("name", FAMILIES)
def test_wrong_placeholder_count_raises(folders, name):
    model, processor = load(folders(name))
    family = family_for(model)
    text = f"{family.placeholder} {QUESTION}"
    encode_prompt(processor, family, text, vlms.images(1))
    with pytest.raises(UsageError, match="placeholders"):
        encode_prompt(processor, family, text, vlms.images(2))
    with pytest.raises(UsageError, match="placeholders"):
        encode_prompt(processor, family, text + family.placeholder, vlms.images(1))


def test_qwen_1d_positions_fail(folders, monkeypatch):
    """Guard: plain restart positions instead of M-RoPE move the log-probs."""
    model, processor = load(folders("qwen2_vl"))
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    monkeypatch.setattr(type(family), "positions", lambda self, m, layout, v: layout.position_ids)
    shared, fallback, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 10 * TOL  # about 1e-3 on this model
    assert gap(fallback, naive) > 10 * TOL


@pytest.mark.parametrize("mask", ["none", "2d"])
@pytest.mark.parametrize("name", FAMILIES)
def test_without_4d_mask_fails(folders, name, mask, monkeypatch):
    """Guard: no mask, or a 2D one, lets rejected tokens see chosen ones (or reads the
    restarted positions as packed sequences): the log-probs move, or the model raises."""
    model, processor = load(folders(name))
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])

    def no_4d(self, m, layout, positions, dtype):
        return None if mask == "none" else (layout.pair_index >= 0).long()

    monkeypatch.setattr(type(family), "attention_mask", no_4d)
    with torch.no_grad():
        naive = naive_pair_logps(model, family, packed, vision)
        try:
            shared = vision_pair_logps(model, family, packed, vision)
        except (ValueError, RuntimeError):
            return
    assert gap(shared, naive) > 100 * TOL


def test_family_for_refuses_unknown_model_type():
    from transformers import LlamaConfig

    with pytest.raises(UsageError, match="llama"):
        family_for(LlamaConfig())


@pytest.mark.parametrize("name", FAMILIES)
def test_processor_settings_and_refusals(folders, name):
    import json

    _, processor = load(folders(name))
    family = family_for(load(folders(name))[0])
    settings = family.processor_settings(processor)
    json.dumps(settings)
    assert settings["processor_class"] == type(processor).__name__
    assert settings["chat_template"] == processor.chat_template
    family.check_processor(processor)
    processor.image_processor.do_random_crop = True
    with pytest.raises(UsageError, match="do_random_crop"):
        family.check_processor(processor)
    assert family.process_images(processor, []) == {}


def test_gemma3_single_mask_fails(folders, monkeypatch):
    """Guard: one 4D tensor instead of the dict: the sliding layers lose their window."""
    from refdpo.shared.vision.gemma import Gemma3

    model, processor = load(folders("gemma3"))
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    full_only = Gemma3.attention_mask
    monkeypatch.setattr(Gemma3, "attention_mask", lambda *a: full_only(*a)["full_attention"])
    shared, fallback, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL
    assert gap(fallback, naive) > 100 * TOL


def test_gemma3_window_on_physical_indices_fails(folders, monkeypatch):
    """Guard: the sliding window measured on indices in the packed row instead of logical
    positions cuts the rejected part off from the end of its prompt (the window is 8 tokens;
    the prompts and completions are longer)."""
    from refdpo.shared.vision.gemma import Gemma3

    model, processor = load(folders("gemma3"))
    family = family_for(model)
    assert model.config.text_config.sliding_window == 8
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    monkeypatch.setattr(
        Gemma3,
        "window_positions",
        lambda self, layout, pos: torch.arange(pos.shape[-1]).expand_as(pos),
    )
    shared = vision_pair_logps(model, family, packed, vision)
    naive = naive_pair_logps(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL


def test_gemma3_refuses_pan_and_scan(folders):
    _, processor = load(folders("gemma3"))
    family = family_for(load(folders("gemma3"))[0])
    processor.image_processor.do_pan_and_scan = True
    with pytest.raises(UsageError, match="pan_and_scan"):
        family.check_processor(processor)
