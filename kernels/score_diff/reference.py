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


def dmd_grad(x, real, fake, *, real_uncond=None, guidance=None, eps: float = 0.0) -> torch.Tensor:
    """g = nan_to_num((fake - r) / max(mean_b |x - r|, eps)), shaped like x, in the compute dtype."""
    cd = compute_dtype(x.dtype)
    r = guided(real, real_uncond, guidance)
    x = x.detach().to(cd)
    dims = tuple(range(1, x.dim()))
    n = (x - r).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return torch.nan_to_num((fake.to(cd) - r) / n)


def dmd_loss(x, real, fake, *, real_uncond=None, guidance=None, eps: float = 0.0) -> torch.Tensor:
    """The loss as DMD2 writes it, differentiable by autograd (to x only); a 0-d compute-dtype tensor."""
    g = dmd_grad(x, real, fake, real_uncond=real_uncond, guidance=guidance, eps=eps)
    xc = x.to(g.dtype)
    target = (xc - g).detach()
    return 0.5 * torch.nn.functional.mse_loss(xc, target, reduction="mean")


def dmd_forward(x, real, fake, real_uncond, guidance, guidance_scale: float, eps: float):
    """The op's reference backend: (loss, g) with g in x.dtype, as every fused backend returns them."""
    w = guidance if guidance is not None else guidance_scale
    g = dmd_grad(x, real, fake, real_uncond=real_uncond, guidance=w, eps=eps)
    loss = 0.5 * g.square().mean()
    return loss, g.to(x.dtype)


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
