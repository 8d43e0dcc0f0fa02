"""Operations on the (B, S, V) candidate, owned by the model so tensor parallelism can shard V.

The thinking loop never calls softmax or cross-entropy on the candidate directly: it asks
`model.vocab_ops`. Single process: `LocalVocab`. Tensor parallelism replaces it with a
vocabulary-parallel implementation (each rank holds a V/tp slice of y, its softmax and the
matching columns of W_v2e), which must be twice differentiable.

The fused candidate update (`update_cross_entropy`). One thinking step ends with

    g = dE/dp = u @ W          (u = dE/de, (N, D); W = W_v2e's weight, (D, V))
    y' = p - alpha * g         (the next candidate, (N, V))
    loss = CE(y', targets)

Written with plain ops, the outer (second-order) backward keeps three (N, V) tensors per step
(alpha * g saves g, log_softmax saves its output, softmax saves p) and materialises about ten
more while it runs (the CE gradient, -alpha times it, alpha's product, the softmax JVP into
y, ...). `FusedUpdateCE` instead walks over row chunks of N once, in the forward: it forms g,
y' and the log-sum-exp of a chunk, and, because the loss is a terminal scalar, the gradients
of the loss with respect to u, W, alpha (and p, only when p needs one) right there, as
Liger-kernel's fused linear cross-entropy does. It keeps only those gradients (sizes of u, W,
alpha) for the backward, which scales them by the incoming scalar. The same Function with
p = 0 and alpha = -1 is the Transformer++'s fused LM-head cross-entropy
(`linear_cross_entropy`), so both models get the same kernel.

Its backward is not itself differentiable (`once_differentiable`): the loss is where the
training graph ends, and nothing differentiates the parameter gradients again. The
second-order term of EBT training is not lost: it is the gradient into u, which carries on
through the graph that `autograd.grad(..., create_graph=True)` recorded for dE/de.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 22
"""Rows per chunk = CHUNK_ELEMENTS // V: the chunk's (rows, V) temporaries stay ~16 MB in float32."""


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


class FusedUpdateCE(torch.autograd.Function):
    """(p, u, W, alpha, targets) -> (mean CE of y' = p - alpha * (u @ W), y', all y' finite).

    p (N, V), u (N, D), W (D, V), alpha (N, 1) or a one-element tensor, targets (N,) with -100
    for padding. `p is None` means the plain product y' = u @ W (alpha unused, y' not kept: the
    LM-head cross-entropy). Under tensor parallelism (`group` set) p, W and y' are this rank's
    vocabulary slice [start, start + V_local); u, alpha, targets and the loss are replicated.
    y' is returned without a gradient (callers use it only as the next, detached candidate).
    """

    @staticmethod
    def forward(ctx, p, u, w, alpha, targets, group, start):
        need_p, need_u, need_w, need_a = ctx.needs_input_grad[:4]
        linear = p is None
        work = torch.promote_types(u.dtype, torch.float32)
        n, v_local = u.shape[0], w.shape[1]
        w_work = w.to(work)
        if linear:
            coef = None
        elif alpha.numel() == 1:
            coef = alpha.to(work).reshape(1, 1).expand(n, 1)
        else:
            coef = alpha.to(work).reshape(n, 1)
        valid = targets != -100
        n_valid = valid.sum().to(work)
        local_t = targets - start
        inside = valid & (local_t >= 0) & (local_t < v_local)
        local_t = local_t.clamp(0, v_local - 1)
        y_next = None if linear else torch.empty(n, v_local, dtype=p.dtype, device=u.device)
        loss = torch.zeros((), dtype=work, device=u.device)
        finite = torch.ones((), dtype=torch.bool, device=u.device)
        grad_p = torch.empty(n, v_local, dtype=work, device=u.device) if need_p else None
        grad_u = torch.empty(n, u.shape[1], dtype=work, device=u.device) if need_u else None
        grad_w = torch.zeros(w.shape, dtype=work, device=u.device) if need_w else None
        grad_a = torch.empty(n, 1, dtype=work, device=u.device) if need_a else None
        # valid / n_valid folded into the (rows, D)-sized operands instead of a pass over r.
        row_scale = valid.to(work).unsqueeze(-1) / n_valid
        step = _rows_per_chunk(v_local)
        for lo in range(0, n, step):
            sl = slice(lo, min(n, lo + step))
            uc = u[sl].to(work)
            if linear:
                yn = uc @ w_work
            else:
                ac = coef[sl]
                out = y_next[sl] if y_next.dtype == work else None
                yn = torch.addcmul(p[sl].to(work), ac, uc @ w_work, value=-1.0, out=out)
                if out is None:
                    y_next[sl] = yn
            # Only the softmax kernels: torch.exp takes a ~8x slower path on the very negative
            # arguments a candidate's logits give (measured), softmax/log_softmax do not.
            top, arg = yn.max(-1, keepdim=True)
            finite &= torch.isfinite(top).all() & torch.isfinite(yn.amin(-1)).all()
            log_p = torch.log_softmax(yn, -1)
            lse = top - log_p.gather(-1, arg)  # log-sum-exp of this rank's slice, exact at the max
            tl = yn.gather(-1, local_t[sl, None]) * inside[sl, None]
            if group is not None:
                # Full-V log-sum-exp from the slices' ones: max, then one sum of exp and target logit.
                lse_max = lse.clone()
                dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
                sums = torch.cat([torch.exp(lse - lse_max), tl], dim=-1)
                dist.all_reduce(sums, group=group)
                full_lse, tl = lse_max + torch.log(sums[:, :1]), sums[:, 1:]
            else:
                full_lse = lse
            loss += ((full_lse - tl).squeeze(-1) * valid[sl]).sum()
            if not (need_p or need_u or need_w or need_a):
                continue
            # r = dloss/dy' * n_valid / valid of this chunk: softmax(y') - onehot(target).
            r = torch.softmax(yn, -1)
            if group is not None:
                r.mul_(torch.exp(lse - full_lse))
            rows = inside[sl].nonzero().squeeze(-1)
            r[rows, local_t[sl][rows]] -= 1.0
            scale = row_scale[sl] if linear else row_scale[sl] * -ac
            if need_u or need_a:
                r_w = r @ w_work.T
                if need_u:
                    grad_u[sl] = r_w * scale
                if need_a:
                    # sum_v g_v r_v with g = u @ W is u . (r @ W^T): no (rows, V) product needed.
                    grad_a[sl] = -(uc * r_w).sum(-1, keepdim=True) * row_scale[sl]
            if need_w:
                torch.addmm(grad_w, (uc * scale).T, r, out=grad_w)
            if need_p:
                grad_p[sl] = r * row_scale[sl]
        loss = loss / n_valid
        if group is not None and need_u:
            # u is replicated and feeds every rank's slice: its gradient is the sum of the partials.
            dist.all_reduce(grad_u, group=group)
        ctx.mark_non_differentiable(finite)
        if y_next is not None:
            ctx.mark_non_differentiable(y_next)
        ctx.alpha_shape = None if alpha is None else alpha.shape
        ctx.dtypes = (None if linear else p.dtype, u.dtype, w.dtype, None if alpha is None else alpha.dtype)
        ctx.save_for_backward(grad_p, grad_u, grad_w, grad_a)
        return loss, y_next, finite

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_y_next, _grad_finite):
        grad_p, grad_u, grad_w, grad_a = ctx.saved_tensors
        p_dt, u_dt, w_dt, a_dt = ctx.dtypes

        def scaled(t, dtype):
            return None if t is None else (t * grad_loss).to(dtype)

        ga = scaled(grad_a, a_dt)
        if ga is not None:
            # A one-element alpha was broadcast over the rows: sum. (Under tp this is the rank's
            # partial; the copy_to_tp the model applies to alpha completes it, as on the plain path.)
            ga = ga.sum().reshape(ctx.alpha_shape) if ctx.alpha_shape.numel() == 1 else ga.reshape(ctx.alpha_shape)
        return scaled(grad_p, p_dt), scaled(grad_u, u_dt), scaled(grad_w, w_dt), ga, None, None, None


def fused_update_cross_entropy(
    probs: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, targets: torch.Tensor,
    group=None, start: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, S, .) shapes in, flattened for the Function: returns (loss, y' of shape (B, S, V_local),
    a bool tensor: every y' is finite).
    alpha: a one-element tensor or broadcastable to (B, S, 1)."""
    batch, seq, v_local = probs.shape
    a = alpha if alpha.numel() == 1 else alpha.expand(batch, seq, 1).reshape(batch * seq, 1)
    loss, y_next, finite = FusedUpdateCE.apply(
        probs.reshape(-1, v_local), u.reshape(-1, u.shape[-1]), weight, a, targets.reshape(-1), group, start
    )
    return loss, y_next.view(batch, seq, v_local), finite


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group=None, start: int = 0
) -> torch.Tensor:
    """Mean CE of hidden (B, S, D) @ weight.T (weight (V, D), an LM head) without keeping the
    (B, S, V) logits (FusedUpdateCE with p = None)."""
    loss, _, _ = FusedUpdateCE.apply(
        None, hidden.reshape(-1, hidden.shape[-1]), weight.T, None, targets.reshape(-1), group, start
    )
    return loss


class LocalVocab:
    """The whole vocabulary on this process."""

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax over V in at least float32, returned in the logits' dtype."""
        work = torch.promote_types(logits.dtype, torch.float32)
        return torch.softmax(logits.to(work), dim=-1).to(logits.dtype)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token CE in at least float32; targets < 0 (-100) are padding."""
        work = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(logits.to(work).flatten(0, 1), targets.flatten(), ignore_index=-100)

    def update_cross_entropy(
        self, probs: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor, targets: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CE(y'), y', all y' finite) for y' = probs - alpha * (u @ weight), fused and chunked (module docstring)."""
        return fused_update_cross_entropy(probs, u, weight, alpha, targets)

    def linear_cross_entropy(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE(hidden @ weight.T) without materialising the logits (the Transformer++ head)."""
        return fused_linear_cross_entropy(hidden, weight, targets)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This process's slice of a full-vocabulary tensor (last dim)."""
        return full

    def local_width(self, vocab_size: int) -> int:
        """Width of this process's slice of a V-wide tensor."""
        return vocab_size

    def as_local(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-V logits as this process's slice (the whole of them here)."""
        return logits

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated value entering vocabulary arithmetic (identity on one process)."""
        return x

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full-V tensor (it already is one here)."""
        return local.detach()


LOCAL_VOCAB = LocalVocab()
