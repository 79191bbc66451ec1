"""Cost of the NaN/inf gradient check (train/engine.py: skip_nonfinite_steps) beside a plain
AdamW step, on the same gradients: SmolLM2-135M's embedding plus 30 layers' worth of MLP
weights (108M fp32 parameters), one CPU thread.

    OMP_NUM_THREADS=1 python -m bench.guard_cost

Prints, over 3 alternating repeats, the time of one optimizer step with and without the
check, and of the check's reduction alone (one sum per tensor, as used) beside the obvious
alternative (an isfinite() mask per tensor).
"""

from __future__ import annotations

import time

import torch

from refdpo.train.engine import skip_nonfinite_steps


def step_ms(optimizer: torch.optim.Optimizer, steps: int = 5) -> float:
    optimizer.step()  # warm up: AdamW allocates its state on the first step
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps * 1000


def check_ms(grads: list[torch.Tensor], check, repeats: int = 5) -> float:
    check(grads)
    started = time.perf_counter()
    for _ in range(repeats):
        check(grads)
    return (time.perf_counter() - started) / repeats * 1000


def by_sum(grads: list[torch.Tensor]) -> bool:
    return bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all())


def by_mask(grads: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def main() -> None:
    torch.manual_seed(0)
    sizes = [49152 * 576] + [576 * 1536 * 3] * 30
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    plain = torch.optim.AdamW(params, lr=1e-6)
    guarded = skip_nonfinite_steps(torch.optim.AdamW(params, lr=1e-6))
    print(f"{sum(sizes) / 1e6:.0f}M parameters, {torch.get_num_threads()} thread(s)")
    for repeat in range(3):
        a, b = step_ms(plain), step_ms(guarded)
        grads = [p.grad for p in params]
        c, d = check_ms(grads, by_sum), check_ms(grads, by_mask)
        print(
            f"repeat {repeat}: AdamW {a:.0f} ms, with the check {b:.0f} ms ({b / a:.2f}x); "
            f"check alone: sum {c:.0f} ms, isfinite mask {d:.0f} ms ({d / c:.1f}x)"
        )


if __name__ == "__main__":
    main()
