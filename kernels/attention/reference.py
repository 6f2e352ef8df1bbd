"""Attention and attention-map distillation in plain PyTorch (the spec).

Layout (as torch.nn.functional.scaled_dot_product_attention): q [B, Hq, Lq, D], k and v [B, Hk, Lk, D]
with Hq a multiple of Hk; query head h reads key/value head h // (Hq / Hk) (grouped-query attention,
Ainslie et al. 2023; multi-query when Hk = 1, Shazeer 2019).

attention (Vaswani et al. 2017): S = scale q k^T (scale = 1/sqrt(D) by default), P = softmax_j S,
out = P v. With causal=True, key j is visible to query i iff j <= i: the mask is aligned to the top
left, as SDPA's ``is_causal`` (torch.tril(ones(Lq, Lk))). With Lq <= Lk every row sees at least key 0,
so no row is empty. The log-sum-exp lse_i = log sum_j exp(S_ij) (natural log, compute dtype) is the one
statistic the backward needs (FlashAttention-2, Dao 2023, Sec. 3.1).

attention backward (FlashAttention-2, Algorithm 2): with P = exp(S - lse), dO the output gradient,
Delta_i = sum_d dO_id O_id:
    dV = P^T dO,  dP = dO V^T,  dS = P o (dP - Delta),  dQ = scale dS K,  dK = scale dS^T Q
and dK, dV summed over the query heads of a group.

attention_kd (MiniLM, Wang et al. 2020, eq. 4-5; MiniLMv2, Wang et al. 2021, eq. 7-9): per query row
    KL_i = sum_j P_ij (log P_ij - log Q_ij),  P = softmax_j(scale_t q_t k_t^T) (teacher),
                                               Q = softmax_j(scale_s q_s k_s^T) (student),
the same causal mask on both. The streaming kernels use KL_i = sum_j P_ij (t_ij - s_ij) - lse_t_i +
lse_s_i (research notes attn_sampler.md Sec. 3.2); this reference materializes both matrices. The
gradient reaches the student only: dKL_i / ds_ij = Q_ij - P_ij, so with upstream g_i per row,
dS = g (Q - P), dq_s = scale_s dS k_s, dk_s = scale_s dS^T q_s (summed over a group's heads).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flashdistill.kernels.checks import compute_dtype


def _expand_kv(t: Tensor, hq: int) -> Tensor:
    """[B, Hk, L, D] -> [B, Hq, L, D], head h reading h // (Hq / Hk)."""
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def _fold_kv(t: Tensor, hk: int) -> Tensor:
    """[B, Hq, L, D] gradients summed over each group's heads -> [B, Hk, L, D]."""
    B, hq, L, D = t.shape
    return t.reshape(B, hk, hq // hk, L, D).sum(dim=2)


def causal_mask(lq: int, lk: int, device) -> Tensor:
    """[Lq, Lk] bool, True where key j is visible to query i (j <= i, top-left aligned)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


def _logits(q, k, scale, causal):
    cd = compute_dtype(q.dtype)
    s = scale * torch.matmul(q.to(cd), _expand_kv(k, q.shape[1]).to(cd).transpose(-1, -2))
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return s


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None):
    """(out in q.dtype, lse in the compute dtype); differentiable in q, k, v by autograd."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    s = _logits(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.matmul(p, _expand_kv(v, q.shape[1]).to(s.dtype))
    return out.to(q.dtype), lse


def attention_backward(q, k, v, out, lse, dout, *, causal: bool, scale: float):
    """(dq, dk, dv) from the saved lse, FlashAttention-2's formulas written densely."""
    cd = compute_dtype(q.dtype)
    hq, hk = q.shape[1], k.shape[1]
    s = _logits(q, k, scale, causal)
    p = torch.exp(s - lse.to(cd)[..., None])
    do = dout.to(cd)
    ve = _expand_kv(v, hq).to(cd)
    ke = _expand_kv(k, hq).to(cd)
    delta = (do * out.to(cd)).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, ve.transpose(-1, -2))
    ds = p * (dp - delta)
    dq = scale * torch.matmul(ds, ke)
    dk = scale * torch.matmul(ds.transpose(-1, -2), q.to(cd))
    return dq.to(q.dtype), _fold_kv(dk, hk).to(k.dtype), _fold_kv(dv, hk).to(v.dtype)


def attention_kd(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *, causal: bool = False,
                 scale_s: float | None = None, scale_t: float | None = None):
    """(kl [B, H, Lq], lse_s, lse_t), all in the compute dtype; kl differentiable in q_s, k_s by
    autograd (the teacher is detached)."""
    scale_s = default_scale(q_s.shape[-1]) if scale_s is None else scale_s
    scale_t = default_scale(q_t.shape[-1]) if scale_t is None else scale_t
    s = _logits(q_s, k_s, scale_s, causal)
    t = _logits(q_t.detach(), k_t.detach(), scale_t, causal).to(s.dtype)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    p = log_p.exp()
    # masked entries: p = 0 there, and 0 * (-inf - -inf) must count as 0, not NaN
    term = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return term.sum(-1), torch.logsumexp(s, -1).detach(), torch.logsumexp(t, -1)


def attention_kd_backward(q_s, k_s, q_t, k_t, lse_s, lse_t, g, *, causal: bool, scale_s: float, scale_t: float):
    """(dq_s, dk_s) for upstream per-row gradient g [B, H, Lq], written densely."""
    cd = compute_dtype(q_s.dtype)
    s = _logits(q_s, k_s, scale_s, causal)
    t = _logits(q_t, k_t, scale_t, causal).to(cd)
    ds = g.to(cd)[..., None] * (torch.exp(s - lse_s.to(cd)[..., None]) - torch.exp(t - lse_t.to(cd)[..., None]))
    dq = scale_s * torch.matmul(ds, _expand_kv(k_s, q_s.shape[1]).to(cd))
    dk = scale_s * torch.matmul(ds.transpose(-1, -2), q_s.to(cd))
    return dq.to(q_s.dtype), _fold_kv(dk, k_s.shape[1]).to(k_s.dtype)
