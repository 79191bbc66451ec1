"""Preference losses: hand-derived values, step-0 identities, gradients, spec parsing, and TRL.

Expected values are written out with math.log / math.exp from the numbers below; nothing here
calls the implementation to build an expectation (except the TRL comparison, which calls TRL).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from refdpo.shared.losses import (
    LOSSES,
    LossInputs,
    LossParams,
    RunningMean,
    combined_loss,
    diff_token_weights,
    parse_loss_spec,
    rewards,
    uses_reference,
)

LN2 = math.log(2.0)


def logsig(z: float) -> float:
    """log sigma(z) = -log(1 + e^-z), by hand."""
    return -math.log1p(math.exp(-z))


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def wavg(values: list[float], weights: list[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


# Two pairs, per token. Pair 0: |y_w| = 4, |y_l| = 5. Pair 1: |y_w| = 8, |y_l| = 6.
PC = [[-1, -2, -3, -4], [-2, -3, -2, -3, -2, -3, -2, -3]]  # policy chosen, sums -10, -20
RC = [[-1.5, -2, -2.5, -5], [-2, -3, -2, -3, -2, -3, -2, -2]]  # reference chosen, -11, -19
PR = [[-3, -2, -3, -4, -2], [-3, -3, -3, -3, -3, -3]]  # policy rejected, -14, -18
RR = [[-2, -2, -3, -2, -3], [-3, -3, -3, -3, -3, -4]]  # reference rejected, -12, -19
CW = [[1, 3, 1, 1], [1] * 8]  # token weights, chosen
RW = [[3, 1, 1, 1, 1], [1, 1, 1, 1, 1, 3]]  # token weights, rejected
# Sequence-level: a = pi_w - ref_w, b = pi_l - ref_l, h = a - b.
A, B = [1.0, -1.0], [-2.0, 1.0]
H = [3.0, -2.0]
LEN_W, LEN_L = [4, 8], [5, 6]


def padded(rows: list[list[float]], dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    values = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=dtype)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return values, mask


def make_inputs(pc, rc, pr, rr, cw=None, rw=None, baseline=None, dtype=torch.float64):
    """LossInputs from ragged per-token lists; sums and lengths derived from them."""
    pct, cmask = padded(pc, dtype)
    prt, rmask = padded(pr, dtype)
    rct, rrt = padded(rc, dtype)[0], padded(rr, dtype)[0]
    pct.requires_grad_(True)
    prt.requires_grad_(True)
    return LossInputs(
        policy_chosen_logps=pct.sum(-1),
        policy_rejected_logps=prt.sum(-1),
        reference_chosen_logps=rct.sum(-1),
        reference_rejected_logps=rrt.sum(-1),
        chosen_lengths=cmask.sum(-1),
        rejected_lengths=rmask.sum(-1),
        policy_chosen_token_logps=pct,
        policy_rejected_token_logps=prt,
        reference_chosen_token_logps=rct,
        reference_rejected_token_logps=rrt,
        chosen_mask=cmask,
        rejected_mask=rmask,
        chosen_token_weights=None if cw is None else padded(cw, dtype)[0],
        rejected_token_weights=None if rw is None else padded(rw, dtype)[0],
        reward_baseline=None if baseline is None else torch.tensor(baseline, dtype=dtype),
    )


def example(baseline: float | None = 0.3) -> LossInputs:
    return make_inputs(PC, RC, PR, RR, CW, RW, baseline)


def values(name: str, x: LossInputs, p: LossParams) -> list[float]:
    out = LOSSES[name](x, p)
    assert out.shape == (x.policy_chosen_logps.shape[0],)
    return out.tolist()


# ---- step-0 identity -----------------------------------------------------------------------


def identity_inputs(seed: int = 0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    lengths_w, lengths_l = [3, 7, 1, 5], [6, 2, 4, 5]
    chosen = [(-3 * torch.rand(n, generator=g)).tolist() for n in lengths_w]
    rejected = [(-3 * torch.rand(n, generator=g)).tolist() for n in lengths_l]
    weights_w = [[1.0 + i % 2 * 2.0 for i in range(n)] for n in lengths_w]
    weights_l = [[3.0 - i % 2 * 2.0 for i in range(n)] for n in lengths_l]
    return make_inputs(
        chosen, chosen, rejected, rejected, weights_w, weights_l, dtype=torch.float32
    )


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_step0_identity(beta: float, eps: float) -> None:
    x, p = identity_inputs(), LossParams(beta=beta, label_smoothing=eps, ld_alpha=0.3)
    for name in ("sigmoid", "sigmoid_avg", "token_weighted", "ld_dpo"):
        assert values(name, x, p) == pytest.approx([LN2] * 4, abs=1e-7), name
    assert values("hinge", x, p) == pytest.approx([1.0] * 4, abs=1e-7)
    assert values("ipo", x, p) == pytest.approx([(1 / (2 * beta)) ** 2] * 4, rel=1e-6)
    chosen_rewards, rejected_rewards = rewards(x, p)
    assert chosen_rewards.tolist() == [0.0] * 4 and rejected_rewards.tolist() == [0.0] * 4


# ---- each loss against its formula -----------------------------------------------------------

BETA, EPS = 0.5, 0.1
P = LossParams(beta=BETA, label_smoothing=EPS, simpo_gamma=0.4, ld_alpha=0.5)


def per_pair(f) -> list[float]:
    return [f(i) for i in range(2)]


def cdpo(z: float) -> float:
    return -(1 - EPS) * logsig(z) - EPS * logsig(-z)


def test_example_is_consistent() -> None:
    x = example()
    assert x.policy_chosen_logps.tolist() == [-10, -20]
    assert x.reference_chosen_logps.tolist() == [-11, -19]
    assert x.policy_rejected_logps.tolist() == [-14, -18]
    assert x.reference_rejected_logps.tolist() == [-12, -19]


HAND = {
    "sigmoid": lambda i: cdpo(BETA * H[i]),
    "hinge": lambda i: max(0.0, 1 - BETA * H[i]),
    "ipo": lambda i: (A[i] / LEN_W[i] - B[i] / LEN_L[i] - 1 / (2 * BETA)) ** 2,
    "robust": lambda i: (
        (-(1 - EPS) * logsig(BETA * H[i]) + EPS * logsig(-BETA * H[i])) / (1 - 2 * EPS)
    ),
    "bco_pair": lambda i: -logsig(BETA * A[i] - 0.3) - logsig(-(BETA * B[i] - 0.3)),
    "sppo_hard": lambda i: (A[i] - 0.5 / BETA) ** 2 + (B[i] + 0.5 / BETA) ** 2,
    "nca_pair": lambda i: (
        -logsig(BETA * A[i]) - 0.5 * logsig(-BETA * A[i]) - 0.5 * logsig(-BETA * B[i])
    ),
    "apo_zero": lambda i: 1 - sig(BETA * A[i]) + sig(BETA * B[i]),
    "apo_down": lambda i: sig(BETA * A[i]) + 1 - sig(BETA * A[i] - BETA * B[i]),
    # policy sums -10, -20 (chosen), -14, -18 (rejected); gamma 0.4
    "simpo": lambda i: cdpo(BETA * ([-10, -20][i] / LEN_W[i] - [-14, -18][i] / LEN_L[i]) - 0.4),
    "sft": lambda i: -[-10, -20][i] / LEN_W[i],
    "sigmoid_avg": lambda i: cdpo(BETA * (A[i] / LEN_W[i] - B[i] / LEN_L[i])),
    "token_weighted": lambda i: cdpo(
        BETA
        * (
            wavg([p - r for p, r in zip(PC[i], RC[i], strict=True)], CW[i])
            - wavg([p - r for p, r in zip(PR[i], RR[i], strict=True)], RW[i])
        )
    ),
}
# Token-weighted by hand: pair 0 chosen (0.5 + 0 - 0.5 + 1)/6 = 1/6, rejected (-3 - 2 + 1)/7;
# pair 1 chosen -1/8, rejected 3/8.
TOKEN_WEIGHTED_H = [1 / 6 - (-4 / 7), -1 / 8 - 3 / 8]
# LD-DPO, alpha = 0.5. Pair 0: l_p = 4; y_w fully public: a = 1; y_l public diff
# (-12) - (-9) = -3, tail (-2) - (-3) = 1. Pair 1: l_p = 6; y_w public diff 0, tail (-5) - (-4);
# y_l fully public: b = 1.
LD_H = [1 - (-3 + 0.5 * 1), (0 + 0.5 * -1) - 1]


def test_hand_values_cover_every_loss() -> None:
    assert set(HAND) | {"ld_dpo"} == set(LOSSES)


@pytest.mark.parametrize("name", sorted(HAND))
def test_loss_matches_hand_formula(name: str) -> None:
    assert values(name, example(), P) == pytest.approx(per_pair(HAND[name]), rel=1e-12)


def test_token_weighted_and_ld_dpo_hand_margins() -> None:
    assert per_pair(HAND["token_weighted"]) == pytest.approx(
        [cdpo(BETA * h) for h in TOKEN_WEIGHTED_H], rel=1e-12
    )
    assert values("ld_dpo", example(), P) == pytest.approx([cdpo(BETA * h) for h in LD_H])


def test_rewards_and_reference_free_rewards() -> None:
    chosen, rejected = rewards(example(), P)
    assert chosen.tolist() == pytest.approx([BETA * a for a in A])
    assert rejected.tolist() == pytest.approx([BETA * b for b in B])
    chosen, rejected = rewards(example(), P, reference_free=True)
    assert chosen.tolist() == pytest.approx([BETA * -10 / 4, BETA * -20 / 8])
    assert rejected.tolist() == pytest.approx([BETA * -14 / 5, BETA * -18 / 6])
    assert not uses_reference([("simpo", 1.0), ("sft", 0.1)])
    assert uses_reference([("sigmoid", 1.0), ("sft", 0.1)])


def test_sigmoid_gradient_signs() -> None:
    x = example()
    x.policy_chosen_logps.retain_grad()
    x.policy_rejected_logps.retain_grad()
    LOSSES["sigmoid"](x, P).sum().backward()
    assert (x.policy_chosen_logps.grad < 0).all()
    assert (x.policy_rejected_logps.grad > 0).all()
    # d/d pi_w of -log sigma(beta h) (eps = 0.1 smoothing) = -beta ((1-eps) - sigma(beta h))
    expected = [-BETA * ((1 - EPS) - sig(BETA * h)) for h in H]
    assert x.policy_chosen_logps.grad.tolist() == pytest.approx(expected)


def test_ld_alpha_one_is_sigmoid_and_unit_weights_are_sigmoid_avg() -> None:
    x = make_inputs(PC, RC, PR, RR, [[1.0] * 4, [1.0] * 8], [[1.0] * 5, [1.0] * 6])
    p = LossParams(beta=0.3, label_smoothing=0.05, ld_alpha=1.0)
    assert values("ld_dpo", x, p) == pytest.approx(values("sigmoid", x, p), rel=1e-12)
    assert values("token_weighted", x, p) == pytest.approx(values("sigmoid_avg", x, p), rel=1e-12)


def test_missing_inputs_are_named() -> None:
    x = LossInputs(*(torch.zeros(2) for _ in range(4)), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="reward_baseline"):
        LOSSES["bco_pair"](x, P)
    with pytest.raises(ValueError, match="chosen_mask"):
        LOSSES["ld_dpo"](x, P)
    with pytest.raises(ValueError, match="shapes"):
        LossInputs(torch.zeros(2), torch.zeros(3), *(torch.zeros(2) for _ in range(4)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"beta": math.inf},
        {"label_smoothing": 0.5},
        {"label_smoothing": -0.1},
        {"ld_alpha": 1.5},
        {"token_weight": 0.0},
        {"simpo_gamma": math.nan},
    ],
)
def test_loss_params_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LossParams(**kwargs)


# ---- token weights, running mean ---------------------------------------------------------


def test_diff_token_weights_changed_middle() -> None:
    # same prefix [1, 2] and suffix [9], middle [3, 4] replaced by [7]
    assert diff_token_weights([1, 2, 3, 4, 9], [1, 2, 7, 9], 3.0) == (
        [1.0, 1.0, 3.0, 3.0, 1.0],
        [1.0, 1.0, 3.0, 1.0],
    )


def test_diff_token_weights_insert_delete_identical() -> None:
    assert diff_token_weights([5, 6, 7], [5, 6, 7], 2.0) == ([1.0] * 3, [1.0] * 3)
    # y_w inserts 8 after the shared prefix: only the inserted token is changed
    assert diff_token_weights([5, 8, 6, 7], [5, 6, 7], 2.5) == ([1.0, 2.5, 1.0, 1.0], [1.0] * 3)
    # y_w drops y_l's last token
    assert diff_token_weights([5, 6], [5, 6, 7], 4.0) == ([1.0, 1.0], [1.0, 1.0, 4.0])
    assert diff_token_weights([], [1, 2], 3.0) == ([], [3.0, 3.0])


def test_running_mean_averages_batch_means() -> None:
    running = RunningMean()
    assert running.value == 0.0
    assert running.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert running.update(torch.tensor([0.0, 0.0, 3.0])) == pytest.approx(1.5)  # (2 + 1) / 2
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    assert restored.update(4.5) == pytest.approx(2.5)  # (2 + 1 + 4.5) / 3


# ---- spec parsing and the combined loss ----------------------------------------------------


def test_parse_loss_spec() -> None:
    assert parse_loss_spec("sigmoid:1,sft:0.2") == [("sigmoid", 1.0), ("sft", 0.2)]
    assert parse_loss_spec("ipo") == [("ipo", 1.0)]
    assert parse_loss_spec(" sigmoid : 0.8 , bco_pair:0.2, sft:1") == [
        ("sigmoid", 0.8),
        ("bco_pair", 0.2),
        ("sft", 1.0),
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dpo", "known losses: sigmoid, hinge"),
        ("", "unknown loss ''"),
        ("sigmoid,", "unknown"),
        ("sigmoid:x", "not a number"),
        ("sigmoid:0", "> 0"),
        ("sigmoid:-1", "> 0"),
        ("sigmoid:nan", "finite"),
        ("sigmoid:inf", "finite"),
        ("ipo,ipo:2", "twice"),
    ],
)
def test_parse_loss_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loss_spec(spec)


def test_combined_loss_is_weighted_sum_of_batch_means() -> None:
    x = example()
    total, terms = combined_loss(x, "sigmoid:1,sft:0.5", P)
    sigmoid_mean = (cdpo(BETA * 3.0) + cdpo(BETA * -2.0)) / 2
    sft_mean = (10 / 4 + 20 / 8) / 2
    assert float(total.detach()) == pytest.approx(sigmoid_mean + 0.5 * sft_mean, rel=1e-12)
    assert float(terms["sigmoid"]) == pytest.approx(sigmoid_mean, rel=1e-12)
    assert float(terms["sft"]) == pytest.approx(sft_mean, rel=1e-12)
    assert total.requires_grad and not terms["sigmoid"].requires_grad


# ---- TRL: the same per-pair losses from TRL's own loss code -----------------------------------

TRL_DPO_LOSSES = [
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "apo_down",
    "sft",
    "sigmoid_norm",
]
OURS = {"sigmoid_norm": "sigmoid_avg"}


class _FakeLM(torch.nn.Module):
    """Stands in for TRL's fused-LM-head model: returns fixed per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps: torch.Tensor) -> None:
        super().__init__()
        self.token_logps = token_logps

    def forward(self, input_ids, attention_mask, use_cache, labels, fused_lm_head):
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(
            log_probs=self.token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo_per_pair(loss: str, x: LossInputs, p: LossParams, ld_alpha: float | None) -> list:
    """TRL's DPOTrainer._compute_loss (TRL 1.x) run on one pair at a time."""
    from trl import DPOTrainer

    out = []
    for i in range(x.policy_chosen_logps.shape[0]):
        nw, nl = int(x.chosen_lengths[i]), int(x.rejected_lengths[i])
        t = max(nw, nl)

        def rows(chosen: torch.Tensor, rejected: torch.Tensor, i=i, t=t, nw=nw, nl=nl):
            r = torch.zeros(2, t, dtype=chosen.dtype)
            r[0, :nw], r[1, :nl] = chosen[i, :nw], rejected[i, :nl]
            return r

        policy = rows(x.policy_chosen_token_logps.detach(), x.policy_rejected_token_logps.detach())
        ref = rows(x.reference_chosen_token_logps, x.reference_rejected_token_logps)
        completion_mask = torch.zeros(2, 1 + t, dtype=torch.long)  # column 0 is the prompt
        completion_mask[0, 1 : 1 + nw], completion_mask[1, 1 : 1 + nl] = 1, 1
        trainer = object.__new__(DPOTrainer)
        attrs = dict(
            model=_FakeLM(policy),
            ref_model=_FakeLM(ref),
            beta=p.beta,
            label_smoothing=p.label_smoothing,
            loss_types=[loss],
            loss_weights=[1.0],
            ld_alpha=ld_alpha,
            f_divergence_type="reverse_kl",
            use_weighting=False,
            aux_loss_enabled=False,
            precompute_ref_logps=False,
            _tp_size=1,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            accelerator=SimpleNamespace(
                device=torch.device("cpu"), gather=lambda v: v, gather_for_metrics=lambda v: v
            ),
        )
        for key, value in attrs.items():
            setattr(trainer, key, value)
        inputs = {
            "input_ids": torch.zeros(2, 1 + t, dtype=torch.long),
            "attention_mask": torch.ones(2, 1 + t, dtype=torch.long),
            "completion_mask": completion_mask,
        }
        out.append(float(trainer._compute_loss(trainer.model, inputs, return_outputs=False)))
    return out


def random_inputs(seed: int, n: int = 6) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    lw = torch.randint(1, 12, (n,), generator=g).tolist()
    ll = torch.randint(1, 12, (n,), generator=g).tolist()
    pc = [(-4 * torch.rand(k, generator=g, dtype=torch.float64)).tolist() for k in lw]
    pr = [(-4 * torch.rand(k, generator=g, dtype=torch.float64)).tolist() for k in ll]
    rc = [[v + 0.7 * float(torch.randn(1, generator=g)) for v in r] for r in pc]
    rr = [[v + 0.7 * float(torch.randn(1, generator=g)) for v in r] for r in pr]
    return make_inputs(pc, rc, pr, rr, baseline=0.0)


@pytest.fixture(scope="module")
def trl():
    trl = pytest.importorskip("trl")
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss") or hasattr(DPOTrainer, "dpo_loss"):
        pytest.skip(f"harness targets TRL 1.x's DPOTrainer._compute_loss, found {trl.__version__}")
    return trl


SETTINGS = [(seed, beta, eps) for seed in (0, 1) for beta in (0.05, 0.5, 2.0) for eps in (0.0, 0.3)]


@pytest.mark.parametrize(("seed", "beta", "eps"), SETTINGS)
def test_matches_trl_dpo_trainer(trl, seed: int, beta: float, eps: float) -> None:
    """TRL 1.x: sigmoid and sigmoid_norm have no label smoothing and bco_pair no running baseline,
    so those compare at eps = 0 and reward_baseline = 0. TRL's sft is a batch token mean, equal to
    ours on one pair."""
    x, p = random_inputs(seed), LossParams(beta=beta, label_smoothing=eps)
    for loss in TRL_DPO_LOSSES:
        if eps > 0 and loss in ("sigmoid", "sigmoid_norm"):
            continue
        ours = values(OURS.get(loss, loss), x, p)
        assert ours == pytest.approx(trl_dpo_per_pair(loss, x, p, None), abs=1e-6), loss


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ld_dpo_matches_trl_ld_alpha(trl, alpha: float, beta: float) -> None:
    x, p = random_inputs(7), LossParams(beta=beta, ld_alpha=alpha)
    expected = trl_dpo_per_pair("sigmoid", x, p, alpha)
    assert values("ld_dpo", x, p) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("seed", "beta", "eps"), SETTINGS)
def test_simpo_and_cdpo_match_trl_cpo_loss(trl, seed: int, beta: float, eps: float) -> None:
    """SimPO from TRL's CPOTrainer.cpo_loss on per-token averages; cDPO (sigmoid with eps > 0,
    dropped from TRL 1.x's DPOTrainer) from the same smoothed-sigmoid code fed the log-ratios."""
    from trl.experimental.cpo import CPOTrainer

    x, p = random_inputs(seed), LossParams(beta=beta, label_smoothing=eps, simpo_gamma=0.7)
    trainer = object.__new__(CPOTrainer)
    for key, value in dict(
        alpha=0.0,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=0.7,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    ).items():
        setattr(trainer, key, value)
    with torch.no_grad():
        trainer.loss_type = "simpo"
        expected, *_ = trainer.cpo_loss(x.policy_chosen_avg_logps, x.policy_rejected_avg_logps)
        assert values("simpo", x, p) == pytest.approx(expected.tolist(), abs=1e-6)
        trainer.loss_type = "sigmoid"
        a = x.policy_chosen_logps - x.reference_chosen_logps
        b = x.policy_rejected_logps - x.reference_rejected_logps
        expected, *_ = trainer.cpo_loss(a, b)
        assert values("sigmoid", x, p) == pytest.approx(expected.tolist(), abs=1e-6)
