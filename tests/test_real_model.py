"""Acceptance on the real SmolLM2-135M-Instruct (fetched from PyPI, cached): stored per-token
reference log-probs equal an independent plain-transformers computation to 1e-4 per token."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from refdpo.precompute.inspect import validate
from refdpo.precompute.run import main as precompute_main
from tests.conftest import REPO, SHARED_DATA, write_jsonl

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def smol():
    from refdpo.shared.demo_model import fetch_demo_model

    return fetch_demo_model(verify=False)


def naive_check(model_dir, df: pd.DataFrame) -> float:
    """Largest per-token difference between the shards and separate full forwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for _, row in df.iterrows():
        for side, ids in (("win", row.chosen_ids), ("rej", row.rejected_ids)):
            seq = torch.tensor([list(row.prompt_ids) + list(ids)])
            with torch.no_grad():
                logps = model(seq).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(row.prompt_ids) - 1, seq.shape[1] - 1)
            want = logps[pos, torch.tensor(list(ids))]
            worst = max(
                worst, float((torch.tensor(row[f"ref_{side}_per_token_logp"]) - want).abs().max())
            )
    return worst


def test_shared_data_pairs_match_naive(tmp_path, smol):
    out = tmp_path / "shards"
    code = precompute_main(
        [
            "--config",
            str(REPO / "jobs" / "instruction-data.yaml"),
            "--dataset",
            str(SHARED_DATA),
            "--model",
            str(smol),
            "--output",
            str(out),
            "--limit",
            "24",
            "--eval-fraction",
            "0",
            "--dtype",
            "fp32",
        ]
    )
    assert code == 0
    _manifest, summary = validate(out)
    df = pd.read_parquet(out)
    assert len(df) == summary["rows"] >= 20
    assert df.prompt.iloc[0].startswith("<|im_start|>")
    assert naive_check(smol, df) < TOLERANCE


def test_hh_style_implicit_prompt_matches_naive(tmp_path, smol):
    rows = [
        {
            "chosen": f"\n\nHuman: What is {a} plus {a}?\n\nAssistant: It is {2 * a}.",
            "rejected": f"\n\nHuman: What is {a} plus {a}?\n\nAssistant: I don't know, maybe {a}.",
        }
        for a in range(2, 10)
    ]
    dataset = write_jsonl(tmp_path / "hh.jsonl", rows)
    out = tmp_path / "shards"
    assert (
        precompute_main(
            [
                "--model",
                str(smol),
                "--dataset",
                str(dataset),
                "--output",
                str(out),
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    df = pd.read_parquet(out)
    assert len(df) == 8 and all(p.endswith("Assistant:") for p in df.prompt)
    assert naive_check(smol, df) < TOLERANCE
    # the reference should prefer the correct answer more often than not
    assert (df.ref_win_avg_logp > df.ref_rej_avg_logp).mean() > 0.5
