"""Stage one end to end on a tiny random Llama: shards, invariants, resume, ranks, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from refdpo.precompute.inspect import main as inspect_main
from refdpo.precompute.inspect import validate
from refdpo.precompute.run import main as precompute_main
from refdpo.shared.shards import MANIFEST, read_manifest
from tests.conftest import SHARED_DATA, build_model, build_tokenizer, torchrun, write_jsonl

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def good_rows(n: int, offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 7))
        rows.append(
            {
                "prompt": f"Question {i}: say {words}.",
                "chosen": f"Sure: {words}.",
                "rejected": f"No {i}.",
            }
        )
    return rows


BAD_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "missing_field"),
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "empty_chosen"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "empty_rejected"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "long " * 300, "chosen": "a", "rejected": "b"}, "prompt_too_long"),
    ("{not json", "malformed_line"),
]


def run(*args: str | Path) -> int:
    return precompute_main([str(a) for a in args])


def base_args(model_dir: Path, dataset: Path, output: Path, *extra) -> list:
    return [
        "--model",
        model_dir,
        "--dataset",
        dataset,
        "--output",
        output,
        "--max-length",
        128,
        "--max-prompt-length",
        64,
        "--rows-per-shard",
        8,
        "--batch-size",
        3,
        *extra,
    ]


def read_sorted(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder).sort_values("id").reset_index(drop=True)


def naive_logps(model, prompt_ids, completion_ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(completion_ids)])).logits[0].float()
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return logits.log_softmax(-1)[positions, torch.tensor(list(completion_ids))]


def test_shards_hold_the_contract(tmp_path, tiny_model_dir, tokenizer):
    rows = good_rows(20)
    rows[7:7] = [r for r, _ in BAD_ROWS]
    rows.append(dict(rows[0]))  # same content as row 0: a duplicate id
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0

    df = pd.read_parquet(out)  # pandas reads the folder directly: one row per pair
    manifest = read_manifest(out)
    assert len(df) == manifest["rows"] == 20
    expected = {reason: 1 for _, reason in BAD_ROWS} | {"duplicate_id": 1}
    assert manifest["dropped"] == expected
    assert (
        manifest["rows"] + sum(manifest["dropped"].values()) == manifest["input_rows"] == len(rows)
    )
    assert len(manifest["shards"]) == 4 and df["id"].is_unique
    validate(out)  # checksums, per-row invariants

    # stored ids are the tokenizer's, EOS-terminated; values match an independent naive forward
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for _, row in df.iterrows():
        assert list(row.prompt_ids) == tokenizer(row.prompt)["input_ids"]
        assert list(row.chosen_ids) == tokenizer(row.chosen)["input_ids"] + [tokenizer.eos_token_id]
        for side, ids in (("win", row.chosen_ids), ("rej", row.rejected_ids)):
            want = naive_logps(model, row.prompt_ids, ids)
            got = torch.tensor(row[f"ref_{side}_per_token_logp"])
            assert (got - want).abs().max() < 1e-4
            assert row[f"ref_{side}_logp"] == pytest.approx(float(want.sum()), abs=1e-3)
            assert row[f"ref_{side}_avg_logp"] == pytest.approx(row[f"ref_{side}_logp"] / len(ids))

    provenance = manifest["provenance"]
    assert provenance["model"]["fingerprint"] and provenance["tokenizer"]["fingerprint"]
    assert provenance["truncation"]["max_length"] == 128 and "rule" in provenance["truncation"]
    assert provenance["dataset"]["fingerprint"] and provenance["software"]["torch"]


def test_rerun_of_complete_folder_changes_nothing(tmp_path, tiny_model_dir, caplog):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(10))
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert "already complete" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_run.json"} == {
        k: v for k, v in before.items() if k != "_run.json"
    }


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model_dir, caplog):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(10))
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    args = base_args(tiny_model_dir, dataset, out)
    args[args.index("--max-length") + 1] = 100
    assert run(*args) == 2  # a refused folder
    assert "max_length=128" in caplog.text and "--overwrite" in caplog.text
    assert run(*args, "--overwrite") == 0
    assert read_manifest(out)["provenance"]["truncation"]["max_length"] == 100


def test_eval_fraction_writes_a_disjoint_eval_folder(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(30))
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "all")) == 0
    assert (
        run(
            *base_args(
                tiny_model_dir, dataset, tmp_path / "train", "--eval-fraction", 0.2, "--seed", 3
            )
        )
        == 0
    )
    train, held = pd.read_parquet(tmp_path / "train"), pd.read_parquet(tmp_path / "train-eval")
    assert len(held) == 6 and not set(train.id) & set(held.id)
    assert set(train.id) | set(held.id) == set(pd.read_parquet(tmp_path / "all").id)
    validate(tmp_path / "train-eval")


def test_implicit_prompt_hh_file(tmp_path, tiny_model_dir, tokenizer):
    rows = [
        {
            "chosen": f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: fine, thanks {i}.",
            "rejected": f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: go away.",
        }
        for i in range(5)
    ]
    dataset = write_jsonl(tmp_path / "hh.jsonl", rows)
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "out")) == 0
    df = pd.read_parquet(tmp_path / "out")
    assert all(p.endswith("\n\nHuman: and?\n\nAssistant:") for p in df.prompt)
    assert set(df.rejected) == {" go away."}


def test_conversational_rows_use_the_chat_template(tmp_path, tiny_model_dir, tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say {w}"}],
            "chosen": [{"role": "assistant", "content": w}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for w in WORDS[:4]
    ]
    dataset = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "out")) == 0
    df = pd.read_parquet(tmp_path / "out")
    row = df.iloc[0]
    assert row.prompt == f"<|im_start|>user\nSay {row.chosen}<|im_end|>\n<|im_start|>assistant\n"
    assert list(row.chosen_ids)[-1] == tokenizer.eos_token_id
    assert list(row.chosen_ids).count(tokenizer.eos_token_id) == 1


def test_shared_data_file_with_template(tmp_path, tiny_model_dir):
    template = "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}"
    out = tmp_path / "out"
    code = run(
        *base_args(
            tiny_model_dir,
            SHARED_DATA,
            out,
            "--prompt-template",
            template,
            "--chat-template",
            "--limit",
            40,
            "--max-length",
            512,
            "--max-prompt-length",
            256,
        )
    )
    assert code == 0
    manifest, summary = validate(out)
    assert (
        manifest["input_rows"] == 40 and summary["rows"] + sum(manifest["dropped"].values()) == 40
    )
    source = json.loads(SHARED_DATA.read_text())[:40]
    df = pd.read_parquet(out)
    first = next(r for r in source if r["input"])
    assert any(first["instruction"] + "\n\n" + first["input"] in p for p in df.prompt)


def test_two_ranks_give_the_same_rows(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(40))
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "one")) == 0
    args = [str(a) for a in base_args(tiny_model_dir, dataset, tmp_path / "two")]
    cmd = torchrun(2, 29531, "refdpo.precompute.run", args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    files = sorted(p.name for p in (tmp_path / "two").glob("*.parquet"))
    assert {f[:10] for f in files} == {"part-00000", "part-00001"}
    one, two = read_sorted(tmp_path / "one"), read_sorted(tmp_path / "two")
    pd.testing.assert_frame_equal(one, two, check_exact=False, atol=1e-6)
    validate(tmp_path / "two")


def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(400))
    args = [str(a) for a in base_args(tiny_model_dir, dataset, tmp_path / "killed")]
    args[args.index("--rows-per-shard") + 1] = "40"
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "refdpo.precompute.run", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "killed"
    deadline = time.monotonic() + 240
    while (
        not list(folder.glob("part-*.parquet"))
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / MANIFEST).exists(), "the run finished before the kill; make it longer"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert 1 <= len(kept) < 10

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert {
        p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet") if p.name in kept
    } == kept
    assert not list(folder.glob(".*.tmp"))
    args[args.index(str(folder))] = str(tmp_path / "clean")
    assert run(*args) == 0
    pd.testing.assert_frame_equal(read_sorted(folder), read_sorted(tmp_path / "clean"))


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "stray", "no_manifest"])
def test_inspect_names_the_damaged_shard(tmp_path, tiny_model_dir, capsys, damage):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(20))
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert inspect_main([str(out)]) == 0
    target = out / "part-00000-00001.parquet"
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    elif damage == "stray":
        target = out / "part-00007-00000.parquet"
        target.write_bytes((out / "part-00000-00000.parquet").read_bytes())
    else:
        (out / MANIFEST).unlink()
    capsys.readouterr()
    assert inspect_main([str(out)]) == 1
    err = capsys.readouterr().err
    assert (MANIFEST if damage == "no_manifest" else target.name) in err


def test_inspect_catches_values_that_break_the_invariants(tmp_path, tiny_model_dir, capsys):
    """A shard rewritten with a wrong sum (and a matching checksum) is still caught."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refdpo.shared.shards import sha256_file

    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(5))
    out = tmp_path / "out"
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    path = out / "part-00000-00000.parquet"
    table = pq.read_table(path)
    values = table["ref_win_logp"].to_pylist()
    values[2] += 0.5
    table = table.set_column(
        table.schema.get_field_index("ref_win_logp"), "ref_win_logp", pa.array(values)
    )
    pq.write_table(table, path)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"][0]["sha256"] = sha256_file(path)
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert inspect_main([str(out)]) == 1
    assert "ref_win_logp != sum" in capsys.readouterr().err


def test_adapter_is_applied(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(4))
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "plain")) == 0
    assert (
        run(
            *base_args(tiny_model_dir, dataset, tmp_path / "sft", "--adapter", tmp_path / "adapter")
        )
        == 0
    )
    plain, sft = read_sorted(tmp_path / "plain"), read_sorted(tmp_path / "sft")
    assert (
        plain.ref_win_logp - sft.ref_win_logp
    ).abs().min() > 1e-3  # the adapter changed the model
    peft_model.eval()
    for _, row in sft.iterrows():
        want = naive_logps(peft_model, row.prompt_ids, row.chosen_ids)
        assert (torch.tensor(row.ref_win_per_token_logp) - want).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing_model", 2, "does not exist"),
        ("missing_dataset", 2, "does not exist"),
        ("bad_extension", 2, "unknown file type"),
        ("output_under_a_file", 2, "not writable"),
        ("no_usable_rows", 2, "no usable rows"),
    ],
)
def test_bad_setup_fails_before_loading_the_model(
    tmp_path, tiny_model_dir, caplog, case, code, message
):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(3))
    model, output = tiny_model_dir, tmp_path / "out"
    if case == "missing_model":
        model = tmp_path / "nope"
    elif case == "missing_dataset":
        dataset = tmp_path / "nope.jsonl"
    elif case == "bad_extension":
        dataset = tmp_path / "pairs.txt"
        dataset.write_text("x")
    elif case == "output_under_a_file":
        output = dataset / "out"
    else:
        dataset = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}] * 3)
    assert run(*base_args(model, dataset, output)) == code
    assert message in caplog.text
    assert "loading reference" not in caplog.text


def test_job_array_tasks_then_finalize(tmp_path, tiny_model_dir, monkeypatch):
    """Array tasks run one after the other: the last one to finish writes the manifest."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(30))
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert {p.name[:10] for p in out.glob("*.parquet")} == {"part-00001"}
    assert not (out / MANIFEST).exists()
    assert run(*base_args(tiny_model_dir, dataset, out, "--finalize-only")) == 0  # task 8 of 7-8
    assert not (out / MANIFEST).exists()  # task 7's shards are still missing
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert run(*base_args(tiny_model_dir, dataset, out)) == 0
    assert read_manifest(out)["rows"] == 30
    validate(out)


def test_generation_prompt_unlike_a_past_answer_keeps_every_row(tmp_path, tokenizer, caplog):
    """A DeepSeek-R1-style template (its generation prompt opens <think>) dropped every row
    after the model loaded; now each is split at the first differing token and counted."""
    from tests.test_tokens import THINK_TEMPLATE

    think = build_tokenizer()
    think.chat_template = THINK_TEMPLATE
    model_dir = tmp_path / "think-model"
    build_model(len(think)).save_pretrained(model_dir)
    think.save_pretrained(model_dir)
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in good_rows(6)
    ]  # fmt: skip
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    assert run(*base_args(model_dir, dataset, out)) == 0
    manifest = read_manifest(out)
    assert manifest["rows"] == 6 and manifest["truncated"]["boundary_moved"] == 6
    assert "6 pair(s) whose prompt does not end on a token boundary" in caplog.text
    df = read_sorted(out)
    assert all("<think>" not in think.decode(ids) for ids in df.prompt_ids)
    # --chat-template-kwargs from a YAML mapping reaches the template: the generation prompt
    # then ends in an empty think block, which is still not what precedes a past answer
    config = tmp_path / "run.yaml"
    config.write_text("chat_template_kwargs:\n  enable_thinking: false\n")
    out2 = tmp_path / "out2"
    assert run("--config", config, *base_args(model_dir, dataset, out2)) == 0
    df2 = read_sorted(out2)
    assert all("</think>" in p for p in df2.prompt)
    assert read_manifest(out2)["provenance"]["dataset"]["chat_template_kwargs"] == {
        "enable_thinking": False
    }


def test_default_batching_is_a_token_budget_with_packed_rows(tmp_path, tiny_model_dir, caplog):
    """No batching flag: one forward holds up to 16384 tokens (24 pairs here, not the 8 pairs
    of the old default), its pairs packed into rows by stage two's cost model; the log says so
    and the shard records it. Other batching on a rerun changes no shard: not refused."""
    from transformers import AutoConfig

    from refdpo.shared.logprobs import Packer, attention_weight
    from refdpo.shared.shards import shard_metadata

    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(24))
    out = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--dataset", dataset, "--output", out]
    assert run(*args) == 0
    assert "batches of up to 16384 tokens, packed into rows of least modeled work" in caplog.text
    (path,) = out.glob("part-*.parquet")
    scoring = shard_metadata(path)["scoring"]
    assert scoring["batching"] == {
        "max_tokens_per_batch": 16384, "batch_size": None, "packing": True, "pack_length": 0,
        "attn_implementation": "sdpa_pairs",  # auto on CPU
    }  # fmt: skip
    df = pd.read_parquet(path)
    tokens = [len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in df.itertuples()]
    batch = sorted(range(len(df)), key=lambda i: -tokens[i])  # the only forward, longest first
    packer = Packer(0, attention_weight(AutoConfig.from_pretrained(tiny_model_dir)))
    rows = [[batch[k] for k in row] for row in packer.rows([tokens[i] for i in batch])]
    assert scoring["batches"] == [rows] and any(len(row) > 1 for row in rows)
    caplog.clear()
    assert run(*args, "--max-tokens-per-batch", 50, "--packing", "false") == 0
    assert "already complete" in caplog.text


@pytest.mark.parametrize(
    ("case", "flags"),
    [("pair_cap", ("--per-device-batch-size", 5)), ("pair_cap", ("--precompute_ref_batch_size", 5)),
     ("one_per_row", ("--packing", "false")),
     ("budget", ("--max-tokens-per-batch", 150, "--pack-length", 100))],
    ids=["per_device_batch_size", "trl_alias", "packing_false", "budget_and_pack_length"],
)  # fmt: skip
def test_batching_options_shape_the_recorded_layout(tmp_path, tiny_model_dir, case, flags):
    """A pair count caps each forward; --packing false gives one pair per row; the token
    budget and a fixed row length bound the forwards and rows. The values stay those of a
    naive forward (fp32)."""
    from transformers import AutoModelForCausalLM

    from refdpo.shared.shards import shard_metadata

    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(20))
    out = tmp_path / "out"
    assert run("--model", tiny_model_dir, "--dataset", dataset, "--output", out, *flags) == 0
    (path,) = out.glob("part-*.parquet")
    scoring, df = shard_metadata(path)["scoring"], pd.read_parquet(path)
    tokens = [len(r.prompt_ids) + len(r.chosen_ids) + len(r.rejected_ids) for r in df.itertuples()]
    batches = scoring["batches"]
    assert sorted(i for b in batches for row in b for i in row) == list(range(20))
    if case == "pair_cap":
        assert scoring["batching"]["batch_size"] == 5 and len(batches) == 4
        assert all(sum(map(len, b)) == 5 for b in batches)
    elif case == "one_per_row":
        assert not scoring["batching"]["packing"] and len(batches) == 1
        assert all(len(row) == 1 for row in batches[0])
    else:
        assert len(batches) > 1
        assert all(sum(tokens[i] for row in b for i in row) <= 150 for b in batches)
        assert all(sum(tokens[i] for i in row) <= 100 for b in batches for row in b)
        assert any(len(row) > 1 for b in batches for row in b)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row in df.itertuples():
        want = naive_logps(model, row.prompt_ids, row.rejected_ids)
        assert (torch.tensor(row.ref_rej_per_token_logp) - want).abs().max() < 1e-5
