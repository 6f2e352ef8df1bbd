"""Regression losses in plain PyTorch: consistency distillation and denoising score matching (the spec).

consistency_loss(pred, target, kind, c, weight):
  - kind="l2": mean_i (pred - target)^2 (LCM, Luo et al. 2023; CD, Song et al. 2023);
  - kind="huber": mean_i sqrt((pred - target)^2 + c^2) - c, elementwise (the LCM training script's
    "huber" loss, huggingface/diffusers examples/consistency_distillation);
  - kind="pseudo_huber": per sample sqrt(|pred - target|^2 + c^2) - c over all of the sample's
    elements, averaged over the batch (improved consistency training, Song & Dhariwal 2024, Sec. 3.3;
    ECT, Geng et al. 2024), with per-sample weight lambda_b (e.g. 1 / (t - r)).
  The target is detached (an EMA / target network output); the gradient reaches pred only.

dsm_loss(pred, x0, noise, alpha, sigma, target, weight): denoising score matching for the fake-score
(critic) network (Vincent 2011; Ho et al. 2020 for eps; Salimans & Ho 2022 for v; Lipman et al.
2023 / Liu et al. 2023 for the flow target u = noise - x0):
  target eps: noise;  x0: x0;  v: alpha noise - sigma x0;  flow: noise - x0;
  loss = mean_b lambda_b mean_i (pred - target)^2 (reduction="mean") or
         mean_b lambda_b sum_i (pred - target)^2 (reduction="sum", SiD / score forgetting critics).
"""

from __future__ import annotations

import torch

from flashdistill.kernels.checks import compute_dtype


def _sum_b(t):
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _w(weight, B, cd):
    return torch.ones(B, dtype=cd) if weight is None else weight.to(cd)


def consistency_loss(pred, target, *, kind: str = "l2", c: float = 0.0, weight=None):
    """Differentiable in pred by autograd; a 0-d tensor in the compute dtype."""
    cd = compute_dtype(pred.dtype)
    d = pred.to(cd) - target.detach().to(cd)
    B, D = pred.shape[0], pred[0].numel()
    lam = _w(weight, B, cd).to(d.device)
    if kind == "l2":
        per = _sum_b(d * d) / D
    elif kind == "huber":
        per = _sum_b(torch.sqrt(d * d + c * c) - c) / D
    elif kind == "pseudo_huber":
        per = torch.sqrt(_sum_b(d * d) + c * c) - c
    else:
        raise ValueError(kind)
    return (lam * per).mean()


def dsm_target(x0, noise, alpha, sigma, target: str):
    cd = compute_dtype(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    x0c = x0.detach().to(cd)
    n = noise.to(cd) if noise is not None else None
    if target == "x0":
        return x0c
    if target == "eps":
        return n
    if target == "flow":
        return n - x0c
    if target == "v":
        a = alpha.to(cd).reshape(shape) if isinstance(alpha, torch.Tensor) else alpha
        s = sigma.to(cd).reshape(shape) if isinstance(sigma, torch.Tensor) else sigma
        return a * n - s * x0c
    raise ValueError(target)


def dsm_loss(pred, x0, noise, *, alpha=None, sigma=None, target: str = "eps", weight=None,
             reduction: str = "mean"):
    cd = compute_dtype(pred.dtype)
    tau = dsm_target(x0, noise, alpha, sigma, target)
    d = pred.to(cd) - tau
    B, D = pred.shape[0], pred[0].numel()
    per = _sum_b(d * d) / (D if reduction == "mean" else 1)
    return (_w(weight, B, cd).to(d.device) * per).mean()


# ----------------------------------------------------------------------------------------------------
# The K3/K5 skeleton every backend implements (csrc/README.md, "K3/K5"), on [B, D] rows.

KINDS = {"l2": 0, "huber": 1, "pseudo_huber": 2}


def _diff(pred, t1, t2, coef):
    cd = compute_dtype(pred.dtype)
    if coef is None:
        tau = t1.to(cd)
    else:
        shape = (-1,) + (1,) * (pred.dim() - 1)
        tau = coef[:, 0].to(cd).reshape(shape) * t1.to(cd)
        if t2 is not None:
            tau = tau + coef[:, 1].to(cd).reshape(shape) * t2.to(cd)
    return pred.to(cd) - tau


def sums(pred, t1, t2, coef, kind: int, c: float):
    """[B] in the compute dtype: sum d^2 (kind 0, 2) or sum sqrt(d^2 + c^2) - c (kind 1)."""
    d = _diff(pred, t1, t2, coef)
    return _sum_b(torch.sqrt(d * d + c * c) - c) if kind == 1 else _sum_b(d * d)


def grad(pred, t1, t2, coef, kind: int, c: float, k):
    """k_b d (kind 0, 2) or k_b d / sqrt(d^2 + c^2) (kind 1), in pred's dtype."""
    d = _diff(pred, t1, t2, coef)
    kk = k.to(d.dtype).reshape((-1,) + (1,) * (pred.dim() - 1))
    out = kk * d / torch.sqrt(d * d + c * c) if kind == 1 else kk * d
    return out.to(pred.dtype)
