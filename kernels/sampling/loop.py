"""``sample``: a few-step sampling loop over the fused steps, with no host synchronization.

    sample(model_fn, x_T, schedule, steps, *, method="ddim", guidance=None, prediction=None, eta=0.0,
           source=None, seed=None, backend=None)

``model_fn(x, t)`` returns the model's output at (x, t) in ``prediction``'s parameterization, or, with
``guidance``, a pair (cond, uncond) that the step combines (classifier-free guidance fused into the
step). t is a per-sample device tensor: int64 timesteps on a VPSchedule, sigmas on an EDMSchedule,
flow times on a FlowSchedule. The timestep grid is built on the device before the loop, every step's
coefficients come from device tensors, and the noise of stochastic methods from a NoiseSource whose
offset advances on the device; so the whole loop is capturable as one graph (issue #7) when model_fn
is.

Methods and the schedules they take:
    VPSchedule    "ddim" (eta), "ddpm", "dpmpp_2m", "lcm"       (timesteps evenly spaced, "trailing")
    EDMSchedule   "euler", "heun"                                (Karras sigmas, prediction x0 or eps;
                                                                  Heun: 2 model calls a step, Euler last)
    FlowSchedule  "flow_euler"                                   (times 1 -> 0, shifted)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from flashdistill.kernels.rng import NoiseSource
from flashdistill.kernels.sampling import steps as S
from flashdistill.kernels.sampling.schedules import EDMSchedule, FlowSchedule, VPSchedule

VP_METHODS = ("ddim", "ddpm", "dpmpp_2m", "lcm")


def timesteps(schedule: VPSchedule, steps: int, device=None) -> Tensor:
    """"trailing" spacing (Lin et al. 2024, as diffusers' timestep_spacing="trailing"): T - 1, then down
    by T / steps, steps values, int64 on the device."""
    T = schedule.num_train_timesteps
    return (T - 1 - torch.arange(steps, device=device, dtype=torch.float64) * (T / steps)).round().to(torch.int64)


def sample(model_fn: Callable, x_T: Tensor, schedule, steps: int, *, method: str = "ddim", guidance=None,
           prediction: Optional[str] = None, eta: float = 0.0, source: Optional[NoiseSource] = None,
           seed: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """x_0 from x_T in ``steps`` steps (see the module docstring)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"sample: steps must be an int >= 1, got {steps!r}")
    B, dev = x_T.shape[0], x_T.device
    stochastic = method in ("ddpm", "lcm") or (method == "ddim" and eta > 0)
    if stochastic and source is None:
        if seed is None:
            raise ValueError(f"sample: method {method!r} draws noise: give source (a NoiseSource) or seed")
        source = NoiseSource(seed, dev)

    def call(x, t):
        out = model_fn(x, t)
        if guidance is None:
            return out, None
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("sample: with guidance, model_fn must return (cond, uncond)")
        return out[0], out[1]

    x = x_T
    if isinstance(schedule, VPSchedule):
        if method not in VP_METHODS:
            raise ValueError(f"sample: a VPSchedule takes method in {', '.join(VP_METHODS)}, got {method!r}")
        grid = timesteps(schedule, steps, dev)
        pred = prediction or "eps"
        x0_prev = t_last = None
        for i in range(steps):
            t = grid[i].expand(B)
            t_prev = (grid[i + 1] if i + 1 < steps else torch.tensor(-1, device=dev)).expand(B)
            c, u = call(x, t)
            kw = dict(prediction=pred, uncond=u, guidance=guidance, backend=backend)
            if method == "ddim":
                x = S.ddim_step(c, x, t, t_prev, schedule, eta=eta, source=source if eta > 0 else None, **kw)
            elif method == "ddpm":
                x = S.ddpm_step(c, x, t, t_prev, schedule, source=source, **kw)
            elif method == "lcm":
                x = S.lcm_step(c, x, t, t_prev, schedule, source=source if i + 1 < steps else None, **kw)
            elif i + 1 < steps:  # dpmpp_2m; its last step to alpha_bar = 1 is first order (DDIM)
                x, x0_prev = S.dpmpp_2m_step(c, x, t, t_prev, schedule, x0_prev=x0_prev, t_last=t_last, **kw)
                t_last = t
            else:
                x = S.ddim_step(c, x, t, t_prev, schedule, **kw)
        return x
    if isinstance(schedule, EDMSchedule):
        if method not in ("euler", "heun"):
            raise ValueError(f"sample: an EDMSchedule takes method 'euler' or 'heun', got {method!r}")
        sig = schedule.karras_sigmas(steps, dev)
        kw = dict(prediction=prediction or "x0", guidance=guidance, backend=backend)
        for i in range(steps):
            s, s_next = sig[i].expand(B), sig[i + 1].expand(B)
            c, u = call(x, s)
            if method == "euler" or i + 1 == steps:  # the last step goes to sigma = 0: Euler (Karras Alg. 1)
                x = S.euler_step(c, x, s, s_next, uncond=u, **kw)
            else:
                xp, half = S.heun_step(c, x, s, s_next, uncond=u, **kw)
                c, u = call(xp, s_next)
                x = S.heun_step(c, xp, s_next, None, half=half, sigma_prev=s, uncond=u, **kw)
        return x
    if isinstance(schedule, FlowSchedule):
        if method != "flow_euler":
            raise ValueError(f"sample: a FlowSchedule takes method 'flow_euler', got {method!r}")
        tt = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=dev)
        s = schedule.shift * tt / (1 + (schedule.shift - 1) * tt)
        for i in range(steps):
            c, u = call(x, s[i].expand(B))
            x = S.flow_euler_step(c, x, s[i].expand(B), s[i + 1].expand(B), uncond=u, guidance=guidance,
                                  backend=backend)
        return x
    raise TypeError(f"sample: unsupported schedule {type(schedule).__name__}")
