"""The output layer on completion positions: lm_head + fp32 log-softmax in chunks, as one
autograd function behind one module call (why one call: see `TokenLogps`)."""

from __future__ import annotations

import torch


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of a chunk, softcapped when the model says so, and tanh(logits / softcap)
    (None without a cap), which the cap's backward needs. Shape: (chunk, vocab)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class ChunkedTokenLogps(torch.autograd.Function):
    """log p(target | hidden) = logit[target] - logsumexp(logits), fp32, `chunk_size`
    positions at a time, in forward and in backward.

    One function per micro-batch instead of one checkpointed lm_head call per chunk: its
    caller (TokenLogps) is one module call, so ZeRO-3 gathers the weight once in forward and
    once in backward whatever the token count. Backward recomputes each chunk's logits (never
    more than one chunk of fp32 logits alive) and accumulates the weight's gradient in fp32.

    hidden: Shape (n, H). weight: Shape (V, H). target_ids: Shape (n,). Returns Shape (n,).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, chunk_size, softcap):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits, _ = _chunk_logits(hidden[start:stop], weight, bias, softcap)
            picked = logits.gather(-1, target_ids[start:stop, None]).squeeze(-1)
            out[start:stop] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, target_ids)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target_ids = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = grad_bias = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_bias:
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h, g = hidden[start:stop], grad_out[start:stop].float()
            logits, capped = _chunk_logits(h, weight, bias, ctx.softcap)
            # d/dlogits of (logit[t] - logsumexp) = onehot(t) - softmax
            grad_logits = torch.softmax(logits, dim=-1).mul_(-g[:, None])
            grad_logits.scatter_add_(-1, target_ids[start:stop, None], g[:, None])
            if capped is not None:  # d(c * tanh(x / c))/dx = 1 - tanh^2
                grad_logits.mul_(1.0 - capped.square())
            grad_logits = grad_logits.to(h.dtype)
            if need_hidden:
                grad_hidden[start:stop] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.t().float(), h.float())
            if need_bias:
                grad_bias += grad_logits.float().sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
            None,
        )


class TokenLogps(torch.nn.Module):
    """The output layer and an fp32 log-softmax on the completion positions, one call.

    It has no parameters of its own: the lm_head stays where the model keeps it (names,
    export and weight tying unchanged), held outside the module tree. Under ZeRO-3 the
    trainer registers the lm_head weight as this module's external parameter, so DeepSpeed
    gathers it around this call (forward) and its backward.
    """

    def __init__(self, lm_head: torch.nn.Module, softcap: float | None, chunk_size: int):
        super().__init__()
        if not isinstance(lm_head, torch.nn.Linear):
            raise ValueError(
                f"the output layer is a {type(lm_head).__name__}, not a plain Linear (LoRA on "
                "lm_head is not supported: leave it out of --lora-target-modules)"
            )
        self._lm_head = [lm_head]  # a list: not registered as a child
        self.softcap = softcap
        self.chunk_size = chunk_size

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self._lm_head[0]

    def forward(self, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        head = self.lm_head
        hook = getattr(head, "_hf_hook", None)
        if hook is None:
            return ChunkedTokenLogps.apply(
                hidden, head.weight, head.bias, target_ids, self.chunk_size, self.softcap
            )
        # placed by accelerate (stage one's --device-map): the lm_head module is never called,
        # so run its hook by hand: it moves the inputs to the lm_head's device and loads an
        # offloaded weight there, then puts the weight back
        (hidden, target_ids), _ = hook.pre_forward(head, hidden, target_ids)
        out = ChunkedTokenLogps.apply(
            hidden, head.weight, head.bias, target_ids, self.chunk_size, self.softcap
        )
        return hook.post_forward(head, out)
