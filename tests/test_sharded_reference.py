"""Stage one with a reference that is not whole on one worker: partitioned over the ranks
with ZeRO-3 (--zero-stage 3) or placed by accelerate (--device-map). The shards, their
provenance and what stage two makes of them must be those of an unsharded run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from refdpo.precompute import run as precompute_run
from refdpo.precompute.inspect import validate
from refdpo.shared.shards import MANIFEST, METADATA_KEY, WRITE_BLOCK
from tests import faultkit
from tests.conftest import torchrun, write_jsonl
from tests.test_precompute import BAD_ROWS, base_args, good_rows, read_sorted, run
from tests.test_train import ENV, LN2, metrics, run_train, train_args

# 801 training rows in shards of 150: rank 0 writes 3 full shards, rank 1 two full ones and
# one of 51 rows, so the ranks run different numbers of forwards and finish at different
# times; the 89 eval rows make one shard, rank 0's, so rank 1 has no eval work at all
FLAGS = ("--rows-per-shard", "150", "--per-device-batch-size", "8", "--eval-fraction", "0.1",
         "--keep-text")  # fmt: skip


# a rank left waiting in a collective (the lockstep broken) fails in 2 minutes, not 30
ZERO3 = ("--zero-stage", "3", "--dist-timeout", "120")


def dataset_with_bad_rows(path: Path) -> Path:
    rows = good_rows(890)
    for k, (bad, _) in enumerate(BAD_ROWS[:-1]):  # dropped rows in both ranks' shards
        rows[200 + 37 * k] = bad
    return write_jsonl(path, rows)


def args_for(model: Path, dataset: Path, output: Path, *extra) -> list[str]:
    args = [str(a) for a in base_args(model, dataset, output, *FLAGS, *extra)]
    i = args.index("--batch-size")  # base_args caps at 3 pairs; FLAGS sets 8
    del args[i : i + 2]
    return args


def zero3_command(args: list[str], ranks: int = 2, port: int = 29741) -> list[str]:
    return torchrun(ranks, port, "refdpo.precompute.run", [*args, *ZERO3])


def deepspeed_command(args: list[str], ranks: int = 2, port: int = 29745) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port),
            "--module", "refdpo.precompute.run", *args, *ZERO3]  # fmt: skip


def metadata(folder: Path) -> list[dict]:
    return [
        json.loads(pq.read_schema(p).metadata[METADATA_KEY])
        for p in sorted(folder.glob("part-*.parquet"))
    ]


def assert_same_values(got: Path, want: Path, atol: float = 1e-6) -> None:
    a, b = read_sorted(got), read_sorted(want)
    assert list(a.id) == list(b.id)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert all(list(x) == list(y) for x, y in zip(a[column], b[column], strict=True)), column
    for side in ("win", "rej"):
        x = np.concatenate(list(a[f"ref_{side}_per_token_logp"]))
        y = np.concatenate(list(b[f"ref_{side}_per_token_logp"]))
        assert x.shape == y.shape and np.abs(x - y).max() <= atol, side
        assert np.allclose(a[f"ref_{side}_logp"], b[f"ref_{side}_logp"], atol=1e-5)


def dummy_forwards(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"(\d+) dummy forward", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The same dataset scored by one unsharded worker and by 2 ranks under ZeRO-3."""
    root = tmp_path_factory.mktemp("sharded")
    dataset = dataset_with_bad_rows(root / "pairs.jsonl")
    assert run(*args_for(tiny_model_dir, dataset, root / "whole")) == 0
    zero3 = zero3_command(args_for(tiny_model_dir, dataset, root / "zero3"))
    result = subprocess.run(zero3, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dataset, root, result.stderr


@pytest.mark.multirank
def test_two_ranks_under_zero3_write_what_one_whole_reference_writes(runs):
    _, root, log = runs
    for split in ("", "-eval"):
        got, want = root / f"zero3{split}", root / f"whole{split}"
        assert_same_values(got, want)
        validate(got)
        manifest, clean = (json.loads((f / MANIFEST).read_text()) for f in (got, want))
        assert manifest["rows"] == clean["rows"] and manifest["dropped"] == clean["dropped"]
    assert {p.name[:10] for p in (root / "zero3").glob("part-*")} == {"part-00000", "part-00001"}
    # the ranks did finish at different times, and the one done first kept joining
    assert max(dummy_forwards(log)) > 0, log[-3000:]
    placement = metadata(root / "zero3")[0]["scoring"]["placement"]
    assert placement == {"placement": "zero3", "ranks": 2, "offload": False}


@pytest.mark.multirank
def test_the_fingerprint_is_of_the_whole_weights_not_a_partition(runs):
    _, root, _ = runs
    prints = {m["provenance"]["model"]["fingerprint"] for m in metadata(root / "zero3")}
    assert prints == {m["provenance"]["model"]["fingerprint"] for m in metadata(root / "whole")}
    assert len(prints) == 1


@pytest.mark.multirank
def test_stage_two_step0_identity_holds_on_shards_written_under_zero3(
    runs, tiny_model_dir, tmp_path
):
    _, root, _ = runs
    args = train_args(root, tiny_model_dir, tmp_path / "run", "--max-steps", 1,
                      "--export", "none")  # fmt: skip
    args[args.index("--shards") + 1] = str(root / "zero3")
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    first = metrics(tmp_path / "run")[1]
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert first["grad_norm"] > 0 and math.isfinite(first["grad_norm"])


@pytest.mark.multirank
def test_a_rank_killed_mid_shard_under_zero3_resumes_to_the_uninterrupted_result(
    runs, tiny_model_dir, tmp_path
):
    """Rank 1 stops in the middle of writing its second shard; SIGKILL; the launcher ends
    rank 0. The same command again keeps the complete shards and redoes the rest, with rank 0
    (fewer shards left) joining rank 1's forwards until it is done."""
    dataset, root, _ = runs
    out = tmp_path / "zero3"
    first = (root / "zero3" / "part-00001-00000.parquet").stat().st_size
    assert (root / "zero3" / "part-00001-00001.parquet").stat().st_size > 2 * WRITE_BLOCK
    cmd = deepspeed_command(args_for(tiny_model_dir, dataset, out))
    started = faultkit.start(cmd, tmp_path / "log", ENV, f"shard_bytes={first + WRITE_BLOCK}@1")
    try:
        faultkit.kill_at(started, "shard_bytes")
        started.wait(timeout=120)
    finally:
        faultkit.kill_tree(started.proc.pid)
    assert started.proc.returncode != 0
    assert not (out / MANIFEST).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert "part-00001-00000.parquet" in kept and "part-00001-00001.parquet" not in kept
    assert list(out.glob(".part-00001-00001.parquet.*.tmp"))  # killed mid-write

    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert not list(out.glob(".*.tmp"))
    assert_same_values(out, root / "zero3", atol=0.0)
    assert max(dummy_forwards(again.stderr)) > 0
    # and once complete, a third run changes nothing and loads no model
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    third = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "already complete" in third.stderr and "loading reference" not in third.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


@pytest.mark.parametrize(
    "placement",
    [
        ["--device-map", "auto"],
        # 300 kB of CPU for a 500 kB model: the embeddings stay on CPU, the rest goes to disk
        # and is loaded module by module through accelerate's hooks (the lm_head's included)
        ["--device-map", "auto", "--max-memory", '{"cpu": "300KB"}', "--offload-folder", "OFF"],
    ],
    ids=["cpu", "cpu-and-disk"],
)
def test_device_map_gives_the_values_and_fingerprint_of_the_whole_model(
    tmp_path, tiny_model_dir, placement
):
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(60))
    placement = [str(tmp_path / "offload") if a == "OFF" else a for a in placement]
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "whole")) == 0
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "placed", *placement)) == 0
    assert_same_values(tmp_path / "placed", tmp_path / "whole")
    placed, whole = metadata(tmp_path / "placed"), metadata(tmp_path / "whole")
    fingerprint = {m["provenance"]["model"]["fingerprint"] for m in placed}
    assert fingerprint == {m["provenance"]["model"]["fingerprint"] for m in whole}
    devices = placed[0]["scoring"]["placement"]["devices"]
    assert set(devices) == ({"cpu", "disk"} if "--offload-folder" in placement else {"cpu"})
    # the placement is not part of what a rerun must match: the whole model keeps its shards
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "placed").glob("part-*")}
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "placed")) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "placed").glob("part-*")} == kept


@pytest.mark.parametrize(
    "extra, env, says",
    [
        (["--offload"], {}, "--offload needs --zero-stage 3"),
        (["--zero-stage", "3", "--device-map", "auto"], {}, "not both"),
        (["--max-memory", '{"cpu": "1GiB"}'], {}, "need --device-map"),
        (["--zero-stage", "3", "--adapter", "ADAPTER"], {}, "merge it once"),
        (["--device-map", "auto", "--adapter", "ADAPTER"], {}, "merge it once"),
        (
            ["--zero-stage", "3"],
            {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
            "job array",
        ),
        (["--zero-stage", "3", "--rank", "0", "--world-size", "2"], {}, "from the launcher"),
        (["--device-map", "auto"], {"LOCAL_WORLD_SIZE": "2"}, "one per node"),
    ],
    ids=[
        "offload",
        "both",
        "max-memory",
        "zero3-adapter",
        "map-adapter",
        "array",
        "rank",
        "per-node",
    ],
)
def test_placements_refuse_what_they_cannot_do_before_loading(
    tmp_path, tiny_model_dir, monkeypatch, caplog, capsys, extra, env, says
):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the reference was loaded before the refusal")

    monkeypatch.setattr(precompute_run, "load_reference", refuse)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    extra = [str(adapter) if a == "ADAPTER" else a for a in extra]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(8))
    with caplog.at_level("ERROR"):
        try:
            code = run(*base_args(tiny_model_dir, dataset, tmp_path / "out", *extra))
        except SystemExit as exit:  # an option error ends in argparse's exit
            code = exit.code
    assert code == 2
    assert says in caplog.text + capsys.readouterr().err
    assert not list(tmp_path.glob("out*/part-*"))


AGREE = """
import os, sys, torch
from refdpo.precompute.run import agree_on_checks
from refdpo.shared.errors import MissingPath
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()

def check():
    if rank == 1:
        raise MissingPath("rank 1's shard folder is gone")
    return "passed"

try:
    outcome = agree_on_checks(check, True, torch.device("cpu"))
except Exception as err:
    outcome = f"{type(err).__name__} {getattr(err, 'exit_code', None)}: {err}"
open(os.path.join(sys.argv[1], f"rank{rank}"), "w").write(outcome)
"""


@pytest.mark.multirank
def test_a_rank_failing_its_checks_stops_the_others_with_its_exit_code(tmp_path):
    """Without the agreement, rank 0 would pass its checks and wait for rank 1 in the model
    load; each rank records what it raised (and exits 0, so the launcher kills no one)."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29749", str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rank1").read_text() == "MissingPath 2: rank 1's shard folder is gone"
    assert (tmp_path / "rank0").read_text() == (
        "PeerFailed 2: another rank failed its checks before the model loaded; its log says why"
    )


@pytest.mark.multirank
def test_zero3_with_offload_in_bf16_then_stage_two_under_zero3_on_two_ranks(
    tiny_model_dir, tmp_path
):
    """The path on a GPU cluster: bf16, partitions offloaded to CPU, then stage two under
    ZeRO-3 on 2 ranks with its defaults. The gathered weights are the whole model's, so the
    values equal one whole bf16 reference's bitwise; stage two's step-0 check passes."""
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(45))
    extra = ("--dtype", "bf16")  # base_args: shards of 8 rows, 3 pairs per forward
    assert run(*base_args(tiny_model_dir, dataset, tmp_path / "whole", *extra)) == 0
    args = [str(a) for a in base_args(tiny_model_dir, dataset, tmp_path / "shards" / "train",
                                      *extra, "--offload")]  # fmt: skip
    result = subprocess.run(zero3_command(args, port=29751), env=ENV, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_values(tmp_path / "shards" / "train", tmp_path / "whole", atol=0.0)
    placement = metadata(tmp_path / "shards" / "train")[0]["scoring"]["placement"]
    assert placement == {"placement": "zero3", "ranks": 2, "offload": True}
    train = train_args(tmp_path / "shards", tiny_model_dir, tmp_path / "run", "--max-steps", 1,
                       "--zero-stage", 3, "--export", "none")  # fmt: skip
    trained = run_train(train, ranks=2, port=29753)
    assert trained.returncode == 0, trained.stderr[-3000:]
    first = metrics(tmp_path / "run")[1]
    assert first["loss"] == pytest.approx(LN2, abs=1e-3)
