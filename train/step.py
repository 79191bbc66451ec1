"""One micro-batch through the policy: losses and the metrics TRL users know.

Nothing here touches a reference model: the reference values come from the shards.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pad_sequence

from refdpo.shared import faults
from refdpo.shared.errors import NonFiniteError, Step0Error  # noqa: F401 (re-exported)
from refdpo.shared.logprobs import pair_logps
from refdpo.shared.losses import (
    LossInputs,
    LossParams,
    RunningMean,
    combined_loss,
    diff_token_weights,
    rewards,
    uses_reference,
)
from refdpo.train.data import TrainBatch


def _nan_gradient(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("nan"))


def guard_loss(loss: torch.Tensor) -> torch.Tensor:
    """A NaN/inf loss must never reach an update, even where its gradients would be finite
    (a non-finite term no weight feeds): make every gradient NaN so the optimizer's
    gradient check (engine.skip_nonfinite_steps, DeepSpeed's own) skips the step on every rank.
    Decided on the device (no host sync): the hook passes a finite loss's gradient unchanged."""
    finite = torch.isfinite(loss.detach())
    loss.register_hook(lambda grad: torch.where(finite, grad, _nan_gradient(grad)))
    return loss


def _inf_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad * float("inf")


def inject_faults(loss: torch.Tensor, step: int) -> torch.Tensor:
    """Test-only fault points (shared/faults.py): a NaN loss whose gradients are finite (a
    NaN constant added: only guard_loss can stop that update), or a finite loss whose
    gradients are inf. Identity unless REFDPO_FAULTS arms them."""
    if faults.active("nan_loss", step):
        loss = loss + float("nan")
    if faults.active("inf_grad", step):
        loss.register_hook(_inf_gradient)
    return loss


def _weights(batch: TrainBatch, token_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [
        diff_token_weights(c, r, token_weight)
        for c, r in zip(batch.chosen_ids, batch.rejected_ids, strict=True)
    ]
    chosen = pad_sequence([torch.tensor(w) for w, _ in pairs], batch_first=True)
    rejected = pad_sequence([torch.tensor(w) for _, w in pairs], batch_first=True)
    return chosen, rejected


def loss_inputs(
    model: torch.nn.Module,
    batch: TrainBatch,
    chunk_size: int,
    needs_weights: bool,
    token_weight: float,
) -> LossInputs:
    """Policy log-probs of the micro-batch beside the stored reference values."""
    out = pair_logps(model, batch.packed, chunk_size)
    device = out.chosen_logps.device
    chosen_tokens, rejected_tokens = out.per_token()
    ref = {k: getattr(batch, k).to(device, non_blocking=True) for k in (
        "reference_chosen_logps", "reference_rejected_logps", "reference_chosen_token_logps",
        "reference_rejected_token_logps", "chosen_mask", "rejected_mask")}  # fmt: skip
    weights = _weights(batch, token_weight) if needs_weights else (None, None)
    return LossInputs(
        policy_chosen_logps=out.chosen_logps,
        policy_rejected_logps=out.rejected_logps,
        chosen_lengths=out.chosen_lengths,
        rejected_lengths=out.rejected_lengths,
        policy_chosen_token_logps=pad_sequence(chosen_tokens, batch_first=True),
        policy_rejected_token_logps=pad_sequence(rejected_tokens, batch_first=True),
        chosen_token_weights=None if weights[0] is None else weights[0].to(device),
        rejected_token_weights=None if weights[1] is None else weights[1].to(device),
        **ref,
    )


@dataclass
class MicroResult:
    loss: torch.Tensor  # scalar, with graph in training
    sums: dict[str, torch.Tensor]  # metric sums over the micro-batch's pairs, on the device
    pairs: int
    tokens: int


def metric_sums(
    x: LossInputs, params: LossParams, terms: dict[str, torch.Tensor], n: int, reference_free: bool
) -> dict[str, torch.Tensor]:
    """Per-pair metric values summed (divided by the pair count across ranks later). They stay
    on the device as float64 scalars: read on logging steps only, so a step never waits for
    the device to report them."""
    chosen, rejected = (r.detach() for r in rewards(x, params, reference_free))
    sums = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "rewards/accuracies": (chosen > rejected).float().sum(),
        "rewards/margins": (chosen - rejected).sum(),
        "logps/chosen": x.policy_chosen_logps.detach().sum(),
        "logps/rejected": x.policy_rejected_logps.detach().sum(),
        "logps/ref_chosen": x.reference_chosen_logps.sum(),
        "logps/ref_rejected": x.reference_rejected_logps.sum(),
    }
    sums.update({f"loss/{name}": value.detach() * n for name, value in terms.items()})
    return {k: v.double() for k, v in sums.items()}


def run_micro(
    model: torch.nn.Module,
    batch: TrainBatch,
    spec: list[tuple[str, float]],
    params: LossParams,
    chunk_size: int,
    running: RunningMean | None = None,
    pooled: bool = False,
    real: bool = True,
) -> MicroResult:
    """Loss and metric sums of one micro-batch; `running` is BCO-pair's reward baseline,
    updated first from this micro-batch's mean reward over the ranks (TRL gathers the rewards
    of every process), so every rank holds the same baseline. The ranks' micro-batches hold
    the same number of pairs, or with `pooled` (micro-batches by a token budget) any number:
    the rewards' sum and count are all-reduced, a padding micro-batch's (`real` False) as
    zeros. A padding micro-batch's metric sums and counts are zeros too."""
    names = {name for name, _ in spec}
    x = loss_inputs(model, batch, chunk_size, "token_weighted" in names, params.token_weight)
    if running is not None:
        chosen, rejected = rewards(x, params)
        running.update(mean_over_ranks(torch.cat([chosen, rejected]), pooled, real))
        x.reward_baseline = torch.tensor(running.value, device=chosen.device)
    loss, terms = combined_loss(x, spec, params)
    sums = metric_sums(x, params, terms, batch.size, reference_free=not uses_reference(spec))
    sums["loss"] = loss.detach().double() * batch.size
    if not real:  # same collectives as a real micro-batch, no weight in the means
        sums = {k: torch.zeros_like(v) for k, v in sums.items()}
        return MicroResult(loss=loss, sums=sums, pairs=0, tokens=0)
    return MicroResult(loss=loss, sums=sums, pairs=batch.size, tokens=batch.packed.num_tokens)


def mean_over_ranks(values: torch.Tensor, pooled: bool, real: bool = True) -> torch.Tensor:
    """Mean of `values` over every rank's micro-batch, fp64. Not pooled: the ranks'
    micro-batches hold as many values, so the mean of the ranks' means. Pooled: the sum over
    the values of every rank / their count (one all-reduce of both); a padding micro-batch
    (`real` False) joins the all-reduce with zeros. Shape: values (n,); returns ()."""
    values = values.detach().double()
    several = dist.is_initialized() and dist.get_world_size() > 1
    if not pooled:
        mean = values.mean()
        if several:
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        return mean
    total = torch.stack([values.sum(), values.new_tensor(float(values.numel()))])
    total = total if real else torch.zeros_like(total)
    if several:
        dist.all_reduce(total)
    return total[0] / total[1]


def backward_micro(
    engine, loss: torch.Tensor, pairs: int, rank_share: int | None, last: bool
) -> None:
    """Backward of one micro-batch's loss (a mean over its `pairs` pairs), so that a step's
    gradient is the mean over the global batch's pairs.

    rank_share None: every micro-batch holds the same number of pairs and DeepSpeed scales
    each loss by 1 / accumulation steps. Otherwise (micro-batches by a token budget: any
    number per step, of any size) the loss is weighted by pairs / rank_share, rank_share being
    the global batch / ranks: DeepSpeed's mean over the ranks then gives the global mean
    (a padding micro-batch, 0 pairs, weighs 0). The accumulation boundary is ours then
    (`last`), not DeepSpeed's micro-step count, so the update and the learning-rate schedule
    still advance once per step; it is set before the backward, where ZeRO reads it."""
    if rank_share is None:
        engine.backward(loss)
        return
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss * (pairs / rank_share), scale_wrt_gas=False)


def reduce_means(
    results: list[MicroResult], device: torch.device
) -> tuple[dict[str, float], int, int]:
    """Means over every pair of every rank: (metrics, pairs, tokens). One all-reduce and one
    device-to-host copy; every rank must call it at the same steps with the same metric names
    (eval padding batches carry zero sums, so the names agree)."""
    totals: dict[str, torch.Tensor] = defaultdict(
        lambda: torch.zeros((), dtype=torch.float64, device=device)
    )
    for r in results:
        for k, v in r.sums.items():
            totals[k] = totals[k] + v.to(device)
    keys = sorted(totals)
    counts = torch.tensor(
        [sum(r.pairs for r in results), sum(r.tokens for r in results)],
        dtype=torch.float64, device=device,
    )  # fmt: skip
    packed = torch.cat([torch.stack([totals[k] for k in keys]), counts]) if keys else counts
    if dist.is_initialized():
        dist.all_reduce(packed)
    values = packed.tolist()
    pairs, tokens = int(values[-2]), int(values[-1])
    return {k: values[i] / max(pairs, 1) for i, k in enumerate(keys)}, pairs, tokens


# Step-0 check tolerances: the largest per-pair mean |policy - stored| per-token log-prob
# allowed. Same dtype in stage one's layout: the same computation, so only kernel noise is
# left (0 measured on CPU, bf16 included, with 2 threads in stage one and 1 per rank in stage
# two); the margin is for another GPU model or library version. Another layout in bf16:
# matmuls are not batch-invariant, so padding and packing alone move values by up to 0.08
# nats per token. Across dtypes, the rounding of the lower precision: measured on 40 pairs of
# ../shared/data with SmolLM2-135M (max per-pair mean), fp32 vs bf16 0.057, fp32 vs fp16
# 0.0082, bf16 vs fp16 0.055; the tolerances leave about 2.5x. Values shifted by 0.01 per
# token, or a model of another seed, are caught in fp32 (tests/test_faults.py).
SAME_LAYOUT = {"fp32": 1e-4, "bf16": 5e-3, "fp16": 1e-3}
OTHER_LAYOUT = {"fp32": 1e-4, "bf16": 1.5e-1, "fp16": 2e-2}
ACROSS_DTYPES = {frozenset(("fp32", "bf16")): 1.5e-1, frozenset(("fp32", "fp16")): 2e-2}


def step0_tolerance(policy_dtype: str, stored_dtype: str, same_layout: bool) -> float:
    """The step-0 tolerance for a policy in `policy_dtype` against shards scored in
    `stored_dtype`, in the layout stage one used (same_layout) or in a training layout."""
    if policy_dtype == stored_dtype:
        return (SAME_LAYOUT if same_layout else OTHER_LAYOUT)[policy_dtype]
    return ACROSS_DTYPES.get(frozenset((policy_dtype, stored_dtype)), OTHER_LAYOUT["bf16"])


@torch.no_grad()
def step0_difference(model, batch: TrainBatch, chunk_size: int) -> float:
    """Largest per-pair mean |policy - stored| per-token log-prob on this rank's batch.

    Runs in eval mode (no dropout), as stage one scored the reference.
    """
    was_training = model.training
    model.eval()
    out = pair_logps(model, batch.packed, chunk_size)
    model.train(was_training)
    chosen, rejected = out.per_token()
    worst = 0.0
    for i in range(batch.size):
        for tokens, stored, mask in (
            (chosen[i], batch.reference_chosen_token_logps[i], batch.chosen_mask[i]),
            (rejected[i], batch.reference_rejected_token_logps[i], batch.rejected_mask[i]),
        ):
            diff = (tokens.float().cpu() - stored[mask]).abs().mean()
            worst = max(worst, float(diff))
    return worst
