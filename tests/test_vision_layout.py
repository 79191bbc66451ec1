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
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen3_vl", "idefics3", "gemma3", "paligemma"]
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
    + [
        ("smolvlm", "sdpa"),
        ("qwen2_5_vl", "sdpa"),
        ("paligemma2", "eager"),  # Gemma2's attention softcapping: eager only
    ],
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


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_qwen_1d_positions_fail(folders, name, monkeypatch):
    """Guard: plain restart positions instead of M-RoPE move the log-probs."""
    model, processor = load(folders(name))
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


def per_pair_vision(processor, family, images_per_pair, seed=0):
    """Each pair's images processed alone, then joined (stage two's way), next to the whole
    batch's images processed at once (stage one's way)."""
    images = vlms.images(sum(images_per_pair), seed=seed)
    pieces, at = [], 0
    for n in images_per_pair:
        if n:
            pieces.append(family.process_images(processor, images[at : at + n]))
        at += n
    return family.join_images(pieces), family.process_images(processor, images)


def test_llava_next_joined_pairs_equal_the_batch(folders):
    """Pairs processed alone pad their crops to their own most crops; joined, they pad to
    the batch's: the same tensors, and the same log-probs, as processing the batch at once.
    The padded crops are ignored (the model counts an image's crops from its size): noise in
    them changes nothing."""
    model, processor = load(folders("llava_next"))
    family = family_for(model)
    spec = CASES["mixed_batch"]
    packed, vision = make_batch(processor, family, **spec)
    joined, whole = per_pair_vision(processor, family, spec["images_per_pair"])
    assert joined.keys() == whole.keys() == vision.keys()
    assert all(torch.equal(joined[k], whole[k]) for k in whole)
    crops = [p["pixel_values"].shape[1] for p in family.split_images(whole, [0] * 4)]
    assert len(set(crops)) == 1 and whole["pixel_values"].shape[1] == 5  # padded to 5
    alone = [family.process_images(processor, [im]) for im in vlms.images(4)]
    assert sorted({a["pixel_values"].shape[1] for a in alone}) == [3, 5]  # 3 crops padded
    noisy = dict(whole, pixel_values=whole["pixel_values"].clone())
    for i, a in enumerate(alone):
        real = a["pixel_values"].shape[1]
        noisy["pixel_values"][i, real:] = torch.randn_like(noisy["pixel_values"][i, real:])
    with torch.no_grad():
        together = vision_pair_logps(model, family, packed, whole)
        pieces = vision_pair_logps(model, family, packed, joined)
        with_noise = vision_pair_logps(model, family, packed, noisy)
        naive = naive_pair_logps(model, family, packed, joined)
    assert gap(together, pieces) == 0.0 and gap(together, with_noise) == 0.0
    assert gap(pieces, naive) < TOL


def test_llava_next_without_image_sizes_fails(folders):
    """Guard: the image sizes decide each image's crops and tokens; without them the model
    cannot be called, and the sizes of the resized crops instead of the originals give
    other token counts (the call raises) or other features."""
    model, processor = load(folders("llava_next"))
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    crop_sizes = dict(vision, image_sizes=torch.full_like(vision["image_sizes"], 28))
    with torch.no_grad():
        naive = naive_pair_logps(model, family, packed, vision)
        try:
            moved = gap(vision_pair_logps(model, family, packed, crop_sizes), naive)
        except (ValueError, RuntimeError):
            moved = float("inf")
    assert moved > 100 * TOL
    without = {"pixel_values": vision["pixel_values"]}
    with torch.no_grad(), pytest.raises((TypeError, KeyError)):
        vision_pair_logps(model, family, packed, without)


def test_paligemma_prompt_ids_are_the_processors(folders):
    """The family writes PaliGemma's prefix itself (images, BOS, text, "\\n") and expands the
    image tokens as the processor does: the prompt's ids and pixels are the processor's own
    (which appends the "\\n" to every text, so refdpo cannot call it on prompt + completion)."""
    model, processor = load(folders("paligemma"))
    family = family_for(model)
    pictures = vlms.images(2)
    text = family.prompt_text(processor, f"<image>\n<image> {QUESTION}")
    assert text == f"<image><image>{processor.tokenizer.bos_token}{QUESTION}\n"
    ids, vision = encode_prompt(processor, family, text, pictures)
    own = processor(text=[f"<image><image>{QUESTION}"], images=[pictures], return_tensors="pt")
    assert ids == own["input_ids"][0].tolist()
    assert torch.equal(vision["pixel_values"], own["pixel_values"])
    assert (own["token_type_ids"] == 0).all()  # the whole prompt is the bidirectional prefix


@pytest.mark.parametrize("name", ["paligemma", "paligemma2"])
def test_paligemma_causal_prefix_fails(folders, name, monkeypatch):
    """Guard: a causal mask over the prompt (the plain pair mask) instead of PaliGemma's
    bidirectional prefix moves the log-probs."""
    from refdpo.shared.vision import paligemma

    model, processor = load(folders(name), "eager")
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    monkeypatch.setattr(paligemma, "prefix_blocks", lambda pairs, part: torch.zeros((), dtype=bool))
    shared, fallback, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL
    assert gap(fallback, naive) > 100 * TOL


def test_paligemma2_without_softcap_fails(folders, monkeypatch):
    """Guard: PaliGemma 2's forward caps its logits (Gemma2's final_logit_softcapping);
    a lm_head applied by hand without the cap gives other log-probs."""
    from refdpo.shared.vision.paligemma import PaliGemma

    model, processor = load(folders("paligemma2"), "eager")
    family = family_for(model)
    assert family.softcap(model) == 1.0
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    monkeypatch.setattr(PaliGemma, "softcap", lambda self, m: None)
    shared, _, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL


def test_paligemma2_single_mask_fails(folders, monkeypatch):
    """Guard: one 4D tensor instead of the dict: the sliding layer loses its window of 8."""
    from refdpo.shared.vision.paligemma import PaliGemma

    model, processor = load(folders("paligemma2"), "eager")
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    full_only = PaliGemma.attention_mask
    monkeypatch.setattr(PaliGemma, "attention_mask", lambda *a: full_only(*a)["full_attention"])
    shared, fallback, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL
    assert gap(fallback, naive) > 100 * TOL


def test_qwen3_vl_without_deepstack_fails(folders, monkeypatch):
    """Guard: Qwen3-VL's decoder adds the tower's DeepStack features to the image tokens'
    hidden states; without them (embeddings alone, as for Qwen2-VL) the log-probs move."""
    from refdpo.shared.vision.qwen import Qwen3VL

    model, processor = load(folders("qwen3_vl"))
    family = family_for(model)
    packed, vision = make_batch(processor, family, **CASES["mixed_batch"])
    monkeypatch.setattr(Qwen3VL, "decoder_inputs", lambda self, is_image, extra: {})
    shared, fallback, naive = all_three(model, family, packed, vision)
    assert gap(shared, naive) > 100 * TOL
    assert gap(fallback, naive) > 100 * TOL


def test_llava_next_refuses_images_back_to_back(folders):
    """An image's token count depends on its size, so a run of image tokens cannot be cut
    into images from the ids alone: images must be apart ("<image>\\n" each, as the chat
    template writes them); back to back they are refused when the prompt is encoded."""
    model, processor = load(folders("llava_next"))
    family = family_for(model)
    encode_prompt(processor, family, f"<image>\n<image>\n{QUESTION}", vlms.images(2))
    with pytest.raises(ValueError, match="1 images in the prompt ids, 2 processed"):
        encode_prompt(processor, family, f"<image><image>\n{QUESTION}", vlms.images(2))


def test_auto_attention_loads_each_vision_sub_model_with_what_it_supports(folders):
    """`--attn-implementation auto` for a VLM is transformers' own default per sub-model:
    sdpa where supported (LLaVA's decoder), eager where the class refuses sdpa (PaliGemma 2's
    Gemma2 decoder; asking for sdpa there fails at load)."""
    from refdpo.shared.models import load_model

    llava = load_model(
        str(folders("llava")), None, "fp32", "auto", torch.device("cpu"), vision=True
    )
    assert llava.config.get_text_config()._attn_implementation == "sdpa"
    pg2 = load_model(
        str(folders("paligemma2")), None, "fp32", "auto", torch.device("cpu"), vision=True
    )
    assert pg2.config.get_text_config()._attn_implementation == "eager"
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        load_model(
            str(folders("paligemma2")), None, "fp32", "sdpa", torch.device("cpu"), vision=True
        )
