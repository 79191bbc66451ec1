"""Does ZeRO-3 with gradient accumulation step like ZeRO-0/1/2 on the same global batch?

One tiny 2-layer Llama (random weights, fixed seed), one fixed global batch of 8 random
sequences, fp32, a client torch AdamW, loss = -mean log-softmax of the logits at fixed
random targets. Each row builds a fresh DeepSpeed engine on the same weights, runs one
optimizer step (--steps N: N, each on a batch of its own) over the global batch split into
micro-batches of 8 / (ranks * GAS) sequences (engine.backward, then engine.step, per
micro-batch), and is compared with a reference: the same steps in plain torch, all 8
sequences in one forward on one process (what ZeRO-0 with GAS 1 on one rank computes).

Rows: ZeRO stages 0, 1, 2 and 3, each at GAS 1 and GAS 2, gradient clipping 0 and 1.0, and
three forward paths. ZeRO-3 comes three ways: `3` with DeepSpeed's default persistence
threshold (every parameter of this tiny model is under it: none is ever released), `3rel`
with stage3_param_persistence_threshold 0 (every parameter released after its module's
forward and backward, gathered again for the next), `3off` as `3rel` with the optimizer
offloaded to the CPU. Buckets are 5e5 elements (the defaults, 5e8, would allocate GBs per
engine); the whole model is about 1.1e5, so it still fits one bucket (--bucket 20000 splits
it: some buckets are then reduced inside backward, not after it). Forward paths:

    engine    loss from `engine(input_ids=...)`, the normal path
    bypass    `engine.module.model(...)` then `engine.module.lm_head(...)`, never calling
              the engine's forward (the engine still runs backward and step)
    wrapped   the engine built around a module whose forward does what bypass does
              (decoder, then lm_head), called as `engine(input_ids=...)`

Columns:

    ds_norm   engine.get_global_grad_norm() after the step (ZeRO-0 reports none: "-")
    opt_norm  2-norm of the gradients the client AdamW receives in its step(), over all
              ranks, after clipping; unlike the parameters, it shows a gradient that is only
              scaled wrong (Adam's update does not change when its gradient is scaled)
    bwd_ret   loss / value returned by engine.backward: GAS when the loss was divided by GAS
    max_dp    max |parameter - reference parameter| after the step (gathered under ZeRO-3)

Exits 1 when a row's ds_norm, opt_norm or parameters differ from the reference by more than
--tolerance, or bwd_ret is not GAS. Run on one rank, or on two (micro-batches then half the
size, each rank a different half of the batch):

    python bench/zero3_accumulation.py
    deepspeed --num_gpus 2 bench/zero3_accumulation.py
    torchrun --nproc-per-node 2 bench/zero3_accumulation.py

With DeepSpeed 0.19.8 every row matches except ZeRO-3 (all three ways) with GAS > 1 on the
bypass path, on one rank or two: its gradient is only the last micro-batch's, divided by
GAS. ZeRO-3 overwrites rather than adds a micro-batch's gradient partition while its
micro_step_id is 0, and only the engine's forward advances that counter (through
optimizer.clear_backward_seen_flag()); the wrapped path, through the engine, matches.

On a machine without GPUs, DeepSpeed's CPU accelerator and gloo are used (set
DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 to pin them down).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import math
import os
import sys
import types
import warnings
from dataclasses import dataclass

import torch

GLOBAL_BATCH = 8
SEQ_LEN = 16
VOCAB = 256
BUCKET = 500_000
PATHS = ("engine", "bypass", "wrapped")
STAGES = ("0", "1", "2", "3", "3rel", "3off")


@dataclass
class Row:
    stage: str
    ranks: int
    gas: int
    micro: int
    path: str
    clip: float
    ds_norm: float | None
    opt_norm: float
    bwd_ret: float
    max_dp: float

    def failures(self, ref: Reference, tolerance: float) -> list[str]:
        bad = []
        if self.ds_norm is not None and abs(self.ds_norm - ref.norm) > tolerance:
            bad.append("ds_norm")
        if abs(self.opt_norm - ref.opt_norm[self.clip]) > tolerance:
            bad.append("opt_norm")
        if abs(self.bwd_ret - self.gas) > 1e-6 * self.gas:
            bad.append("bwd_ret")
        if not self.max_dp <= tolerance:  # NaN fails too
            bad.append("params")
        return bad


@dataclass
class Reference:
    norm: float  # gradient norm of the first step, before clipping
    opt_norm: dict[float, float]  # clip -> norm the optimizer received in the last step
    params: dict[float, dict[str, torch.Tensor]]  # clip -> parameters after the steps


@dataclass
class Setup:
    ids: torch.Tensor  # Shape (steps, GLOBAL_BATCH, SEQ_LEN)
    targets: torch.Tensor
    lr: float
    bucket: int
    rank: int
    ranks: int
    ref: Reference


def init_distributed() -> tuple[int, int]:
    env = os.environ
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, verbose=False, timeout=datetime.timedelta(seconds=300)
    )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


def make_batches(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and targets, shape (steps, GLOBAL_BATCH, SEQ_LEN)."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ_LEN), generator=gen)
    targets = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ_LEN), generator=gen)
    return ids, targets


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).mean()


class DecoderThenHead(torch.nn.Module):
    """A causal LM as a module whose forward runs its decoder, then its lm_head."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.policy.lm_head(self.policy.model(input_ids=input_ids).last_hidden_state)


def forward(model: torch.nn.Module, engine, path: str, ids: torch.Tensor) -> torch.Tensor:
    if path == "engine":
        return engine(input_ids=ids).logits
    if path == "wrapped":
        return engine(input_ids=ids)
    hidden = model.model(input_ids=ids).last_hidden_state
    return model.lm_head(hidden)


def record_grad_norm(optimizer: torch.optim.Optimizer, partitioned: bool, seen: list[float]):
    """Wrap optimizer.step (on the instance: DeepSpeed refuses unknown optimizer classes under
    ZeRO) to append the 2-norm of the gradients it is given; `partitioned`: each rank holds
    only its part of them (ZeRO 1-3), so the squares are summed over ranks."""
    update = optimizer.step

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        squares = torch.stack([g.double().pow(2).sum().cpu() for g in grads]).sum()
        if partitioned and torch.distributed.is_initialized():
            squares = squares.to(grads[0].device)
            torch.distributed.all_reduce(squares)
        seen.append(math.sqrt(float(squares)))
        return update(closure)

    optimizer.step = types.MethodType(step, optimizer)
    return optimizer


def reference(ids, targets, clips, lr: float, device) -> Reference:
    """Plain torch: each step's whole global batch in one forward, one process."""
    norm, opt_norm, params = None, {}, {}
    for clip in clips:
        model = tiny_llama().to(device)
        seen: list[float] = []
        optimizer = record_grad_norm(torch.optim.AdamW(model.parameters(), lr=lr), False, seen)
        for step in range(ids.shape[0]):
            loss = loss_of(model(input_ids=ids[step].to(device)).logits, targets[step].to(device))
            loss.backward()
            total = torch.nn.utils.clip_grad_norm_(
                model.parameters(), clip if clip > 0 else float("inf")
            )
            if step == 0:
                norm = float(total)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        opt_norm[clip] = seen[-1]
        params[clip] = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    return Reference(norm, opt_norm, params)


def ds_config(stage: str, micro: int, gas: int, ranks: int, clip: float, bucket: int) -> dict:
    zero: dict = {
        "stage": int(stage[0]),
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if stage.startswith("3"):
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            stage3_gather_16bit_weights_on_model_save=True,
            stage3_prefetch_bucket_size=bucket,
        )
    if stage in ("3rel", "3off"):
        zero["stage3_param_persistence_threshold"] = 0
    if stage == "3off":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * ranks,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def run_row(setup: Setup, stage: str, gas: int, path: str, clip: float) -> Row:
    import deepspeed

    rank, ranks = setup.rank, setup.ranks
    micro = GLOBAL_BATCH // (ranks * gas)
    model = tiny_llama()
    seen: list[float] = []
    optimizer = record_grad_norm(
        torch.optim.AdamW(model.parameters(), lr=setup.lr), stage != "0", seen
    )
    engine, *_ = deepspeed.initialize(
        model=DecoderThenHead(model) if path == "wrapped" else model,
        optimizer=optimizer,
        config=ds_config(stage, micro, gas, ranks, clip, setup.bucket),
    )
    ratios = []
    ds_norm = None
    for step in range(setup.ids.shape[0]):
        for m in range(gas):
            start = (m * ranks + rank) * micro  # micro-batch m of this rank
            x = setup.ids[step, start : start + micro].to(engine.device)
            y = setup.targets[step, start : start + micro].to(engine.device)
            loss = loss_of(forward(model, engine, path, x), y)
            returned = engine.backward(loss)
            ratios.append(float(loss.detach()) / float(returned.detach()))
            engine.step()
        if step == 0:
            ds_norm = engine.get_global_grad_norm()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        after = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    expected = setup.ref.params[clip]
    max_dp = max(float((after[n] - expected[n]).abs().max()) for n in expected)
    engine.destroy()
    del engine, optimizer, model
    gc.collect()
    return Row(
        stage=stage,
        ranks=ranks,
        gas=gas,
        micro=micro,
        path=path,
        clip=clip,
        ds_norm=None if ds_norm is None else float(ds_norm),
        opt_norm=seen[-1],
        bwd_ret=max(ratios, key=lambda r: abs(r - gas)),
        max_dp=max_dp,
    )


def table(rows: list[Row], ref: Reference, tolerance: float) -> str:
    head = "stage ranks GAS micro forward clip  ds_norm   opt_norm  bwd_ret  max_dp    differs"
    lines = [head, "-" * len(head)]
    ref_opt = " / ".join(f"{ref.opt_norm[c]:.6f}" for c in sorted(ref.opt_norm))
    lines.append(f"reference (torch, 1 process, batch 8): norm {ref.norm:.6f}, opt_norm {ref_opt}")
    for r in rows:
        ds = "-" if r.ds_norm is None else f"{r.ds_norm:.6f}"
        bad = ",".join(r.failures(ref, tolerance)) or "no"
        lines.append(
            f"{r.stage:<5} {r.ranks:>5} {r.gas:>3} {r.micro:>5} {r.path:<7} {r.clip:>4.1f} "
            f"{ds:>9} {r.opt_norm:>9.6f} {r.bwd_ret:>7.3f}  {r.max_dp:<9.2e} {bad}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="of " + ",".join(STAGES))
    parser.add_argument("--gas", default="1,2", help="gradient accumulation steps to try")
    parser.add_argument("--paths", default=",".join(PATHS), help="of " + ",".join(PATHS))
    parser.add_argument("--clips", default="0,1.0", help="gradient_clipping values (0: none)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per row")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--bucket", type=int, default=BUCKET, help="ZeRO bucket sizes")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    rank, ranks = init_distributed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    torch.use_deterministic_algorithms(True, warn_only=True)
    clips = [float(c) for c in args.clips.split(",")]
    ids, targets = make_batches(args.steps)
    ref = reference(ids, targets, clips, args.lr, device)
    setup = Setup(ids, targets, args.lr, args.bucket, rank, ranks, ref)

    rows = []
    for stage in args.stages.split(","):
        for gas in (int(g) for g in args.gas.split(",")):
            if GLOBAL_BATCH % (ranks * gas):
                continue
            for path in args.paths.split(","):
                for clip in clips:
                    rows.append(run_row(setup, stage, gas, path, clip))
    failed = torch.tensor(float(any(r.failures(ref, args.tolerance) for r in rows)), device=device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        print(table(rows, ref, args.tolerance), flush=True)
    torch.distributed.barrier()
    return int(failed.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
