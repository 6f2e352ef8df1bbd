"""Score identity losses in plain PyTorch (SiD, SiD-LSG, SIM, score forgetting): the spec.

Both methods train a one-step generator x = G(z) from a frozen teacher and a fake score network
evaluated *with autograd* at x_t = alpha x + sigma eps (the networks' parameters are frozen, but the
gradient flows through their inputs). r and f are the teacher's and the fake network's x0
predictions at x_t; optional classifier-free guidance (Ho convention) on either:
r = r_u + w_r (r - r_u), f = f_u + w_f (f - f_u) (SiD-LSG guides both, Zhou et al. 2024b).

SiD (Zhou et al., "Score identity Distillation", ICML 2024, the alpha-weighted generator loss of
Sec. 4, as coded in mingyuanzhou/SiD training/sid_loss.py):

    w_b  = sg(max(mean_b |x - r|, eps))                       per-sample normaliser, eps = 1e-5
    L    = scale * sum_{b,i} (r - f)((r - x) - alpha (r - f)) / w_b

SIM (Luo et al., "One-Step Diffusion Distillation through Score Implicit Matching", NeurIPS 2024),
with the pseudo-Huber distance d(y) = sqrt(|y|^2 + c^2) - c; in x0 units (a_b = alpha_t^2/sigma_t^4
for VP, 1/sigma^4 for EDM), with y = r - f, u = f - x, per sample:

    L_b  = a_b sum_i y_i u_i / sqrt(a_b sum_i y_i^2 + c_b^2),   L = scale * sum_b L_b

(the gradient-equivalent surrogate derived in ../shared/research/score_distill.md Sec. 3.17; the
paper's exact normalisation is not public in code; a test checks it against the analytic
toy-Gaussian gradient).

Both reduce to three per-sample sums (S_abs = sum|x - r|, Q = sum y^2, A = sum y u): SiD's per-sample
sum is (1 - alpha) Q + A. The gradients are linear in (y, u) per sample (see ``grads``).
"""

from __future__ import annotations

import torch

from flashdistill.kernels.checks import compute_dtype
from flashdistill.kernels.score_diff.reference import guided


def _sum_b(t):
    return t.reshape(t.shape[0], -1).sum(dim=1)


def sid_loss(x, r, f, *, r_uncond=None, f_uncond=None, guidance_real=None, guidance_fake=None,
             alpha: float = 1.2, eps: float = 1e-5, scale=None):
    """SiD generator loss, differentiable in x, r, f (and their unconditional twins) by autograd.

    scale: the loss multiplier; None means 1/B (SiD's sum / batch with loss scaling 1).
    """
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    rb = guided(r, r_uncond, guidance_real)
    fb = guided(f, f_uncond, guidance_fake)
    dims = tuple(range(1, x.dim()))
    w = (xc - rb).abs().mean(dim=dims, keepdim=True).clamp_min(eps).detach()
    per = (rb - fb) * ((rb - xc) - alpha * (rb - fb)) / w
    s = 1.0 / x.shape[0] if scale is None else scale
    return s * per.sum()


def sim_loss(x, r, f, *, r_uncond=None, f_uncond=None, guidance_real=None, guidance_fake=None,
             a=1.0, c=1.0, scale=None):
    """SIM pseudo-Huber surrogate, differentiable in x, r, f by autograd; a, c: floats or [B]."""
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    rb = guided(r, r_uncond, guidance_real)
    fb = guided(f, f_uncond, guidance_fake)
    y, u = rb - fb, fb - xc
    Q, A = _sum_b(y * y), _sum_b(y * u)
    a = a.to(cd) if isinstance(a, torch.Tensor) else a
    c = c.to(cd) if isinstance(c, torch.Tensor) else c
    Lb = a * A / torch.sqrt(a * Q + c * c)
    s = 1.0 / x.shape[0] if scale is None else scale
    return s * Lb.sum()


# ----------------------------------------------------------------------------------------------------
# The K2 skeleton every backend implements (csrc/README.md, "K2"), on [B, D] rows.

def sums(x, r, r_u, wr, f, f_u, wf):
    """[B, 3] in the compute dtype: (sum |x - r̄|, sum y^2, sum y u), y = r̄ - f̄, u = f̄ - x."""
    cd = compute_dtype(x.dtype)
    rb, fb = guided(r, r_u, wr), guided(f, f_u, wf)
    xc = x.to(cd)
    y, u = rb - fb, fb - xc
    return torch.stack([_sum_b((xc - rb).abs()), _sum_b(y * y), _sum_b(y * u)], dim=1)


def grads(x, r, r_u, wr, f, f_u, wf, coef, need=(True,) * 5):
    """(gx, gr, gr_u, gf, gf_u) in x's dtype, each None where not needed or not applicable.

    Gx = -P y, Gr = P u + Q y, Gf = -(Gx + Gr) per element (coef [B, 2] = (P_b, Q_b)); a guided
    prediction splits its gradient as w G and (1 - w) G between p and p_u. Samples with
    P = Q = 0 get exact zeros.
    """
    cd = compute_dtype(x.dtype)
    rb, fb = guided(r, r_u, wr), guided(f, f_u, wf)
    xc = x.to(cd)
    y, u = rb - fb, fb - xc
    shape = (-1,) + (1,) * (x.dim() - 1)
    P, Q = coef[:, 0].to(cd).reshape(shape), coef[:, 1].to(cd).reshape(shape)
    dropped = (P == 0) & (Q == 0)
    Gx = -P * y
    Gr = P * u + Q * y
    Gf = -(Gx + Gr)
    zero = torch.zeros((), dtype=cd)

    def out(G, w, uncond_part):
        if w is None:
            v = G
        else:
            wv = w.to(cd).reshape(shape) if isinstance(w, torch.Tensor) else w
            v = (1 - wv) * G if uncond_part else wv * G
        return torch.where(dropped, zero, v).to(x.dtype)

    res = [out(Gx, None, False),
           out(Gr, wr if r_u is not None else None, False),
           out(Gr, wr, True) if r_u is not None else None,
           out(Gf, wf if f_u is not None else None, False),
           out(Gf, wf, True) if f_u is not None else None]
    return tuple(t if (t is not None and n) else None for t, n in zip(res, need))
