"""DMD / DMD2 distribution-matching generator loss in plain PyTorch: the spec every backend must match.

Distribution Matching Distillation (Yin et al., "One-step Diffusion with Distribution Matching
Distillation", CVPR 2024, Eq. 7-8) trains a one-step generator G so that its output distribution
matches the teacher's. At a noised copy x_t of the generator output x, the real (teacher) and fake
(a critic trained on G's samples) diffusion models predict clean samples; their difference is the
gradient of the reverse KL with respect to x, normalised per sample (Eq. 8; kept in DMD2, Yin et al.,
"Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024):

    r      = real_uncond + w_b (real - real_uncond)     classifier-free guidance (Ho & Salimans 2022),
                                                         only when real_uncond is given; else r = real
    n_b    = max(mean_i |x - r|, eps)                   per sample b, over every non-batch element
    g      = nan_to_num((fake - r) / n_b)               NaN -> 0, +-inf -> +-max finite (compute dtype)
    loss   = 0.5 * mean(g^2)  = 0.5 * mean((x - sg(x - g))^2)      (DMD2's surrogate form)
    dloss/dx = g / N,  N = x.numel();   no gradient to real, fake, real_uncond or the guidance.

Descent moves x toward the teacher's prediction and away from the fake one. Differences from the DMD2
code, on purpose: the mean runs over all non-batch dimensions (DMD2 hard-codes dims [1, 2, 3], wrong
for 5-D video latents), and ``eps`` guards the division (DMD2 has none, which is ``eps=0``, the
default). The compute dtype is float32 for 16- and 32-bit inputs and float64 for float64 inputs; the
loss comes back in the compute dtype and the gradient in x's dtype.
"""

from __future__ import annotations

import torch

from flashdistill.kernels.checks import compute_dtype


def guided(real: torch.Tensor, real_uncond: torch.Tensor | None, guidance) -> torch.Tensor:
    """Teacher prediction with classifier-free guidance (Ho convention), in the compute dtype."""
    cd = compute_dtype(real.dtype)
    real = real.to(cd)
    if real_uncond is None:
        return real
    uncond = real_uncond.to(cd)
    if isinstance(guidance, torch.Tensor):  # per-sample [B] -> broadcast over the sample's elements
        guidance = guidance.to(cd).reshape((-1,) + (1,) * (real.dim() - 1))
    return uncond + guidance * (real - uncond)


def dmd_grad(x, real, fake, *, real_uncond=None, guidance=None, eps: float = 0.0, weight=None,
             x_t=None, coef=None) -> torch.Tensor:
    """g = nan_to_num(h_b (fake - r) / max(mean_b |x - r|, eps)), shaped like x, in the compute dtype.

    weight: per-sample h_b (f-distill, below), None for 1. x_t with coef = (A, C) [B, 2]: real, fake
    (and real_uncond) are predictions p with x0 = A x_t + C p (eps, v or flow networks), converted
    here exactly as written: r = A x_t + C cfg(real), fake_x0 = A x_t + C fake.
    """
    cd = compute_dtype(x.dtype)
    r = guided(real, real_uncond, guidance)
    f = fake.to(cd)
    x = x.detach().to(cd)
    if x_t is not None:
        shape = (-1,) + (1,) * (x.dim() - 1)
        A, C = coef[:, 0].to(cd).reshape(shape), coef[:, 1].to(cd).reshape(shape)
        r = A * x_t.to(cd) + C * r
        f = A * x_t.to(cd) + C * f
    dims = tuple(range(1, x.dim()))
    n = (x - r).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    d = f - r
    if weight is not None:
        d = weight.to(cd).reshape((-1,) + (1,) * (x.dim() - 1)) * d
    return torch.nan_to_num(d / n)


def dmd_loss(x, real, fake, *, real_uncond=None, guidance=None, eps: float = 0.0, weight=None,
             x_t=None, coef=None) -> torch.Tensor:
    """The loss as DMD2 writes it, differentiable by autograd (to x only); a 0-d compute-dtype tensor."""
    g = dmd_grad(x, real, fake, real_uncond=real_uncond, guidance=guidance, eps=eps, weight=weight,
                 x_t=x_t, coef=coef)
    xc = x.to(g.dtype)
    target = (xc - g).detach()
    return 0.5 * torch.nn.functional.mse_loss(xc, target, reduction="mean")


def sds_loss(x, pred, noise, *, pred_uncond=None, guidance=None, weight=None, clip=None,
             reduction: str = "mean") -> torch.Tensor:
    """Score Distillation Sampling (Poole et al., "DreamFusion", ICLR 2023, Eq. 3).

    The SDS gradient w(t) (eps_hat(x_t; y, t) - eps) dx/dtheta, with eps_hat the teacher's guided noise
    prediction at x_t = alpha x + sigma eps and w(t) a per-sample weight (DreamFusion: sigma_t^2; 1;
    or Fantasia3D's alpha_t sigma_t^2), written as the surrogate 0.5 kappa sum (x - sg(x - g))^2 with
    g = nan_to_num(w_b (eps_hat - eps)), optionally clamped to [-clip, clip] (threestudio), and
    kappa = 1/N (reduction="mean") or 1/B (reduction="batch": threestudio's sum / B).
    """
    cd = compute_dtype(x.dtype)
    d = guided(pred, pred_uncond, guidance) - noise.to(cd)
    return _surrogate(x, d, weight, clip, reduction)


def vsd_loss(x, real, fake, *, real_uncond=None, guidance=None, fake_uncond=None, fake_guidance=None,
             weight=None, clip=None, space: str = "eps", reduction: str = "mean") -> torch.Tensor:
    """Variational Score Distillation (Wang et al., "ProlificDreamer", NeurIPS 2023, the VSD gradient of Sec. 3)
    and SwiftBrush (Nguyen & Tran, CVPR 2024, guidance on the fake (LoRA) model too).

    g = nan_to_num(w_b (real_cfg - fake_cfg)) for eps / v / flow predictions (both point from data to
    noise, so real - fake is the descent direction of the KL), and w_b (fake_cfg - real_cfg) for x0
    predictions; then clip and the surrogate as in ``sds_loss``.
    """
    cd = compute_dtype(x.dtype)
    r = guided(real, real_uncond, guidance)
    f = guided(fake, fake_uncond, fake_guidance)
    d = f - r if space == "x0" else r - f
    return _surrogate(x, d, weight, clip, reduction)


def _surrogate(x, d, weight, clip, reduction):
    cd = d.dtype
    if weight is not None:
        d = weight.to(cd).reshape((-1,) + (1,) * (x.dim() - 1)) * d
    g = torch.nan_to_num(d)
    if clip is not None:
        g = g.clamp(-clip, clip)
    kappa = 1.0 / x.numel() if reduction == "mean" else 1.0 / x.shape[0]
    xc = x.to(cd)
    return 0.5 * kappa * (xc - (xc - g).detach()).square().sum()


# f-divergence weights h(r) of f-distill (Xu, Nie & Vahdat, "One-step Diffusion Models with
# f-Divergence Distribution Matching", 2025; the set and names of NVlabs/FastGen f_distill.py), as functions of the density ratio r = p_data / p_gen
# estimated by a discriminator: r = exp(logit).
FDIV_WEIGHTS = {
    "rkl": lambda r: torch.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1.0 - 1.0 / (1.0 + r),
    "sf": lambda r: 1.0 / (1.0 + r),
    "neyman": lambda r: 1.0 / r.clamp_min(1e-8),
    "sh": lambda r: r.sqrt(),
    "jf": lambda r: 1.0 + r,
}


def fdiv_weight(logits, divergence: str = "js", *, logit_clip: float = 10.0, ratio_clip=(0.1, 20.0),
                normalize: bool = True):
    """Per-sample weights h_b for ``dmd_loss(weight=...)``: r_b = clamp(exp(clamp(mean_b(logits),
    +-logit_clip)), *ratio_clip), h_b = f(r_b), then h / (mean(h) + 1e-6) when normalize (as NVlabs/
    FastGen's f_distill.py does, in float32, detached)."""
    lg = logits.detach().to(torch.float32)
    lg = lg.reshape(lg.shape[0], -1).mean(dim=1)
    r = torch.exp(lg.clamp(-logit_clip, logit_clip)).clamp(ratio_clip[0], ratio_clip[1])
    h = FDIV_WEIGHTS[divergence](r)
    if normalize:
        h = h / (h.mean() + 1e-6)
    return h


# ----------------------------------------------------------------------------------------------------
# The K1 skeleton that every score-difference loss of this package reduces to (csrc/README.md,
# "K1: score_diff_forward"); each backend implements exactly this on [B, D] rows.

def _per_sample(v, cd, like):
    """A float, or a [B] tensor reshaped to broadcast over one sample's elements, in dtype cd."""
    if isinstance(v, torch.Tensor):
        return v.to(cd).reshape((-1,) + (1,) * (like.dim() - 1))
    return v


def score_diff_forward(x, a, a_u, wa, b, b_u, wb, xt, coef, scale, norm: bool, eps: float,
                       clip: float, loss_factor: float):
    """(loss, g): g = clip(nan_to_num(s_b (ā - b̄) C_b / n_b)), loss = loss_factor * 0.5 * sum(g^2).

    ā = cfg(a), b̄ = cfg(b) (Ho convention, scales wa, wb: floats or [B] tensors); with xt, coef
    [B, 2] holds (A_b, C_b) and a prediction p stands for the x0 estimate A_b xt + C_b p, so the
    difference is C_b (ā - b̄) and the normaliser's teacher is A_b xt + C_b b̄. n_b = max(mean |x - r|,
    eps) when norm, else 1. Computed in the compute dtype of a; g returned in a's dtype.
    """
    cd = compute_dtype(a.dtype)
    abar, bbar = guided(a, a_u, wa), guided(b, b_u, wb)
    d = abar - bbar
    r = bbar
    if xt is not None:
        A = _per_sample(coef[:, 0], cd, d)
        C = _per_sample(coef[:, 1], cd, d)
        d = C * d
        r = A * xt.to(cd) + C * bbar
    if scale is not None:
        d = _per_sample(scale, cd, d) * d
    if norm:
        dims = tuple(range(1, d.dim()))
        n = (x.detach().to(cd) - r).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        d = d / n
    g = torch.nan_to_num(d)
    if clip > 0:
        g = g.clamp(-clip, clip)
    loss = loss_factor * 0.5 * g.square().sum()
    return loss, g.to(a.dtype)
