"""`refdpo precompute` in this process, timed per scoring batch, with its CUDA peak:

    python -m bench.gpu_stage_one RECORD.json -- <refdpo precompute options>

Runs refdpo's own stage-one entry point (`refdpo.precompute.run.main`, what the `refdpo
precompute` command runs) unchanged, and leaves as that command does, with os._exit once
RECORD.json is written (refdpo's `exit_process`: the teardown of a process group, which
--zero-stage 3 starts, can abort at interpreter exit; the command's wrapper in
refdpo.shared.cli never returns for that reason, so it cannot be called here). The only
addition is a timer around `refdpo.precompute.score.score_pairs`, the forward of one
batch (it ends by copying the log-probs to the host, so the GPU work is finished when it
returns): the benchmark needs each batch's time to leave the first batches out, which hold
torch.compile's warm-up, where refdpo's log gives one figure for the whole pass. Then
writes RECORD.json: the batches (pairs, tokens, attended pairs, seconds), the process's
torch.cuda.max_memory_allocated, the exit code. If refdpo's internals moved and the timer
cannot be placed, the run goes on untimed (`batches` is empty) and the log's figure is used.
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import time


def timed_batches(record: list[dict]):
    """Wrap score_pairs; returns a note when that is not possible."""
    try:
        from refdpo.precompute import score
    except ImportError as err:
        return f"refdpo.precompute.score not importable: {err}"
    original = getattr(score, "score_pairs", None)
    if original is None:
        return "refdpo.precompute.score.score_pairs is gone: no per-batch times"
    from bench.gpu_flops import pair_attended

    @functools.wraps(original)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = original(*args, **kwargs)
        seconds = time.perf_counter() - started
        try:
            pairs = kwargs.get("pairs", args[1] if len(args) > 1 else None)
            lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
            record.append({
                "pairs": len(lengths), "tokens": sum(map(sum, lengths)),
                "attended": sum(pair_attended(*x) for x in lengths), "seconds": seconds,
            })  # fmt: skip
        except (AttributeError, TypeError, IndexError):
            pass  # another signature: the batch goes untimed, the run is unaffected
        return result

    score.score_pairs = timed
    return None


def main(argv: list[str]) -> int:
    record_file, separator, *options = argv
    if separator != "--":
        raise SystemExit("usage: python -m bench.gpu_stage_one RECORD.json -- OPTIONS")
    import torch

    from refdpo.precompute.run import main as precompute

    batches: list[dict] = []
    note = timed_batches(batches)
    code = 1
    try:
        code = precompute(options)
    finally:
        cuda = torch.cuda.is_available()
        result = {
            "exit_code": code,
            "batches": batches,
            "note": note,
            "cuda_max_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        with open(record_file, "w") as f:
            json.dump(result, f)
    return code


def leave(code: int) -> None:
    """As `refdpo precompute` leaves: os._exit after flushing (older refdpo: sys.exit)."""
    try:
        from refdpo.shared.dist import exit_process
    except ImportError:
        sys.exit(code)
    exit_process(code)


if __name__ == "__main__":
    leave(main(sys.argv[1:]))
