"""Vocab-parallel kd_loss: each rank of a process group holds a slice of the vocabulary.

Under tensor parallelism the LM head is split by rows, so rank r holds the logits of the ids
[start_r, start_r + V_r) of every token (student and teacher sliced alike; the token dimension is
the same on every rank). The divergence is a function of the whole row, so the three passes of the
row kernels become three stages with a collective between them:

  A  local maxima of u = z / T, v = t / T (and z for the hard CE)   -> all_reduce MAX
     local sums of exp(x - global max)                               -> all_reduce SUM  => global LSEs
     the label's logit z_y, from the rank that owns y (0 elsewhere)  -> all_reduce SUM
  B  the divergence's local row sums (with the global log-probs)     -> all_reduce SUM  => D per row
  C  the gradient of the local slice (needs B's global sums)         -> no communication

Communication per call: 4 all-reduces of [c] or [c, 3] values per chunk of c rows; nothing of size V
crosses ranks. Every rank returns the same loss; each gets the gradient of its own slice. The
stages run in torch (compute dtype, chunks of rows so the workspace stays O(chunk x V_r)); fusing them
into the row kernels (a stats / sums / gradient mode each) is the next step. The math is
kd_loss's (reference.py), term by term.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from flashdistill.kernels import checks
from flashdistill.kernels.kd import reference

CHUNK_BYTES = 64 << 20  # tuning: a stage's temporaries are a few [chunk, V_r] tensors of the compute dtype


def slice_start(width: int, group) -> tuple[int, int]:
    """(first id of this rank's slice, total vocabulary) from every rank's width (one all_gather)."""
    widths = [torch.zeros((), dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, torch.tensor(width, dtype=torch.int64), group=group)
    rank = dist.get_rank(group)
    w = [int(x) for x in widths]
    return sum(w[:rank]), sum(w)


def _all_reduce(t: Tensor, op, group) -> Tensor:
    dist.all_reduce(t, op=op, group=group)
    return t


def _lse(x: Tensor, group) -> Tensor:
    """Global log-sum-exp of the rows of x across the ranks' slices ([c, V_r] -> [c])."""
    m = _all_reduce(x.amax(-1), dist.ReduceOp.MAX, group)
    e = torch.where(x == float("-inf"), torch.zeros_like(x), torch.exp(x - m.unsqueeze(-1)))
    return m + torch.log(_all_reduce(e.sum(-1), dist.ReduceOp.SUM, group))


def rows(s2: Tensor, t2: Tensor, kind: str, T: float, beta: float, alpha: float, lam, row_w: Tensor,
         labels, hard_w, group, start: int):
    """(soft_rows, hard_rows, grad of the local slice) with kd_loss's row contract (see kernels/kd)."""
    cd = checks.compute_dtype(s2.dtype)
    N, Vr = s2.shape
    soft_rows = torch.zeros(N, dtype=cd, device=s2.device)
    hard_rows = torch.zeros(N, dtype=cd, device=s2.device)
    grad = torch.empty_like(s2)
    chunk = max(1, CHUNK_BYTES // (Vr * 8 * torch.finfo(cd).bits // 8))
    zero = torch.zeros((), dtype=cd, device=s2.device)
    if kind in ("jsd", "jsd_normalized") and beta in (0.0, 1.0):
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    for i in range(0, N, chunk):
        j = min(N, i + chunk)
        z = s2[i:j].to(cd)
        u, v = z / T, t2[i:j].to(cd) / T
        if kind == "taid":
            lam_t = torch.as_tensor(lam, dtype=cd, device=u.device)
            v = torch.where(lam_t == 1, v, torch.where(lam_t == 0, u, lam_t * v + (1 - lam_t) * u))
        # ---- A ----
        lse_u = _lse(u, group)
        lq = u - lse_u.unsqueeze(-1)
        lp = v - _lse(v, group).unsqueeze(-1)
        q, p = lq.exp(), lp.exp()
        hp, hq = p > 0, q > 0

        def kl(a_has, pa, la, lb):  # sum a (log a - log b) over a > 0
            return torch.where(a_has, pa * (torch.where(a_has, la, zero) - torch.where(a_has, lb, zero)), zero)

        # ---- B: local terms, all-reduced ----
        if kind in ("forward_kl", "taid"):
            terms = [kl(hp, p, lp, lq)]
        elif kind == "reverse_kl":
            terms = [kl(hq, q, lq, lp)]
        elif kind in ("jsd", "jsd_normalized"):
            lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
            terms = [kl(hp, p, lp, lm), kl(hq, q, lq, lm)]
        elif kind == "tvd":
            sg = 0.5 * ((q > p).to(cd) - (q < p).to(cd))
            terms = [(q - p).abs(), q * sg]
        elif kind == "skew_forward_kl":
            lm = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha)) if alpha > 0 else lq
            pm = torch.where(hp, torch.exp(lp - lm), zero)
            terms = [kl(hp, p, lp, lm), q * pm]
        elif kind == "skew_reverse_kl":
            la = math.log(alpha) if alpha > 0 else float("-inf")
            x = lq - torch.logaddexp(lp + math.log1p(-alpha), lq + la)
            av = torch.where(hq, x - alpha * torch.exp(x), zero)
            terms = [torch.where(hq, q * torch.where(hq, x, zero), zero), q * av]
        elif kind == "mixed":
            terms = [kl(hp, p, lp, lq), kl(hq, q, lq, lp)]
        else:
            raise ValueError(f"kd_loss (vocab-parallel): unknown divergence {kind!r}")
        sums = _all_reduce(torch.stack([t.sum(-1) for t in terms], -1), dist.ReduceOp.SUM, group)
        s0 = sums[:, 0]
        s1 = sums[:, -1]
        if kind == "jsd":
            D = beta * s0 + (1 - beta) * s1
        elif kind == "jsd_normalized":
            D = (beta * s0 + (1 - beta) * s1) / (beta * (1 - beta))
        elif kind == "tvd":
            D = 0.5 * s0
        elif kind == "mixed":
            D = lam * s0 + (1 - lam) * s1
        else:
            D = s0
        # ---- C: the local gradient ----
        S0, S1 = s0.unsqueeze(-1), s1.unsqueeze(-1)
        if kind in ("forward_kl", "taid"):
            gs = q - p
        elif kind == "reverse_kl":
            gs = torch.where(hq, q * (torch.where(hq, lq, zero) - torch.where(hq, lp, zero) - S0), zero)
        elif kind in ("jsd", "jsd_normalized"):
            f = 1.0 / beta if kind == "jsd_normalized" else 1.0 - beta
            gs = torch.where(hq, f * q * (torch.where(hq, lq - lm, zero) - S1), zero)
        elif kind == "tvd":
            gs = q * (sg - S1)
        elif kind == "skew_forward_kl":
            gs = (1 - alpha) * q * (S1 - pm)
        elif kind == "skew_reverse_kl":
            gs = q * (av - S1)
        else:
            r2 = torch.where(hq, q * (torch.where(hq, lq, zero) - torch.where(hq, lp, zero) - S1), zero)
            gs = lam * (q - p) + (1 - lam) * r2
        rw = row_w[i:j]
        g = torch.where(rw.unsqueeze(-1) != 0, (rw / T).unsqueeze(-1) * gs, zero)
        soft_rows[i:j] = torch.where(rw != 0, D, zero)
        if hard_w is not None:
            y = labels[i:j]
            mine = (y >= start) & (y < start + Vr)
            local = torch.where(mine, y - start, 0)
            zy = _all_reduce(torch.where(mine, z.gather(-1, local.unsqueeze(-1)).squeeze(-1), zero),
                             dist.ReduceOp.SUM, group)
            lse_z = _lse(z, group) if T != 1.0 else lse_u
            has = y >= 0
            hard_rows[i:j] = torch.where(has, lse_z - zy, zero)
            ce = torch.exp(z - lse_z.unsqueeze(-1))
            ce = ce - torch.nn.functional.one_hot(local, Vr).to(cd) * mine.unsqueeze(-1)
            hw = hard_w[i:j]
            g = g + torch.where((has & (hw != 0)).unsqueeze(-1), hw.unsqueeze(-1) * ce, zero)
        grad[i:j] = g.to(s2.dtype)
    return soft_rows, hard_rows, grad


class _VocabParallelKD(torch.autograd.Function):
    """loss (replicated) from the local slices; the backward scales the gradient computed forward."""

    @staticmethod
    def forward(ctx, s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, group, start):
        soft_rows, hard_rows, grad = rows(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, group, start)
        loss = (row_w * soft_rows).sum()
        soft = torch.where(row_w != 0, soft_rows, torch.zeros_like(soft_rows)).sum()
        hard = torch.zeros_like(loss)
        if hard_w is not None:
            loss = loss + (hard_w * hard_rows).sum()
            hard = torch.where(hard_w != 0, hard_rows, torch.zeros_like(hard_rows)).sum()
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(soft, hard)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, grad_loss, _soft, _hard):
        (g,) = ctx.saved_tensors
        cd = checks.compute_dtype(g.dtype)
        return ((g.to(cd) * grad_loss.to(cd)).to(g.dtype),) + (None,) * 11


def kd_loss_parallel(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, group):
    """(loss, soft sum, hard sum) of vocab-sliced [N, V_r] logits; labels are global ids."""
    if s2.shape != t2.shape:
        raise ValueError(f"kd_loss: with process_group, student and teacher slices must have one shape, got "
                         f"{tuple(s2.shape)} and {tuple(t2.shape)}")
    start, _ = slice_start(s2.shape[1], group)
    if kind not in reference.DIVERGENCES:
        raise ValueError(f"kd_loss: unknown divergence {kind!r}")
    return _VocabParallelKD.apply(s2, t2, kind, T, beta, alpha, lam, row_w, labels, hard_w, group, start)
