"""First-order sampler steps as one fused kernel each (affine_step; the formulas as their papers write
them are in reference.py, which the tests hold these to).

Every step here is affine in (x, x0_hat, z): x_next = kx x + k0 x0_hat + kz z, with x0_hat = ax x + ap p
the model output p (after classifier-free guidance) converted from its parameterization, so the
per-sample coefficients are computed here on the device in float64 ([B] vectors: no host sync, and
per-sample timesteps as distillation training needs) and the kernel reads x and the predictions
once and writes x_next once (and x0_hat when asked, for LCM / DMD / DPM-Solver history).

    ddim_step(model_output, x, t, t_prev, schedule, *, prediction="eps", eta=0.0, ...)
    ddpm_step(model_output, x, t, t_prev, schedule, *, prediction="eps", ...)       ancestral
    dpmpp_2m_step(model_output, x, t, t_prev, t_prev2, x0_prev, schedule, ...)     DPM-Solver++(2M)
    lcm_step(model_output, x, t, t_prev, schedule, *, prediction="eps", ...)        LCM multistep
    euler_step(model_output, x, sigma, sigma_next, *, prediction="x0", ...)        EDM / VE
    heun_step(...)                                                                 EDM, two stages
    flow_euler_step(model_output, x, sigma, sigma_next, ...)                      rectified flow

Shared keyword options: ``uncond`` and ``guidance`` (classifier-free guidance on the model output,
``cfg="ho"`` uncond + w (cond - uncond) or ``"offset"`` cond + w (cond - uncond); w a float or [B]),
``return_x0``, ``backend``; a stochastic step (DDIM with eta > 0) draws its noise from ``source`` (a
NoiseSource) or ``seed`` / ``offset`` (flashdistill.randn's stream).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, params
from flashdistill.kernels.rng import _offset_tensor


def _run(op, model_output, x, ax, ap, kx, k0, kz, *, uncond, guidance, cfg, seed, offset, source, return_x0,
         backend, hist=None, kh=None, second=None):
    """The affine_step call; ``second`` = (qx, q0) for the secondary output (default x0_hat: 0, 1)."""
    checks.tensor(op, "x", x, min_dim=2)
    checks.like(op, "model_output", model_output, "x", x)
    if uncond is not None:
        checks.like(op, "uncond", uncond, "x", x)
    w_t, w = params.guidance_arg(op, "guidance", guidance, uncond, "uncond", cfg, x)
    cd = checks.compute_dtype(x.dtype)
    if hist is not None:
        checks.like(op, "x0_prev", hist, "x", x)
    qx, q0 = second if second is not None else (torch.zeros_like(kx), torch.ones_like(kx))
    coef = torch.stack([ax, ap, kx, k0, kh if kh is not None else torch.zeros_like(kx), kz, qx, q0], 1).to(cd)
    stochastic = source is not None or seed is not None
    if stochastic:
        if source is not None and seed is not None:
            raise ValueError(f"{op}: give seed (with offset) or source, not both")
        if source is not None:
            seed, off = source.seed, source.offset
        else:
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise ValueError(f"{op}: seed must be an int in [0, 2^63), got {seed!r}")
            off = _offset_tensor(offset, x.device)
    else:
        seed, off = 0, torch.zeros((), dtype=torch.int64, device=x.device)
    from flashdistill.kernels.sampling import IMPLEMENTED, _step_op

    backend = backends.requested(op, backend, x.device, IMPLEMENTED)
    out, x0, _ = _step_op(x, model_output, uncond, hist, w_t, w, coef, None, stochastic, seed, off, 0, return_x0,
                          False, backend)
    if source is not None:
        source.offset.add_(1)
    return (out, x0) if return_x0 else out


def _needs_noise(op, stochastic: bool, seed, source):
    if stochastic and seed is None and source is None:
        raise ValueError(f"{op}: a stochastic step needs seed (with offset) or source for its noise")


def ddim_step(model_output: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, schedule, *, prediction: str = "eps",
              eta: float = 0.0, uncond: Optional[Tensor] = None, guidance=None, cfg: str = "ho",
              seed: Optional[int] = None, offset=0, source=None, return_x0: bool = False,
              backend: Optional[str] = None):
    """DDIM (Song et al. 2021) from timesteps t to t_prev (int64 [B]; t_prev = -1 means alpha_bar = 1,
    the final step) on a VPSchedule; eta > 0 adds the Eq. 16 noise (eta = 1: DDPM's posterior variance)."""
    op = "ddim_step"
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"{op}: eta must be a float >= 0, got {eta!r}")
    _needs_noise(op, eta > 0, seed, source)
    ab_t, ab_p, a_t, s_t, ax, ap = _vp_setup(op, x, t, t_prev, schedule, prediction)
    s = eta * torch.sqrt((1 - ab_p) / (1 - ab_t)) * torch.sqrt(1 - ab_t / ab_p)
    c = torch.sqrt((1 - ab_p - s**2).clamp(min=0))
    kx = c / s_t
    k0 = ab_p.sqrt() - c * a_t / s_t
    return _run(op, model_output, x, ax, ap, kx, k0, s, uncond=uncond, guidance=guidance, cfg=cfg,
                seed=seed if eta > 0 else None, offset=offset, source=source if eta > 0 else None,
                return_x0=return_x0, backend=backend)


def _vp_setup(op, x, t, t_prev, schedule, prediction):
    """(abar_t, abar_prev, alpha_t, sigma_t, ax, ap): the pair of _vp_pair and the x0 coefficients of
    the model's parameterization at t."""
    ab_t, ab_p = _vp_pair(op, x, t, t_prev, schedule)
    a_t, s_t = ab_t.sqrt(), (1 - ab_t).sqrt()
    ax, ap = params.x0_coefficients(op, prediction, a_t, s_t, x.shape[0], x.device)
    return ab_t, ab_p, a_t, s_t, ax, ap


def _vp_pair(op, x, t, t_prev, schedule):
    """(abar_t, abar_prev) [B] float64 from int64 timesteps; t_prev = -1 means abar_prev = 1."""
    for name, v in (("t", t), ("t_prev", t_prev)):
        if not isinstance(v, Tensor) or v.dtype != torch.int64 or v.shape != (x.shape[0],) or v.device != x.device:
            raise ValueError(f"{op}: {name} must be an int64 [{x.shape[0]}] tensor on {x.device}")
    table = schedule.alphas_cumprod
    ab_t = table.gather(0, t)
    ab_p = torch.where(t_prev >= 0, table.gather(0, t_prev.clamp(min=0)), torch.ones_like(ab_t))
    return ab_t, ab_p


def ddpm_step(model_output: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, schedule, *, prediction: str = "eps",
              uncond: Optional[Tensor] = None, guidance=None, cfg: str = "ho", seed: Optional[int] = None, offset=0,
              source=None, return_x0: bool = False, backend: Optional[str] = None):
    """DDPM ancestral step (Ho et al. 2020) from t to t_prev on a VPSchedule, "fixed_small" variance;
    the noise vanishes on the final step (t_prev = -1)."""
    op = "ddpm_step"
    _needs_noise(op, True, seed, source)
    ab_t, ab_p, a_t, s_t, ax, ap = _vp_setup(op, x, t, t_prev, schedule, prediction)
    alpha = ab_t / ab_p
    beta = 1 - alpha
    k0 = ab_p.sqrt() * beta / (1 - ab_t)
    kx = alpha.sqrt() * (1 - ab_p) / (1 - ab_t)
    kz = torch.sqrt((1 - ab_p) / (1 - ab_t) * beta)
    return _run(op, model_output, x, ax, ap, kx, k0, kz, uncond=uncond, guidance=guidance, cfg=cfg, seed=seed,
                offset=offset, source=source, return_x0=return_x0, backend=backend)


def lcm_step(model_output: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, schedule, *, prediction: str = "eps",
             timestep_scaling: float = 10.0, sigma_data: float = 0.5, uncond: Optional[Tensor] = None, guidance=None,
             cfg: str = "ho", seed: Optional[int] = None, offset=0, source=None, return_x0: bool = False,
             backend: Optional[str] = None):
    """LCM / consistency multistep (Luo et al. 2023): the consistency function's output c_skip x +
    c_out x0_hat, re-noised to t_prev (t_prev = -1: the final step returns the denoised sample)."""
    op = "lcm_step"
    ab_t, ab_p, a_t, s_t, ax, ap = _vp_setup(op, x, t, t_prev, schedule, prediction)
    st = timestep_scaling * t.to(torch.float64)
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    kz = (1 - ab_p).sqrt()
    stochastic = seed is not None or source is not None
    if not stochastic and t_prev.device.type == "cpu" and not torch.compiler.is_compiling() and \
            bool((t_prev >= 0).any()):
        raise ValueError(f"{op}: re-noising to t_prev >= 0 needs seed (with offset) or source")
    return _run(op, model_output, x, ax, ap, ab_p.sqrt() * c_skip, ab_p.sqrt() * c_out, kz, uncond=uncond,
                guidance=guidance, cfg=cfg, seed=seed, offset=offset, source=source, return_x0=return_x0,
                backend=backend)


def dpmpp_2m_step(model_output: Tensor, x: Tensor, t: Tensor, t_prev: Tensor, schedule, *,
                  x0_prev: Optional[Tensor] = None, t_last: Optional[Tensor] = None, prediction: str = "eps",
                  uncond: Optional[Tensor] = None, guidance=None, cfg: str = "ho", backend: Optional[str] = None):
    """DPM-Solver++(2M), data prediction, midpoint form (Lu et al. 2022, Alg. 2; diffusers'
    multistep_dpm_solver_second_order_update) from t to t_prev on a VPSchedule. x0_prev is the data
    prediction of the previous step (taken at t_last); without it (the first step) the update is first
    order (= DDIM). Returns (x_next, x0_hat): x0_hat is the next step's x0_prev. lambda = log(alpha / sigma),
    h = lambda_prev - lambda_t, r0 = (lambda_t - lambda_last) / h, D1 = (x0 - x0_prev) / r0:
    x_next = (sigma_prev / sigma_t) x - alpha_prev (e^-h - 1)(x0 + D1 / 2)."""
    op = "dpmpp_2m_step"
    ab_t, ab_p, a_t, s_t, ax, ap = _vp_setup(op, x, t, t_prev, schedule, prediction)
    if t_prev.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_prev < 0).any()):
        raise ValueError(f"{op}: t_prev must be >= 0 (the final step to alpha_bar = 1 has lambda = inf; use ddim_step)")
    a_p, s_p = ab_p.sqrt(), (1 - ab_p).sqrt()
    lam_t, lam_p = torch.log(a_t / s_t), torch.log(a_p / s_p)
    hh = lam_p - lam_t
    phi = torch.expm1(-hh)  # e^-h - 1
    kx = s_p / s_t
    if x0_prev is None:
        k0, kh = -a_p * phi, None
    else:
        if t_last is None:
            raise ValueError(f"{op}: x0_prev needs t_last, the timestep it was predicted at")
        ab_l, _ = _vp_pair(op, x, t_last, t_last, schedule)
        r0 = (lam_t - torch.log(ab_l.sqrt() / (1 - ab_l).sqrt())) / hh
        k0 = -a_p * phi * (1 + 0.5 / r0)
        kh = a_p * phi * (0.5 / r0)
    return _run(op, model_output, x, ax, ap, kx, k0, torch.zeros_like(kx), uncond=uncond, guidance=guidance, cfg=cfg,
                seed=None, offset=0, source=None, return_x0=True, backend=backend, hist=x0_prev, kh=kh)


def _ve_x0(op, prediction, sig):
    """(ax, ap) of x0_hat = ax x + ap pred on x = x0 + sigma eps: the EDM denoiser ("x0") or "eps"."""
    if prediction == "x0":
        return torch.zeros_like(sig), torch.ones_like(sig)
    if prediction == "eps":
        return torch.ones_like(sig), -sig
    raise ValueError(f"{op}: prediction={prediction!r} is not one of x0, eps (VE form)")


def euler_step(model_output: Tensor, x: Tensor, sigma, sigma_next, *, prediction: str = "x0",
               uncond: Optional[Tensor] = None, guidance=None, cfg: str = "ho", return_x0: bool = False,
               backend: Optional[str] = None):
    """Euler (Karras et al. 2022) on x = x0 + sigma eps: x_next = x + (sigma_next - sigma)(x - x0_hat) / sigma.
    prediction "x0" (the EDM denoiser D) or "eps" (x0_hat = x - sigma eps)."""
    op = "euler_step"
    B = x.shape[0]
    sig = params.per_sample_schedule(op, "sigma", sigma, B, x.device)
    nxt = params.per_sample_schedule(op, "sigma_next", sigma_next, B, x.device)
    ax, ap = _ve_x0(op, prediction, sig)
    r = nxt / sig
    return _run(op, model_output, x, ax, ap, r, 1 - r, torch.zeros_like(sig), uncond=uncond, guidance=guidance,
                cfg=cfg, seed=None, offset=0, source=None, return_x0=return_x0, backend=backend)


def heun_step(model_output: Tensor, x: Tensor, sigma, sigma_next, *, half: Optional[Tensor] = None,
              sigma_prev=None, prediction: str = "x0", uncond: Optional[Tensor] = None, guidance=None, cfg: str = "ho",
              backend: Optional[str] = None):
    """Heun's second-order step (Karras et al. 2022, Alg. 1) in two kernel calls, VE form.

    Stage 1 (``half`` None): at (x_i, sigma_i = sigma), d_i = (x_i - x0_hat) / sigma_i; returns
    (x', half) with x' = x_i + (sigma_next - sigma_i) d_i, the point the model is evaluated at next,
    and half = x_i + (sigma_next - sigma_i) d_i / 2. Stage 2 (``half`` given, x = x', sigma = sigma_next
    of stage 1, ``sigma_prev`` = sigma_i): d' = (x' - x0_hat') / sigma', x_{i+1} = half + (sigma' -
    sigma_i) d' / 2. Each stage reads x and the model output once and writes its outputs once. With
    sigma_next = 0 Karras et al. take the Euler step alone (stage 1's x')."""
    op = "heun_step"
    B = x.shape[0]
    sig = params.per_sample_schedule(op, "sigma", sigma, B, x.device)
    ax, ap = _ve_x0(op, prediction, sig)
    zero = torch.zeros_like(sig)
    if half is None:
        nxt = params.per_sample_schedule(op, "sigma_next", sigma_next, B, x.device)
        r = (nxt - sig) / sig  # x' = x + r (x - x0) = (1 + r) x - r x0; half: r / 2
        return _run(op, model_output, x, ax, ap, 1 + r, -r, zero, uncond=uncond, guidance=guidance, cfg=cfg,
                    seed=None, offset=0, source=None, return_x0=True, backend=backend, second=(1 + r / 2, -r / 2))
    if sigma_prev is None:
        raise ValueError(f"{op}: stage 2 (half given) needs sigma_prev, the sigma of stage 1's x_i")
    prev = params.per_sample_schedule(op, "sigma_prev", sigma_prev, B, x.device)
    r = (sig - prev) / (2 * sig)  # x_next = half + (sigma' - sigma_i) (x' - x0') / (2 sigma')
    return _run(op, model_output, x, ax, ap, r, -r, zero, uncond=uncond, guidance=guidance, cfg=cfg, seed=None,
                offset=0, source=None, return_x0=False, backend=backend, hist=half, kh=torch.ones_like(sig))


def flow_euler_step(model_output: Tensor, x: Tensor, sigma, sigma_next, *, uncond: Optional[Tensor] = None,
                    guidance=None, cfg: str = "ho", return_x0: bool = False, backend: Optional[str] = None):
    """Rectified-flow Euler: x_next = x + (sigma_next - sigma) v_hat, v_hat the (guided) velocity; as an
    affine step with x0_hat = x - sigma v_hat: x_next = (sigma_next / sigma) x + (1 - sigma_next / sigma) x0_hat."""
    op = "flow_euler_step"
    B = x.shape[0]
    sig = params.per_sample_schedule(op, "sigma", sigma, B, x.device)
    nxt = params.per_sample_schedule(op, "sigma_next", sigma_next, B, x.device)
    if sig.device.type == "cpu" and not torch.compiler.is_compiling() and bool((sig <= 0).any()):
        raise ValueError(f"{op}: sigma must be > 0 (the step divides by it)")
    r = nxt / sig
    return _run(op, model_output, x, torch.ones_like(sig), -sig, r, 1 - r, torch.zeros_like(sig), uncond=uncond,
                guidance=guidance, cfg=cfg, seed=None, offset=0, source=None, return_x0=return_x0, backend=backend)
