"""Parity with diffusers' schedulers (a test-only dependency): on the same inputs and timestep grids,
our fused steps give diffusers' x_{t-1} within an fp32 budget (relative 1e-5 of the largest value).
Grids and sigmas are taken from the scheduler itself, so these tests pin the conventions (trailing
spacing, final alpha_bar = 1, VE sigmas, flow shift, DPM-Solver++ midpoint update)."""

from __future__ import annotations

import pytest
import torch

import flashdistill as fd
from oracle import backends_under_test

diffusers = pytest.importorskip("diffusers")

BACKENDS = [b for b in backends_under_test("cpu") if b in ("reference", "cpu", "triton")]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _ours_vp():
    return fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim(backend, eta):
    s = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    s.set_timesteps(10)
    x, eps = _inputs(1)
    ts = s.timesteps
    for i in (0, 4, 9):
        t = ts[i]
        t_prev = ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        noise = fd.randn(x.shape, seed=3, offset=i, backend="cpu")
        ref = s.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        ours = fd.ddim_step(eps, x, t.expand(2).long(), t_prev.expand(2).long(), _ours_vp(), eta=eta, seed=3, offset=i,
                            backend=backend)
        _close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euler_discrete(backend):
    s = diffusers.EulerDiscreteScheduler(**SD)
    s.set_timesteps(10)
    x, eps = _inputs(2)
    for i in (0, 5, 9):
        s._step_index = i
        x_in = x * s.sigmas[i]
        ref = s.step(eps, s.timesteps[i], x_in).prev_sample
        ours = fd.euler_step(eps, x_in, s.sigmas[i].double().expand(2), s.sigmas[i + 1].double().expand(2),
                             prediction="eps", backend=backend)
        _close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_match_euler(backend):
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(8)
    x, v = _inputs(3)
    for i in (0, 3, 7):
        s._step_index = i
        ref = s.step(v, s.timesteps[i], x).prev_sample
        ours = fd.flow_euler_step(v, x, s.sigmas[i].double().expand(2), s.sigmas[i + 1].double().expand(2),
                                  backend=backend)
        _close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpm_solver_pp_2m(backend):
    """Three chained steps of DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, data
    prediction from eps), the first one first order, each from the same state on both sides."""
    s = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                              solver_type="midpoint", lower_order_final=False,
                                              timestep_spacing="trailing")
    s.set_timesteps(10)
    x, _ = _inputs(4)
    ts = s.timesteps
    x0_prev = t_last = None
    for i in range(3):
        eps = _inputs(10 + i)[1]
        ref = s.step(eps, ts[i], x).prev_sample
        t, t_prev = ts[i].expand(2).long(), ts[i + 1].expand(2).long()
        ours, x0 = fd.dpmpp_2m_step(eps, x, t, t_prev, _ours_vp(), x0_prev=x0_prev, t_last=t_last, backend=backend)
        _close(ours, ref)
        x, x0_prev, t_last = ref, x0, t


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddpm_and_lcm_final_steps(backend):
    """DDPM and LCM draw their noise from torch's generator inside diffusers, so the steps that add
    none are compared: the last ones (to alpha_bar = 1)."""
    x, eps = _inputs(5)
    s = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing")
    s.set_timesteps(10)
    t = s.timesteps[-1]
    ref = s.step(eps, t, x).prev_sample
    ours = fd.ddpm_step(eps, x, t.expand(2).long(), torch.full((2,), -1), _ours_vp(), seed=1, backend=backend)
    _close(ours, ref)
    s = diffusers.LCMScheduler(**SD, timestep_spacing="trailing")
    s.set_timesteps(4)
    s._step_index = len(s.timesteps) - 1
    out = s.step(eps, s.timesteps[-1], x)
    ours = fd.lcm_step(eps, x, s.timesteps[-1].expand(2).long(), torch.full((2,), -1), _ours_vp(), backend=backend)
    _close(ours, out.prev_sample)
    _close(ours, out.denoised)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heun_discrete(backend):
    """One full Heun step (two model calls) of HeunDiscreteScheduler against our two stages."""
    s = diffusers.HeunDiscreteScheduler(**SD)
    s.set_timesteps(6)
    sig = s.sigmas
    x, _ = _inputs(6)
    x_in = x * sig[0]
    model = lambda xx, sg: 0.3 * xx / (1 + sg)  # noqa: E731  (an eps prediction)
    s._step_index = 0
    xp = s.step(model(x_in, float(sig[0])), s.timesteps[0], x_in).prev_sample
    x_next = s.step(model(xp, float(sig[1])), s.timesteps[1], xp).prev_sample
    s0, s1 = sig[0].double().expand(2), sig[1].double().expand(2)
    o1, half = fd.heun_step(model(x_in, float(sig[0])), x_in, s0, s1, prediction="eps", backend=backend)
    _close(o1, xp)
    o2 = fd.heun_step(model(o1, float(sig[1])), o1, s1, None, half=half, sigma_prev=s0, prediction="eps",
                      backend=backend)
    _close(o2, x_next)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["ddpm", "lcm"])
def test_ddpm_and_lcm_noisy_steps(backend, which, monkeypatch):
    """The intermediate steps, which add noise: diffusers draws it with its own ``randn_tensor``, which
    this test replaces by our stream (seed, offset) so both sides add the same z."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    import diffusers.schedulers.scheduling_lcm as lcm_mod

    seed = 7
    state = {"offset": 0}

    def our_noise(shape, generator=None, device=None, dtype=None, **_):
        return fd.randn(shape, seed=seed, offset=state["offset"], backend="cpu").to(dtype)

    monkeypatch.setattr(ddpm_mod if which == "ddpm" else lcm_mod, "randn_tensor", our_noise)
    x, eps = _inputs(8)
    if which == "ddpm":
        s = diffusers.DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", timestep_spacing="trailing")
        s.set_timesteps(10)
        steps = (0, 4, 8)
    else:
        s = diffusers.LCMScheduler(**SD, timestep_spacing="trailing")
        s.set_timesteps(4)
        steps = (0, 1, 2)
    ts = s.timesteps
    for i in steps:
        state["offset"] = i
        t, t_prev = ts[i].expand(2).long(), ts[i + 1].expand(2).long()
        if which == "ddpm":
            ref = s.step(eps, ts[i], x).prev_sample
            ours = fd.ddpm_step(eps, x, t, t_prev, _ours_vp(), seed=seed, offset=i, backend=backend)
        else:
            s._step_index = i
            ref = s.step(eps, ts[i], x).prev_sample
            ours = fd.lcm_step(eps, x, t, t_prev, _ours_vp(), seed=seed, offset=i, backend=backend)
        _close(ours, ref)
