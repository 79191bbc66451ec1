"""The shared log-prob function against a naive full-sequence forward + log_softmax + gather."""

from __future__ import annotations

import math

import pytest
import torch

from refdpo.shared.logprobs import (
    CHOSEN,
    PROMPT,
    REJECTED,
    Packer,
    attention_bias,
    attention_weight,
    pack_pairs,
    pack_rows,
    pair_logps,
)
from tests.conftest import build_model

VOCAB = 300
TOLERANCE_FP32 = 1e-4  # per token; observed differences are ~1e-6


def random_pairs(seed: int, n: int = 5):
    g = torch.Generator().manual_seed(seed)

    def ids(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(1, VOCAB, (length,), generator=g).tolist()

    return (
        [ids(1, 30) for _ in range(n)],
        [ids(1, 25) for _ in range(n)],
        [ids(1, 25) for _ in range(n)],
    )


def naive_token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Independent computation: one forward over [prompt, completion], full-vocab log_softmax."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logps = logits.log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return logps[positions, torch.tensor(completion)]


@pytest.fixture(scope="module")
def model():
    return build_model(VOCAB, seed=1)


@pytest.mark.parametrize("layout", ["one_pair_per_row", "all_in_one_row", "mixed_rows"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_matches_naive_forward(model, layout, attn):
    prompts, chosen, rejected = random_pairs(seed=2)
    rows = {
        "one_pair_per_row": None,
        "all_in_one_row": [[0, 1, 2, 3, 4]],
        "mixed_rows": [[3, 0], [4], [1, 2]],
    }[layout]
    model.config._attn_implementation = attn
    batch = pack_pairs(prompts, chosen, rejected, pad_token_id=0, rows=rows)
    with torch.inference_mode():
        out = pair_logps(model, batch, chunk_size=7)
    chosen_tokens, rejected_tokens = out.per_token()
    for i in range(len(prompts)):
        want_c = naive_token_logps(model, prompts[i], chosen[i])
        want_r = naive_token_logps(model, prompts[i], rejected[i])
        torch.testing.assert_close(chosen_tokens[i], want_c, atol=TOLERANCE_FP32, rtol=0)
        torch.testing.assert_close(rejected_tokens[i], want_r, atol=TOLERANCE_FP32, rtol=0)
        torch.testing.assert_close(
            out.chosen_logps[i], want_c.sum(), atol=TOLERANCE_FP32 * len(want_c), rtol=0
        )
        assert int(out.chosen_lengths[i]) == len(chosen[i])
        assert int(out.rejected_lengths[i]) == len(rejected[i])
    model.config._attn_implementation = "sdpa"


def test_chunk_size_does_not_change_values(model):
    batch = pack_pairs(*random_pairs(seed=3), pad_token_id=0)
    with torch.inference_mode():
        small = pair_logps(model, batch, chunk_size=1).token_logps
        large = pair_logps(model, batch, chunk_size=10_000).token_logps
    torch.testing.assert_close(small, large, atol=1e-6, rtol=0)


def test_bf16_model_gives_fp32_logps_close_to_fp32(model):
    batch = pack_pairs(*random_pairs(seed=4), pad_token_id=0)
    bf16 = build_model(VOCAB, seed=1).to(torch.bfloat16)
    with torch.inference_mode():
        want = pair_logps(model, batch).token_logps
        got = pair_logps(bf16, batch).token_logps
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1  # bf16 keeps ~3 significant digits


def test_gradients_match_naive_forward(model):
    """Stage two trains through pair_logps: its gradient must be the naive one."""
    prompts, chosen, rejected = random_pairs(seed=5, n=3)
    model.zero_grad()
    out = pair_logps(
        model, pack_pairs(prompts, chosen, rejected, 0, rows=[[0, 1], [2]]), chunk_size=4
    )
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    total = 0.0
    for p, c, r in zip(prompts, chosen, rejected, strict=True):
        for completion, sign in ((c, 1.0), (r, -1.0)):
            logits = model(torch.tensor([p + completion])).logits[0].float()
            pos = torch.arange(len(p) - 1, len(p) + len(completion) - 1)
            total = total + sign * logits.log_softmax(-1)[pos, torch.tensor(completion)].sum()
    total.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


def test_attention_bias_by_hand():
    # prompt [a, b], chosen [c], rejected [d, e]; one padding position at the end
    batch = pack_pairs([[1, 2], [7]], [[3], [8]], [[4, 5], [9]], pad_token_id=0)
    assert batch.part[0].tolist() == [PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 2, 3]
    allowed = (
        (attention_bias(batch.pair_index, batch.part, torch.float32)[0, 0] == 0).int().tolist()
    )
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen sees the prompt
        [1, 1, 0, 1, 0],  # rejected sees the prompt, not the chosen token
        [1, 1, 0, 1, 1],
    ]
    padded = (attention_bias(batch.pair_index, batch.part, torch.float32)[1, 0] == 0).int().tolist()
    assert padded[3] == [0, 0, 0, 1, 0] and padded[4] == [0, 0, 0, 0, 1]  # padding sees itself only
    # the first rejected token is predicted from the last prompt position
    rejected_first = (batch.target_row == 0) & batch.target_is_rejected
    assert batch.predictor_pos[rejected_first].tolist() == [1, 3]


def test_rejects_empty_parts():
    with pytest.raises(ValueError, match=">= 1 token each"):
        pack_pairs([[]], [[1]], [[2]], pad_token_id=0)


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_pair_once_within_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (17,), generator=g).tolist()
    capacity = max(lengths)
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    # first-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= total / capacity
    assert len(rows) <= 11 / 9 * math.ceil(sum(lengths) / capacity) + 1
    assert rows == pack_rows(lengths, capacity)  # deterministic


def test_pack_rows_gives_an_overlong_pair_its_own_row():
    assert pack_rows([5, 50, 3], capacity=10) == [[1], [0, 2]]


def test_packed_layout_computes_fewer_tokens_and_the_same_logps(model):
    prompts, chosen, rejected = random_pairs(seed=6, n=12)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    padded = pack_pairs(prompts, chosen, rejected, 0)
    packed = pack_pairs(prompts, chosen, rejected, 0, rows=pack_rows(lengths, max(lengths)))
    assert packed.input_ids.numel() < padded.input_ids.numel()
    assert packed.num_tokens == padded.num_tokens == sum(lengths)
    with torch.inference_mode():
        want, got = pair_logps(model, padded), pair_logps(model, packed)
    torch.testing.assert_close(got.token_logps, want.token_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, atol=1e-4, rtol=0)


def test_packer_cost_model_packs_short_pairs_and_keeps_long_ones_apart():
    # no attention cost: one row of everything is padding-free and cheapest
    assert len(Packer(attention_weight=0.0).rows([10, 3, 4, 5, 2])) == 1
    # attention dominating: short rows win, even with padding
    assert Packer(attention_weight=1.0).rows([10, 3, 4, 5, 2]) == pack_rows([10, 3, 4, 5, 2], 10)
    # a fixed capacity is honoured, never below the longest pair
    assert Packer(capacity=12).rows([10, 3, 4, 5, 2]) == pack_rows([10, 3, 4, 5, 2], 12)
    assert Packer(capacity=4).rows([10, 3]) == [[0], [1]]


def test_attention_weight_of_a_llama_layer():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3)  # fmt: skip
    # SmolLM2-135M: per token 3.54M multiply-adds in linear layers, 1152 per attended key
    linear = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert attention_weight(config) == pytest.approx(1152 / linear)


def reference_token_logps(hidden, weight, bias, targets, softcap):
    """Plain autograd over the full fp32 logits: what ChunkedTokenLogps must equal."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunked_token_logps_equals_plain_autograd(softcap, with_bias, chunk_size):
    """Values and gradients (hidden, weight, bias) of the one-call chunked function against
    full logits under autograd, fp32, to 1e-6."""
    from refdpo.shared.output_layer import ChunkedTokenLogps

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (23,), generator=g)
    upstream = torch.randn(23, generator=g)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    got = ChunkedTokenLogps.apply(hidden, weight, bias, targets, chunk_size, softcap)
    got_grads = torch.autograd.grad((got * upstream).sum(), inputs)
    want = reference_token_logps(hidden, weight, bias, targets, softcap)
    want_grads = torch.autograd.grad((want * upstream).sum(), inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_chunked_token_logps_frozen_weight_gives_hidden_gradient_only():
    from refdpo.shared.output_layer import ChunkedTokenLogps

    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen (LoRA leaves the output layer alone)
    targets = torch.randint(0, 20, (9,))
    got = ChunkedTokenLogps.apply(hidden, weight, None, targets, 4, None)
    (grad,) = torch.autograd.grad(got.sum(), [hidden])
    (want,) = torch.autograd.grad(
        reference_token_logps(hidden, weight, None, targets, None).sum(), [hidden]
    )
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-6)


def test_output_layer_is_called_once_per_batch_whatever_the_chunk_size(model):
    """Under ZeRO-3 each module call is a parameter all-gather: the number of calls must not
    depend on how many completion tokens a rank's micro-batch holds (design.md section 8)."""
    from refdpo.shared.logprobs import PairScorer

    calls = []
    scorer = PairScorer(model, chunk_size=1)
    hooks = [
        m.register_forward_hook(lambda mod, i, o: calls.append(type(mod).__name__))
        for m in (scorer.head, model.get_output_embeddings(), model.get_decoder())
    ]
    for n in (1, 5):  # 1 pair or 5 pairs: very different token counts
        calls.clear()
        batch = pack_pairs(*random_pairs(seed=7, n=n), pad_token_id=0)
        out = pair_logps(scorer, batch)
        out.chosen_logps.sum().backward()
        assert calls == ["LlamaModel", "TokenLogps"], calls  # lm_head module never called
    for h in hooks:
        h.remove()
    model.zero_grad()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_rows_are_padded_to_the_device_multiple(model, device):
    """On CUDA every row length is a multiple of 128 (cuDNN's masked SDPA backward gives NaN
    at length % 128 == 64); the padding changes no log-prob."""
    from refdpo.shared.logprobs import pad_multiple_for, padded_length

    multiple = pad_multiple_for(device)
    assert multiple == (128 if device == "cuda" else 1)
    assert [padded_length(n, 128) for n in (1, 64, 128, 129, 192)] == [128, 128, 128, 256, 256]
    prompts, chosen, rejected = random_pairs(seed=8, n=4)
    plain = pack_pairs(prompts, chosen, rejected, 0)
    padded = pack_pairs(prompts, chosen, rejected, 0, pad_multiple=multiple)
    assert padded.input_ids.shape[1] % multiple == 0
    assert padded.input_ids.shape[1] - plain.input_ids.shape[1] < multiple
    with torch.inference_mode():
        want, got = pair_logps(model, plain), pair_logps(model, padded)
    torch.testing.assert_close(got.token_logps, want.token_logps, atol=1e-5, rtol=0)
