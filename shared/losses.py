"""Preference losses on stored reference log-probs: one small function per loss, keyed by name.

Notation (DPO paper): pi_w, pi_l are the policy's summed completion log-probs
log pi_theta(y_w|x), log pi_theta(y_l|x); ref_w, ref_l the reference's, stored by stage one;
h = (pi_w - ref_w) - (pi_l - ref_l). Every loss maps (LossInputs, LossParams) to per-pair
losses of Shape (B,); `combined_loss` takes the weighted batch mean. Where a loss exists in
TRL, the formula follows TRL's DPOTrainer (CPOTrainer for SimPO); tests/test_losses.py
compares against the installed TRL.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossInputs:
    """One batch of B pairs. Sums are over completion tokens; per-token tensors are right-padded
    with zeros to (B, T) and masks are True on real tokens. Optional fields are needed only by
    the losses that read them (token_weighted, ld_dpo, bco_pair)."""

    policy_chosen_logps: Tensor  # (B,) fp32, requires grad
    policy_rejected_logps: Tensor  # (B,)
    reference_chosen_logps: Tensor  # (B,) stored, no grad
    reference_rejected_logps: Tensor  # (B,)
    chosen_lengths: Tensor  # (B,) int, completion token counts
    rejected_lengths: Tensor  # (B,)
    policy_chosen_token_logps: Tensor | None = None  # (B, Tc)
    policy_rejected_token_logps: Tensor | None = None  # (B, Tr)
    reference_chosen_token_logps: Tensor | None = None  # (B, Tc)
    reference_rejected_token_logps: Tensor | None = None  # (B, Tr)
    chosen_mask: Tensor | None = None  # (B, Tc) bool
    rejected_mask: Tensor | None = None  # (B, Tr) bool
    chosen_token_weights: Tensor | None = None  # (B, Tc) token-weighted DPO
    rejected_token_weights: Tensor | None = None  # (B, Tr)
    reward_baseline: Tensor | None = None  # scalar, BCO-pair running mean of rewards

    def __post_init__(self) -> None:
        shapes = [tuple(getattr(self, f.name).shape) for f in fields(self)[:6]]
        if len(set(shapes)) != 1 or len(shapes[0]) != 1:
            raise ValueError(f"the six (B,) tensors of LossInputs have shapes {shapes}")

    @property
    def policy_chosen_avg_logps(self) -> Tensor:
        return _avg(self.policy_chosen_logps, self.chosen_lengths)

    @property
    def policy_rejected_avg_logps(self) -> Tensor:
        return _avg(self.policy_rejected_logps, self.rejected_lengths)

    def require(self, loss_name: str, *fields: str) -> None:
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"loss {loss_name!r} needs LossInputs fields {missing}")


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the losses; each loss reads the ones it names."""

    beta: float = 0.1  # KL strength (DPO beta; IPO tau; SimPO's beta, typically 2.0-2.5)
    label_smoothing: float = 0.0  # eps: cDPO/robust flip rate; also sigmoid variants, SimPO
    simpo_gamma: float = 0.5  # SimPO target reward margin gamma
    ld_alpha: float = 1.0  # LD-DPO weight of tokens beyond the public length; 1 = plain DPO
    token_weight: float = 3.0  # gamma of RLHF-V DDPO: weight of changed tokens (data prep)

    def __post_init__(self) -> None:
        checks = {
            "beta must be finite and > 0": math.isfinite(self.beta) and self.beta > 0,
            "label_smoothing must be in [0, 0.5)": 0.0 <= self.label_smoothing < 0.5,
            "simpo_gamma must be finite and >= 0": math.isfinite(self.simpo_gamma)
            and self.simpo_gamma >= 0,
            "ld_alpha must be in [0, 1]": 0.0 <= self.ld_alpha <= 1.0,
            "token_weight must be finite and > 0": math.isfinite(self.token_weight)
            and self.token_weight > 0,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid LossParams {self}: {'; '.join(failed)}")


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z); equals ln 2 at z = 0 for every eps."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _avg(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average: sum / completion length (at least 1). Shape: (B,)."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


def _logratios(x: LossInputs, average: bool = False) -> tuple[Tensor, Tensor]:
    """(pi_w - ref_w, pi_l - ref_l), on sums or, with average, per-token means. Shapes: (B,)."""
    a = x.policy_chosen_logps - x.reference_chosen_logps
    b = x.policy_rejected_logps - x.reference_rejected_logps
    if average:
        return _avg(a, x.chosen_lengths), _avg(b, x.rejected_lengths)
    return a, b


def _h(x: LossInputs, average: bool = False) -> Tensor:
    """h = (pi_w - ref_w) - (pi_l - ref_l). Shape: (B,)."""
    a, b = _logratios(x, average)
    return a - b


def sigmoid_loss(x: LossInputs, p: LossParams) -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7) with cDPO label smoothing eps (Mitchell 2023):
    L = -(1-eps) log sigma(beta h) - eps log sigma(-beta h). Shape: (B,)."""
    return _smoothed_sigmoid(p.beta * _h(x), p.label_smoothing)


def hinge_loss(x: LossInputs, p: LossParams) -> Tensor:
    """SLiC-HF calibration loss (Zhao et al. 2023) on the DPO margin:
    L = max(0, 1 - beta h). Shape: (B,)."""
    return torch.relu(1.0 - p.beta * _h(x))


def ipo_loss(x: LossInputs, p: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, Eq. 17): L = (h_avg - 1/(2 beta))^2 with beta = tau. As in TRL,
    h_avg is h on per-token AVERAGE log-probs (sum / completion length), not on sums.
    Shape: (B,)."""
    return (_h(x, average=True) - 1.0 / (2.0 * p.beta)) ** 2


def robust_loss(x: LossInputs, p: LossParams) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label-flip rate eps:
    L = (-(1-eps) log sigma(beta h) + eps log sigma(-beta h)) / (1 - 2 eps). Shape: (B,)."""
    eps, z = p.label_smoothing, p.beta * _h(x)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(x: LossInputs, p: LossParams) -> Tensor:
    """BCO, pairwise form (Jung et al. 2024), as TRL 0.x: r_w = beta (pi_w - ref_w),
    r_l = beta (pi_l - ref_l), delta = x.reward_baseline (kept by a `RunningMean`):
    L = -log sigma(r_w - delta) - log sigma(-(r_l - delta)). Shape: (B,)."""
    x.require("bco_pair", "reward_baseline")
    r_w, r_l = rewards(x, p)
    delta = torch.as_tensor(x.reward_baseline, dtype=r_w.dtype, device=r_w.device).detach()
    return -F.logsigmoid(r_w - delta) - F.logsigmoid(-(r_l - delta))


def sppo_hard_loss(x: LossInputs, p: LossParams) -> Tensor:
    """SPPO, hard labels (Wu et al. 2024, Eq. 4.7 with P = 1 for y_w, 0 for y_l), as TRL:
    a = pi_w - ref_w, b = pi_l - ref_l, L = (a - 1/(2 beta))^2 + (b + 1/(2 beta))^2.
    Shape: (B,)."""
    a, b = _logratios(x)
    return (a - 0.5 / p.beta) ** 2 + (b + 0.5 / p.beta) ** 2


def nca_pair_loss(x: LossInputs, p: LossParams) -> Tensor:
    """NCA, pairwise (Chen et al. 2024), as TRL: with r_w, r_l the DPO rewards,
    L = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l). Shape: (B,)."""
    r_w, r_l = rewards(x, p)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def apo_zero_loss(x: LossInputs, p: LossParams) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7), as TRL; raises y_w, lowers y_l:
    L = 1 - sigma(r_w) + sigma(r_l). Shape: (B,)."""
    r_w, r_l = rewards(x, p)
    return 1.0 - torch.sigmoid(r_w) + torch.sigmoid(r_l)


def apo_down_loss(x: LossInputs, p: LossParams) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), as TRL; lowers both, y_l more:
    L = sigma(r_w) + 1 - sigma(r_w - r_l), r_w - r_l = beta h. Shape: (B,)."""
    r_w, r_l = rewards(x, p)
    return torch.sigmoid(r_w) + 1.0 - torch.sigmoid(r_w - r_l)


def simpo_loss(x: LossInputs, p: LossParams) -> Tensor:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free and length-normalised, with label
    smoothing as TRL's CPOTrainer: z = beta (pi_w/|y_w| - pi_l/|y_l|) - gamma,
    L = -(1-eps) log sigma(z) - eps log sigma(-z). Shape: (B,)."""
    z = p.beta * (x.policy_chosen_avg_logps - x.policy_rejected_avg_logps) - p.simpo_gamma
    return _smoothed_sigmoid(z, p.label_smoothing)


def sft_loss(x: LossInputs, p: LossParams) -> Tensor:
    """NLL of y_w per token: L = -pi_w / |y_w|. Shape: (B,). RPO (Pang et al. 2024) is
    "sigmoid:1,sft:alpha". TRL's "sft" averages over all chosen tokens of the batch instead,
    which agrees when the chosen lengths are equal."""
    return -x.policy_chosen_avg_logps


def sigmoid_avg_loss(x: LossInputs, p: LossParams) -> Tensor:
    """DPO on per-token averages (RLAIF-V `dpo_use_average`, TRL `sigmoid_norm`):
    h_avg = (pi_w - ref_w)/|y_w| - (pi_l - ref_l)/|y_l|,
    L = -(1-eps) log sigma(beta h_avg) - eps log sigma(-beta h_avg). Shape: (B,)."""
    return _smoothed_sigmoid(p.beta * _h(x, average=True), p.label_smoothing)


def _per_token_logratios(x: LossInputs, name: str) -> tuple[Tensor, Tensor]:
    """Per-token log pi - log pi_ref for y_w and y_l. Shapes: (B, Tc), (B, Tr)."""
    x.require(
        name,
        "policy_chosen_token_logps",
        "policy_rejected_token_logps",
        "reference_chosen_token_logps",
        "reference_rejected_token_logps",
        "chosen_mask",
        "rejected_mask",
    )
    return (
        x.policy_chosen_token_logps - x.reference_chosen_token_logps,
        x.policy_rejected_token_logps - x.reference_rejected_token_logps,
    )


def _weighted_avg(values: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t m_t v_t / sum_t w_t m_t. Shape: (B, T) -> (B,)."""
    w = weights.to(values.dtype) * mask.to(values.dtype)
    return (values * w).sum(-1) / w.sum(-1).clamp(min=torch.finfo(w.dtype).tiny)


def token_weighted_loss(x: LossInputs, p: LossParams) -> Tensor:
    """Dense DPO (DDPO) of RLHF-V (Yu et al. 2024; RLAIF-V `dpo_token_weighted`): sequence score
    log pi(y|x) = (1/N) [sum_unchanged log p_t + gamma sum_changed log p_t], N = |y_u| + gamma
    |y_c|, a weighted token average (weights from `diff_token_weights`) for policy and
    reference alike; then the cDPO loss on the resulting h. Shape: (B,)."""
    x.require("token_weighted", "chosen_token_weights", "rejected_token_weights")
    a, b = _per_token_logratios(x, "token_weighted")
    h = _weighted_avg(a, x.chosen_mask, x.chosen_token_weights) - _weighted_avg(
        b, x.rejected_mask, x.rejected_token_weights
    )
    return _smoothed_sigmoid(p.beta * h, p.label_smoothing)


def _ld_sum(values: Tensor, mask: Tensor, public: Tensor, alpha: float) -> Tensor:
    """sum of v_t over the first `public` real tokens + alpha * sum over the rest. (B, T) -> (B,)."""
    position = mask.long().cumsum(-1)  # 1-based index among real tokens
    head = mask & (position <= public.unsqueeze(-1))
    tail = mask & (position > public.unsqueeze(-1))
    zero = values.new_zeros(())
    return torch.where(head, values, zero).sum(-1) + alpha * torch.where(tail, values, zero).sum(-1)


def ld_dpo_loss(x: LossInputs, p: LossParams) -> Tensor:
    """LD-DPO (Liu et al. 2024, length desensitization), as TRL's `ld_alpha`: with the public
    length l_p = min(|y_w|, |y_l|), log pi(y|x) = sum_{t<=l_p} log p_t + alpha sum_{t>l_p} log p_t
    for policy and reference; then the cDPO loss. alpha = 1 is plain DPO. Shape: (B,)."""
    a, b = _per_token_logratios(x, "ld_dpo")
    public = torch.minimum(x.chosen_mask.sum(-1), x.rejected_mask.sum(-1))
    h = _ld_sum(a, x.chosen_mask, public, p.ld_alpha) - _ld_sum(
        b, x.rejected_mask, public, p.ld_alpha
    )
    return _smoothed_sigmoid(p.beta * h, p.label_smoothing)


LossFn = Callable[[LossInputs, LossParams], Tensor]
LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "simpo": simpo_loss,
    "sft": sft_loss,
    "sigmoid_avg": sigmoid_avg_loss,
    "token_weighted": token_weighted_loss,
    "ld_dpo": ld_dpo_loss,
}
# Losses that never read the reference log-probs; a spec made only of these needs no stage one.
REFERENCE_FREE = frozenset({"simpo", "sft"})


def rewards(x: LossInputs, p: LossParams, reference_free: bool = False) -> tuple[Tensor, Tensor]:
    """Implicit rewards for metrics: r_w = beta (pi_w - ref_w), r_l = beta (pi_l - ref_l); with
    reference_free (SimPO) beta * pi/|y|, as TRL's CPOTrainer reports. Shapes: (B,), (B,)."""
    if reference_free:
        return p.beta * x.policy_chosen_avg_logps, p.beta * x.policy_rejected_avg_logps
    return (
        p.beta * (x.policy_chosen_logps - x.reference_chosen_logps),
        p.beta * (x.policy_rejected_logps - x.reference_rejected_logps),
    )


def uses_reference(spec: list[tuple[str, float]]) -> bool:
    """Whether any loss in the spec reads the stored reference log-probs."""
    return any(name not in REFERENCE_FREE for name, _ in spec)


TRL_NAMES = {"sigmoid_norm": "sigmoid_avg"}  # TRL's name -> refdpo's, the same loss


def spec_from_trl(
    loss: str, weights: str | None, rpo_alpha: float | None, ld_alpha: float | None
) -> str:
    """A refdpo spec from TRL's forms: loss_type names with loss_weights ("sigmoid,sft" and
    "1,0.2" -> "sigmoid:1,sft:0.2"), TRL's names, TRL 0.x's rpo_alpha (an sft term) and
    ld_alpha, which TRL applies to the sigmoid loss: here that loss is ld_dpo."""
    items = []
    for item in (i.strip() for i in loss.split(",") if i.strip()):
        name, sep, weight = item.partition(":")
        items.append(TRL_NAMES.get(name, name) + sep + weight)
    if weights is not None:
        if any(":" in item for item in items):
            raise ValueError("give loss weights once: in --loss-type or in --loss-weights")
        parts = [w.strip() for w in weights.split(",")]
        if len(parts) != len(items):
            raise ValueError(f"--loss-weights has {len(parts)} weights for {len(items)} losses")
        items = [f"{item}:{weight}" for item, weight in zip(items, parts, strict=True)]
    names = [item.partition(":")[0] for item in items]
    if rpo_alpha is not None:
        if "sft" in names:
            raise ValueError("--rpo-alpha adds the sft loss, which --loss-type has already")
        items.append(f"sft:{rpo_alpha}")
    if ld_alpha is not None and not 0 <= ld_alpha <= 1:
        raise ValueError("ld_alpha must be in [0, 1]")
    if ld_alpha not in (None, 1.0) and "ld_dpo" not in names:
        if "sigmoid" not in names:
            raise ValueError(
                "--ld-alpha weights the sigmoid loss (refdpo's ld_dpo); length "
                f"desensitization of {', '.join(names)} is not implemented"
            )
        i = names.index("sigmoid")
        items[i] = "ld_dpo" + items[i][len("sigmoid") :]
    return ",".join(items)


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """Parse "sigmoid:1,sft:0.2" into [("sigmoid", 1.0), ("sft", 0.2)]; a bare name weighs 1."""
    known = ", ".join(LOSSES)
    out: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, weight_text = (s.strip() for s in item.partition(":"))
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; known losses: {known}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} in {spec!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight of {name!r} in {spec!r} must be finite and > 0")
        if any(name == seen for seen, _ in out):
            raise ValueError(f"loss {name!r} appears twice in {spec!r}")
        out.append((name, weight))
    return out


def combined_loss(
    x: LossInputs, spec: list[tuple[str, float]] | str, p: LossParams
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = sum_k w_k mean_B(L_k). Returns (scalar loss, {name: detached batch mean of L_k})."""
    if isinstance(spec, str):
        spec = parse_loss_spec(spec)
    terms = {name: LOSSES[name](x, p).mean() for name, _ in spec}
    total = sum(weight * terms[name] for name, weight in spec)
    return total, {name: term.detach() for name, term in terms.items()}


class RunningMean:
    """Running mean of BCO-pair rewards: delta = mean over steps of each step's batch reward.

    TRL (<= 0.2x) kept `RunningMoments` and, every step before the loss, updated it with the
    mean of the concatenated chosen and rejected rewards, one sample per step; `update` does
    the same. With several ranks the caller all-reduces (averages) that batch mean first, so
    every rank holds the same delta; no collectives live here.
    """

    def __init__(self) -> None:
        self.count = 0
        self.value = 0.0

    def update(self, rewards: Tensor | float) -> float:
        """Add the mean of `rewards` (e.g. torch.cat([r_w, r_l])) as one sample; return delta."""
        batch_mean = float(torch.as_tensor(rewards, dtype=torch.float64).mean())
        self.count += 1
        self.value += (batch_mean - self.value) / self.count
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.value = int(state["count"]), float(state["value"])


def diff_token_weights(
    chosen_ids: list[int], rejected_ids: list[int], token_weight: float
) -> tuple[list[float], list[float]]:
    """RLHF-V's changed segments: y_w is a corrected y_l, so tokens inside the segments where the
    two differ (difflib opcodes other than "equal", autojunk off) weigh `token_weight`, matched
    tokens 1.0. Returns (chosen_weights, rejected_weights), lengths as the inputs."""
    chosen = [1.0] * len(chosen_ids)
    rejected = [1.0] * len(rejected_ids)
    matcher = difflib.SequenceMatcher(None, chosen_ids, rejected_ids, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            chosen[i1:i2] = [token_weight] * (i2 - i1)
            rejected[j1:j2] = [token_weight] * (j2 - j1)
    return chosen, rejected
