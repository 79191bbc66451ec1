"""The pair mask in its two forms (shared/attention.py) against independent constructions,
and the FlexAttention path's log-probs against SDPA and a naive forward per sequence."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from refdpo.shared.attention import (
    CHOSEN,
    REJECTED,
    attention_bias,
    block_mask,
    block_tables,
)
from refdpo.shared.logprobs import Packer, pack_pairs, packer_for, pad_multiple_for, pair_logps
from refdpo.shared.models import resolve_attention, use_pair_sdpa
from tests.conftest import build_model
from tests.test_logprobs import naive_token_logps

VOCAB = 300


def naive_allowed(pair: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """The mask rule written out on [rows, L, L] booleans: causal within a pair, rejected
    never sees chosen, padding sees itself. Shape (rows, L, L)."""
    length = pair.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_pair = (pair[:, :, None] == pair[:, None, :]) & (pair[:, :, None] >= 0)
    rejected_sees_chosen = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
    return (same_pair & causal & ~rejected_sees_chosen) | torch.eye(length, dtype=torch.bool)


def random_layout(seed: int, pairs: int, longest: int, rows, pad_multiple: int):
    g = torch.Generator().manual_seed(seed)

    def ids() -> list[int]:
        n = int(torch.randint(1, longest, (1,), generator=g))
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    parts = [[ids() for _ in range(pairs)] for _ in range(3)]
    return parts, pack_pairs(*parts, pad_token_id=0, rows=rows, pad_multiple=pad_multiple)


LAYOUTS = {
    "one_pair_per_row": (4, 300, None),
    "packed": (6, 200, [[0, 3, 5], [1], [2, 4]]),
    "one_long_row": (5, 120, [[0, 1, 2, 3, 4]]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("pad_multiple", [1, 128])
def test_dense_mask_equals_the_rule_written_out(name, pad_multiple):
    pairs, longest, rows = LAYOUTS[name]
    _, batch = random_layout(1, pairs, longest, rows, pad_multiple)
    bias = attention_bias(batch.pair_index, batch.part, torch.bfloat16)
    assert bias.shape == (batch.input_ids.shape[0], 1, *batch.input_ids.shape[1:] * 2)
    assert set(bias.unique().tolist()) <= {0.0, torch.finfo(torch.bfloat16).min}
    assert torch.equal(bias[:, 0] == 0, naive_allowed(batch.pair_index, batch.part))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_block_tables_equal_torchs_own_block_mask(name):
    """torch's create_block_mask evaluates the written-out rule on every position; refdpo's
    tables come from the key intervals per block. Their empty/partial/full blocks agree."""
    from torch.nn.attention.flex_attention import create_block_mask

    pairs, longest, rows = LAYOUTS[name]
    _, batch = random_layout(2, pairs, longest, rows, pad_multiple=128)
    allowed = naive_allowed(batch.pair_index, batch.part)
    rows_, length = batch.pair_index.shape
    want = create_block_mask(
        lambda b, h, q, k: allowed[b, q, k], rows_, None, length, length, device="cpu"
    )
    mask = block_mask(batch.pair_index, batch.part)
    for field in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(mask, field), getattr(want, field)), field
    for field in ("kv_indices", "full_kv_indices"):  # the listed blocks, in order
        counts = getattr(want, field.replace("indices", "num_blocks"))
        for b in range(rows_):
            for q in range(counts.shape[-1]):
                n = int(counts[b, 0, q])
                got = getattr(mask, field)[b, 0, q, :n]
                assert torch.equal(got, getattr(want, field)[b, 0, q, :n]), (field, b, q)
    # the mask_mod agrees with the rule on every position of the partial blocks, too
    b, q, k = (t.reshape(-1) for t in torch.meshgrid(
        torch.arange(rows_), torch.arange(length), torch.arange(length), indexing="ij"
    ))  # fmt: skip
    assert torch.equal(mask.mask_mod(b, None, q, k).view(rows_, length, length), allowed)


def test_block_tables_never_call_a_cut_block_full():
    _, batch = random_layout(3, 3, 100, [[0, 1, 2]], pad_multiple=1)  # length not / 128
    partial, full = block_tables(batch.pair_index, batch.part)
    assert batch.pair_index.shape[1] % 128 != 0
    assert not full[:, :, -1].any() and partial[:, -1, -1].all()


class LargestTensors(TorchDispatchMode):
    """Records the size, in elements, of every distinct storage an operation returns (views
    of one tensor count once)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return out

    @property
    def sizes(self) -> list[int]:
        return list(self.storages.values())


def test_no_length_squared_tensor_on_the_flex_path_and_one_on_the_dense_path():
    length = 8192
    batch = pack_pairs([[1] * 2000], [[2] * 3100], [[3] * 3092], 0, pad_multiple=128)
    assert batch.pair_index.shape[1] == length
    with LargestTensors() as seen:
        block_mask(batch.pair_index, batch.part)
    assert max(seen.sizes) <= length * length // 64  # the block table: L x L / 128 at most
    with LargestTensors() as seen:
        attention_bias(batch.pair_index, batch.part, torch.float32)
    assert sum(n >= length * length for n in seen.sizes) == 1  # the mask itself, nothing else
    assert max(n for n in seen.sizes if n < length * length) <= length * length // 4  # slabs


@pytest.fixture(scope="module")
def model():
    return build_model(VOCAB, seed=4)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_flex_logps_equal_sdpa_and_a_naive_forward(model, name):
    pairs, longest, rows = LAYOUTS[name]
    (prompts, chosen, rejected), batch = random_layout(5, pairs, longest, rows, 128)
    try:
        with torch.inference_mode():
            model.config._attn_implementation = "sdpa"
            dense = pair_logps(model, batch, chunk_size=64)
            model.config._attn_implementation = "flex_attention"
            flex = pair_logps(model, batch, chunk_size=64)
    finally:
        model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(flex.token_logps, dense.token_logps, atol=1e-5, rtol=0)
    flex_chosen, flex_rejected = flex.per_token()
    for i in range(pairs):
        want_c = naive_token_logps(model, prompts[i], chosen[i])
        want_r = naive_token_logps(model, prompts[i], rejected[i])
        torch.testing.assert_close(flex_chosen[i], want_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(flex_rejected[i], want_r, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")
def test_flex_gradients_equal_sdpa_on_cuda():
    model = build_model(VOCAB, seed=6).cuda().train()
    _, batch = random_layout(7, 6, 200, [[0, 3, 5], [1], [2, 4]], 128)
    grads = {}
    for kernel in ("sdpa", "flex_attention"):
        model.config._attn_implementation = kernel
        model.zero_grad()
        pair_logps(model, batch, chunk_size=64).token_logps.sum().backward()
        grads[kernel] = [p.grad.clone() for p in model.parameters()]
    for flex, dense in zip(grads["flex_attention"], grads["sdpa"], strict=True):
        torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


def test_auto_picks_flex_only_on_cuda_for_models_that_support_it():
    model = build_model(VOCAB, seed=8)
    assert resolve_attention(model, torch.device("cpu")) == "sdpa_pairs"
    assert model._supports_flex_attn  # Llama does
    assert resolve_attention(model, torch.device("cuda")) == "flex_attention"
    assert model.config._attn_implementation == "flex_attention"
    model.set_attn_implementation("sdpa")
    model._supports_flex_attn = False
    assert resolve_attention(model, torch.device("cuda")) == "sdpa_pairs"


@pytest.fixture
def spans_always(monkeypatch):
    """sdpa_pairs on every row length, and a count of the calls that took spans."""
    import refdpo.shared.attention as attention
    import refdpo.shared.logprobs as logprobs

    monkeypatch.setattr(logprobs, "SPANS_FROM", 1)
    calls = []
    real = attention.pair_sdpa_attention

    def counted(*args, pair_spans=None, **kwargs):
        calls.append(pair_spans is not None)
        return real(*args, pair_spans=pair_spans, **kwargs)

    attention.register_pair_sdpa()
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_pairs", counted)
    yield calls
    AttentionInterface.register("sdpa_pairs", real)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_pair_sdpa_spans_give_the_dense_values_and_gradients(name, spans_always):
    """Per-pair causal SDPA calls against the dense mask through plain sdpa, forward and
    backward on CPU, and against a naive forward per sequence."""
    pairs, longest, rows = LAYOUTS[name]
    (prompts, chosen, rejected), batch = random_layout(10, pairs, longest, rows, 1)
    model = build_model(VOCAB, seed=11).train()
    results = {}
    for kernel in ("sdpa", "sdpa_pairs"):
        model.set_attn_implementation(kernel)
        model.zero_grad()
        out = pair_logps(model, batch, chunk_size=64)
        out.token_logps.sum().backward()
        results[kernel] = out.token_logps.detach(), [p.grad.clone() for p in model.parameters()]
    assert spans_always and all(spans_always)  # the span path ran, in every layer
    torch.testing.assert_close(results["sdpa_pairs"][0], results["sdpa"][0], atol=1e-5, rtol=0)
    for spans, dense in zip(results["sdpa_pairs"][1], results["sdpa"][1], strict=True):
        torch.testing.assert_close(spans, dense, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        got_chosen, got_rejected = pair_logps(model, batch).per_token()
    for i in range(pairs):
        want = naive_token_logps(model, prompts[i], chosen[i])
        torch.testing.assert_close(got_chosen[i], want, atol=1e-5, rtol=0)
        want = naive_token_logps(model, prompts[i], rejected[i])
        torch.testing.assert_close(got_rejected[i], want, atol=1e-5, rtol=0)


def test_pair_sdpa_on_a_long_row_keeps_no_length_squared_tensor_in_forward_or_backward():
    batch = pack_pairs([[1] * 2000], [[2] * 3100], [[3] * 3092], 0)  # 8192 tokens: spans
    model = build_model(VOCAB, seed=12).train()
    model.set_attn_implementation("sdpa")
    assert use_pair_sdpa(model)
    with LargestTensors() as seen:
        pair_logps(model, batch, chunk_size=512).token_logps.sum().backward()
    length = batch.input_ids.shape[1]
    assert max(seen.sizes) < length * length // 8, max(seen.sizes)


def test_packer_follows_the_kernel():
    model = build_model(VOCAB, seed=9)
    lengths = [300, 40, 50, 260, 30]
    dense = packer_for(model.config)
    assert not dense.block_sparse and len(dense.rows(lengths)) > 1  # attention cost: apart
    model.config._attn_implementation = "flex_attention"
    sparse = packer_for(model.config)
    assert sparse.block_sparse and sparse.rows(lengths) == [[0, 3, 2, 1, 4]]  # one row
    assert Packer(500, block_sparse=True).rows(lengths) == [[0, 2, 1, 4], [3]]  # capacity wins
    assert pad_multiple_for("cpu", "flex_attention") == 128 and pad_multiple_for("cpu") == 1


def test_pair_sdpa_outside_the_pair_layout_is_plain_sdpa():
    """Generation and plain forwards (refdpo eval, the demo) with padding masks: the same
    logits as transformers' own sdpa."""
    model = build_model(VOCAB, seed=13)
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        assert use_pair_sdpa(model)
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-6, rtol=0)
