"""Schedules and q_sample (issue #5): the schedules' tables against their papers' formulas, q_sample
on every backend against the float64 spec (given noise and noise drawn in the kernel, which must be
flashdistill.randn's stream), gradients, the NoiseSource's device-side offset, timestep samplers,
the op contract and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import flashdistill as fd
from flashdistill.kernels import sampling
from flashdistill.kernels.sampling import reference as sampling_reference
from flashdistill.kernels.rng import reference as rng_reference
from oracle import assert_within_budget, backends_under_test, randn

BACKENDS = [b for b in backends_under_test("cpu") if b in sampling.IMPLEMENTED]


def test_vp_schedules():
    lin = fd.VPSchedule()
    torch.testing.assert_close(lin.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000,
                                                                                    dtype=torch.float64), 0))
    sd = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert abs(sd.alphas_cumprod[-1].item() - 0.0047) < 1e-4  # Stable Diffusion's final alpha_bar ~ 0.0047
    cos = fd.VPSchedule(beta_schedule="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):  # Nichol & Dhariwal: alpha_bar_t = f(t) / f(0), before the 0.999 clip binds
        assert abs(cos.alphas_cumprod[i].item() - f(i + 1) / f(0)) < 1e-12
    a, s = sd.coefficients(torch.tensor([0, 999, 500]))
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64))


def test_continuous_schedules():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    a, s = fd.FlowSchedule(shift=3.0).coefficients(t)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    torch.testing.assert_close(a, 1 - s)
    a, s = fd.TrigFlowSchedule().coefficients(t)
    torch.testing.assert_close(a, torch.cos(t))
    edm = fd.EDMSchedule()
    sig = edm.karras_sigmas(5)
    assert sig.shape == (6,) and sig[0].item() == pytest.approx(80.0) and sig[4].item() == pytest.approx(0.002)
    assert sig[-1].item() == 0.0 and bool((sig[:-1].diff() < 0).all())
    a, s = edm.coefficients(sig[:3])
    assert torch.equal(a, torch.ones(3, dtype=torch.float64)) and torch.equal(s, sig[:3])


def test_timestep_samplers():
    src = fd.NoiseSource(seed=3)
    t = fd.uniform_timesteps(src, 1000, 20, 980)
    assert t.dtype == torch.int64 and int(t.min()) >= 20 and int(t.max()) < 980 and t.unique().numel() > 500
    sig = fd.lognormal_sigmas(src, 4000)
    assert abs(sig.log().mean().item() + 1.2) < 5 * 1.2 / math.sqrt(4000)
    u = fd.logit_normal_times(src, 100)
    assert bool(((u > 0) & (u < 1)).all())
    assert int(src.offset) == 3
    src.offset.zero_()
    assert torch.equal(fd.uniform_timesteps(src, 1000, 20, 980), t)


def _oracle(x0, alpha, sigma, eps):
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return alpha.double().reshape(shape) * x0.double() + sigma.double().reshape(shape) * eps.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (1, 1), (5, 1021)], ids=str)
def test_q_sample_drawn_noise(backend, dtype, shape):
    g = torch.Generator().manual_seed(1)
    x0 = randn(shape, dtype, generator=g)
    sch = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    xt, eps = fd.q_sample(x0, t, sch, seed=11, offset=4, start=3, return_noise=True, backend=backend)
    assert xt.dtype == dtype and eps.dtype == dtype and xt.shape == x0.shape
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    eps64 = rng_reference.normal(x0.numel(), 11, 4, 3, torch.float64).reshape(shape)
    a, s = sch.coefficients(t)
    ref = _oracle(x0, a, s, eps64)
    # the spec in the compute dtype (its log / sin / cos rounded there), then in the output dtype
    eps_cd = rng_reference.normal(x0.numel(), 11, 4, 3, cd).reshape(shape)
    shp = (-1,) + (1,) * (x0.dim() - 1)
    ref_dtype = (a.to(cd).reshape(shp) * x0.to(cd) + s.to(cd).reshape(shp) * eps_cd).to(dtype)
    # x_t's two terms can cancel: the budget scales with the largest output (cancels)
    assert_within_budget(f"q_sample {backend} {dtype}", xt, ref, ref_dtype, dtype, n_reduce=2, cancels=True)
    assert_within_budget(f"q_sample eps {backend} {dtype}", eps, eps64, eps_cd.to(dtype), dtype, n_reduce=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_given_noise_and_gradients(backend):
    g = torch.Generator().manual_seed(2)
    x0 = randn((6, 3, 9), torch.float32, generator=g)[::2]  # a batch-strided view
    noise = randn((3, 3, 9), torch.float32, generator=g)
    alpha = torch.tensor([0.9, 0.5, 0.07], dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    xx, nn = x0.clone().requires_grad_(True), noise.clone().requires_grad_(True)
    xt = fd.q_sample(xx, alpha=alpha, sigma=sigma, noise=nn, backend=backend)
    gout = randn(xt.shape, torch.float32, generator=g)
    xt.backward(gout)
    x6, n6 = x0.double().requires_grad_(True), noise.double().requires_grad_(True)
    ref = _oracle(x6, alpha, sigma, n6)
    ref.backward(gout.double())
    assert_within_budget(f"q_sample given noise {backend}", xt, ref, ref.float(), torch.float32, n_reduce=2)
    torch.testing.assert_close(xx.grad.double(), x6.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(nn.grad.double(), n6.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_sample_noise_source(backend):
    x0 = torch.randn(2, 50)
    src = fd.NoiseSource(seed=9)
    a = fd.q_sample(x0, alpha=0.8, sigma=0.6, source=src, backend=backend)
    b = fd.q_sample(x0, alpha=0.8, sigma=0.6, source=src, backend=backend)
    assert int(src.offset) == 2 and not torch.equal(a, b)
    torch.testing.assert_close(b, 0.8 * x0 + 0.6 * fd.randn((2, 50), seed=9, offset=1, backend="cpu"),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_affine_step_opcheck_gradcheck_and_compile(backend):
    g = torch.Generator().manual_seed(3)
    x, p, pu, h = (torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
    coef = torch.rand(3, 8, generator=g, dtype=torch.float64)
    off = torch.tensor(2)
    w_t = torch.rand(3, generator=g, dtype=torch.float64)
    op = torch.ops.flashdistill.affine_step.default
    torch.library.opcheck(op, (x, p, pu, h, w_t, 1.0, coef, None, True, 4, off, 0, True, True, backend))
    torch.library.opcheck(op, (x, p, None, None, None, 1.0, coef, torch.randn(3, 5, dtype=torch.float64,
                                                                               requires_grad=True), False, 0, off, 0,
                               True, False, backend))
    n = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: op(a[0], a[1], a[2], a[3], w_t, 2.0, coef, a[4], False, 0, off, 0, True,
                                           False, backend)[:2], (x, p, pu, h, n))

    def step(x):
        return fd.q_sample(x, alpha=coef[:, 0], sigma=coef[:, 1], seed=4, offset=off, backend=backend)

    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(x), step(x))


def _guided(cond, uncond, w, cfg="ho"):
    w = w.reshape(-1, *([1] * (cond.dim() - 1))) if isinstance(w, torch.Tensor) else w
    return uncond + w * (cond - uncond) if cfg == "ho" else cond + w * (cond - uncond)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step(backend, prediction, eta):
    g = torch.Generator().manual_seed(4)
    B, shape = 4, (4, 3, 6, 5)
    x, c, u = (randn(shape, torch.float32, generator=g) for _ in range(3))
    sch = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([999, 601, 250, 20])
    t_prev = torch.tensor([979, 501, 0, -1])
    w = torch.tensor([7.5, 1.0, 3.0, 0.0])
    out, x0 = fd.ddim_step(c, x, t, t_prev, sch, prediction=prediction, eta=eta, uncond=u, guidance=w, seed=8,
                           offset=3, return_x0=True, backend=backend)
    ab_t = sch.alphas_cumprod[t]
    ab_p = torch.where(t_prev >= 0, sch.alphas_cumprod[t_prev.clamp(min=0)], torch.ones(B, dtype=torch.float64))
    a, s = ab_t.sqrt(), (1 - ab_t).sqrt()
    p = _guided(c.double(), u.double(), w.double())
    x0_ref = fd.to_x0(p, x.double(), space=prediction, alpha=a, sigma=s) if prediction != "x0" else p
    z = rng_reference.normal(x.numel(), 8, 3, 0, torch.float64).reshape(shape)
    ref = sampling_reference.ddim_step(x.double(), x0_ref, ab_t, ab_p, eta, z)
    torch.testing.assert_close(x0.double(), x0_ref, rtol=2e-5, atol=2e-5 * x0_ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_dpmpp_2m_steps(backend, prediction):
    """Three DPM-Solver++(2M) steps (the first one first order), the x0 history carried between them."""
    g = torch.Generator().manual_seed(7)
    shape = (2, 3, 4, 6)
    sch = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    grid = [torch.tensor([999, 899]), torch.tensor([749, 649]), torch.tensor([499, 399]), torch.tensor([249, 149])]
    x = randn(shape, torch.float32, generator=g)
    x_ref, x0_prev, x0_prev_ref, t_last = x.double(), None, None, None
    for t, t_prev in zip(grid[:-1], grid[1:]):
        out = randn(shape, torch.float32, generator=g)  # the model's output at (x, t)
        x, x0 = fd.dpmpp_2m_step(out, x, t, t_prev, sch, x0_prev=x0_prev, t_last=t_last, prediction=prediction,
                                 backend=backend)
        ab_t, ab_p = sch.alphas_cumprod[t], sch.alphas_cumprod[t_prev]
        x0_ref = out.double() if prediction == "x0" else \
            fd.to_x0(out.double(), x_ref, space="eps", alpha=ab_t.sqrt(), sigma=(1 - ab_t).sqrt())
        x_ref = sampling_reference.dpmpp_2m_step(x_ref, x0_ref, x0_prev_ref, ab_t, ab_p,
                                                 None if t_last is None else sch.alphas_cumprod[t_last])
        torch.testing.assert_close(x.double(), x_ref, rtol=1e-4, atol=1e-4 * x_ref.abs().max().item())
        x0_prev, x0_prev_ref, t_last = x0, x0_ref, t
        x_ref = x.double()  # the next step starts from the kernel's state (no drift compounding in the check)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_heun_step(backend, prediction):
    """Both stages against Karras et al.'s Alg. 1 with a model that is a fixed linear map of its input."""
    g = torch.Generator().manual_seed(8)
    shape = (3, 2, 5, 6)
    x = randn(shape, torch.float32, generator=g)
    sigma = torch.tensor([10.0, 2.0, 0.5], dtype=torch.float64)
    sigma_next = torch.tensor([6.0, 1.2, 0.1], dtype=torch.float64)
    model = lambda xx, s: 0.3 * xx / (1 + s.reshape(-1, 1, 1, 1).to(xx.dtype))  # noqa: E731  (an x0 prediction)

    def as_pred(x0, xx, s):  # the model's output in `prediction` for the x0 it means
        return x0 if prediction == "x0" else (xx - x0) / s.reshape(-1, 1, 1, 1).to(xx.dtype)

    out1 = as_pred(model(x, sigma), x, sigma)
    xp, half = fd.heun_step(out1, x, sigma, sigma_next, prediction=prediction, backend=backend)
    out2 = as_pred(model(xp, sigma_next), xp, sigma_next)
    x_next = fd.heun_step(out2, xp, sigma_next, None, half=half, sigma_prev=sigma, prediction=prediction,
                          backend=backend)
    ref = sampling_reference.heun_step(x.double(), model(x.double(), sigma), sigma, sigma_next,
                                       lambda v: model(v, sigma_next))
    torch.testing.assert_close(x_next.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", ["ddpm", "lcm"])
def test_ddpm_and_lcm_steps(backend, step):
    g = torch.Generator().manual_seed(6)
    shape = (4, 2, 5, 7)
    x, c, u = (randn(shape, torch.float32, generator=g) for _ in range(3))
    sch = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([999, 759, 499, 259])
    t_prev = torch.tensor([759, 499, 259, -1])
    fn = fd.ddpm_step if step == "ddpm" else fd.lcm_step
    out = fn(c, x, t, t_prev, sch, prediction="v", uncond=u, guidance=torch.tensor([1.0, 2.0, 3.0, 4.0]), seed=2,
             offset=5, backend=backend)
    ab_t = sch.alphas_cumprod[t]
    ab_p = torch.where(t_prev >= 0, sch.alphas_cumprod[t_prev.clamp(min=0)], torch.ones(4, dtype=torch.float64))
    p = _guided(c.double(), u.double(), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    x0 = fd.to_x0(p, x.double(), space="v", alpha=ab_t.sqrt(), sigma=(1 - ab_t).sqrt())
    z = rng_reference.normal(x.numel(), 2, 5, 0, torch.float64).reshape(shape)
    ref = sampling_reference.ddpm_step(x.double(), x0, ab_t, ab_p, z) if step == "ddpm" else \
        sampling_reference.lcm_step(x.double(), x0, t, ab_p, z)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_euler_and_flow_steps(backend, prediction):
    g = torch.Generator().manual_seed(5)
    shape = (3, 2, 7, 9)
    x, c, u = (randn(shape, torch.float32, generator=g) for _ in range(3))
    sig = fd.EDMSchedule().karras_sigmas(4)
    sigma, sigma_next = sig[:3], sig[1:4]
    out = fd.euler_step(c, x, sigma, sigma_next, prediction=prediction, uncond=u, guidance=2.5, cfg="offset",
                        backend=backend)
    p = _guided(c.double(), u.double(), 2.5, "offset")
    x0 = p if prediction == "x0" else x.double() - sigma.reshape(-1, 1, 1, 1) * p
    ref = sampling_reference.euler_step(x.double(), x0, sigma, sigma_next)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    s = torch.tensor([1.0, 0.6, 0.25], dtype=torch.float64)
    s_next = torch.tensor([0.6, 0.25, 0.0], dtype=torch.float64)
    out = fd.flow_euler_step(c, x, s, s_next, backend=backend)
    ref = sampling_reference.flow_euler_step(x.double(), c.double(), s, s_next)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "cpu"])
def test_steps_on_large_odd_rows(backend):
    """Calls of tens of MB (several tiles per thread, the size the streaming-store experiment of NOTES
    "samplers v0.2" used): rows of odd length, so tiles start mid-row and mid-line; a sliced
    (non-contiguous) x; the poisoned output must be written everywhere, given and drawn noise alike."""
    g = torch.Generator().manual_seed(11)
    B, D = 3, 700_001  # 3 x 2.8 MB per tensor; euler moves 3 of them (25 MB), q_sample 3, flow_euler + cfg 4
    x = randn((B, D + 5), torch.float32, generator=g)[:, 3:D + 3]
    c, u, noise = (randn((B, D), torch.float32, generator=g) for _ in range(3))
    sigma = torch.tensor([3.0, 1.0, 0.4], dtype=torch.float64)
    sigma_next = torch.tensor([1.0, 0.4, 0.0], dtype=torch.float64)
    out = fd.euler_step(c, x, sigma, sigma_next, backend=backend)
    ref = sampling_reference.euler_step(x.double(), c.double(), sigma, sigma_next)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    s, s_next = torch.tensor([1.0, 0.6, 0.25], dtype=torch.float64), torch.tensor([0.6, 0.25, 0.0], dtype=torch.float64)
    out = fd.flow_euler_step(c, x, s, s_next, uncond=u, guidance=3.5, backend=backend)
    ref = sampling_reference.flow_euler_step(x.double(), _guided(c.double(), u.double(), 3.5, "ho"), s, s_next)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
    alpha, sig = torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), torch.tensor([0.3, 0.8, 0.99], dtype=torch.float64)
    out = fd.q_sample(x, alpha=alpha, sigma=sig, noise=noise, backend=backend)
    ref = alpha.view(-1, 1) * x.double() + sig.view(-1, 1) * noise.double()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
    out, drawn = fd.q_sample(x, alpha=alpha, sigma=sig, seed=9, return_noise=True, backend=backend)
    ref = alpha.view(-1, 1) * x.double() + sig.view(-1, 1) * drawn.double()
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())
    out = fd.q_sample(x, alpha=alpha, sigma=sig, seed=9, backend=backend)  # drawn without the noise output
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("call,match", [
    (lambda x: fd.q_sample(x, alpha=0.5, sigma=0.5), r"q_sample: give exactly one of noise, seed .* or source"),
    (lambda x: fd.q_sample(x, alpha=0.5, sigma=0.5, seed=1, noise=x), r"give exactly one of noise"),
    (lambda x: fd.q_sample(x, torch.tensor([1, 2]), seed=1), r"q_sample: t needs a schedule"),
    (lambda x: fd.q_sample(x, seed=1), r"q_sample: needs a schedule and t, or alpha and sigma"),
    (lambda x: fd.q_sample(x, alpha=torch.ones(3), sigma=0.5, seed=1), r"argument 'alpha' must be a float or a per-"),
    (lambda x: fd.q_sample(x, alpha=0.5, sigma=0.5, noise=x[:, :2]), r"'noise' must match 'x0'"),
    (lambda x: fd.q_sample(x, alpha=0.5, sigma=0.5, noise=x, return_noise=True), r"return_noise is for drawn"),
    (lambda x: fd.q_sample(x, torch.tensor([1.0, 2.0]), fd.VPSchedule(), seed=1), r"times must be a 1-d int64"),
    (lambda x: fd.VPSchedule(beta_schedule="sqrt"), r"beta_schedule='sqrt' is not one of"),
    (lambda x: fd.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([1, 1]), fd.VPSchedule(), eta=0.5),
     r"ddim_step: a stochastic step needs seed"),
    (lambda x: fd.ddim_step(x, x, torch.tensor([5, 5]), torch.tensor([1.0, 1.0]), fd.VPSchedule()),
     r"ddim_step: t_prev must be an int64 \[2\] tensor"),
    (lambda x: fd.euler_step(x, x, 1.0, 0.5, prediction="v"), r"euler_step: prediction='v' is not one of"),
    (lambda x: fd.euler_step(x, x, 1.0, 0.5, uncond=x), r"uncond is given but guidance is None"),
    (lambda x: fd.flow_euler_step(x, x, 0.0, 0.5), r"flow_euler_step: sigma must be > 0"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(torch.randn(2, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_q_sample(backend, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x0 = torch.randn(8, 4, 33, 17, dtype=dtype, device="cuda")
    sch = fd.VPSchedule(device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    off = torch.tensor(3, device="cuda")
    xt, eps = fd.q_sample(x0, t, sch, seed=1, offset=off, return_noise=True, backend=backend)
    xr, er = fd.q_sample(x0.cpu(), t.cpu(), fd.VPSchedule(), seed=1, offset=3, return_noise=True, backend="cpu")
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(eps.cpu(), er, **tol)
    torch.testing.assert_close(xt.cpu(), xr, **tol)


# ---- sample(): whole loops on a problem with an exact denoiser ---------------------------------------
# Data x0 ~ N(0, S^2 I): every conditional expectation is linear, so the ideal model outputs are known
# in closed form and a sampler should map x_T to samples of standard deviation S, up to its
# discretization error. The tolerances are that error at the step counts used (measured: DDIM, Euler
# and flow Euler are first order, and the first / last steps of DPM-Solver++(2M) are too), with a
# convergence check: twice the steps, a smaller error. A sign or coefficient error breaks both.
S_DATA = 0.5
LONG = [b for b in BACKENDS if b != "triton"]  # the interpreter is too slow for hundreds of steps


def _vp_model(schedule, prediction, guided=False, consistency=False):
    def fn(x, t):
        a, s = (v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) for v in schedule.coefficients(t))
        var = a**2 * S_DATA**2 + s**2
        if consistency:  # an exact consistency function: the ODE's flow map to t = 0, x S / sqrt(var)
            st = 10.0 * t.to(x.dtype).reshape(a.shape)
            c_skip, c_out = 0.25 / (st**2 + 0.25), st / torch.sqrt(st**2 + 0.25)
            out = (S_DATA / var.sqrt() * x - c_skip * x) / c_out  # so that c_skip x + c_out x0_hat = f(x)
        else:
            out = s * x / var if prediction == "eps" else a * S_DATA**2 * x / var
        return (out, 0.3 * out) if guided else out  # with guidance 1 the uncond branch drops out
    return fn


def _std_error(method, steps, backend, pred="eps", consistency=False):
    sch = fd.VPSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x_T = fd.randn((4, 2048), seed=1, backend="cpu")
    target = S_DATA * x_T.std().item()  # the map is linear: the sample's own std, scaled
    x0 = fd.sample(_vp_model(sch, pred, guided=True, consistency=consistency), x_T, sch, steps, method=method,
                   guidance=1.0, prediction=pred, seed=3, backend=backend)
    assert x0.shape == x_T.shape and bool(torch.isfinite(x0).all())
    return abs(x0.std().item() - target) / target


@pytest.mark.parametrize("backend", LONG)
@pytest.mark.parametrize("method,steps,tol", [("ddim", 100, 0.05), ("dpmpp_2m", 30, 0.06), ("ddpm", 300, 0.05)])
def test_sample_vp_gaussian(backend, method, steps, tol):
    err = _std_error(method, steps, backend)
    assert err < tol, err
    if method != "ddpm":
        assert err < _std_error(method, steps // 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_lcm_and_short_loops(backend):
    """LCM with an exact consistency function lands on the data's std in 4 steps; DDIM in 10 (every
    backend, the interpreter included)."""
    assert _std_error("lcm", 4, backend, pred="x0", consistency=True) < 0.03
    assert _std_error("ddim", 10, backend) < 0.25


@pytest.mark.parametrize("backend", LONG)
def test_sample_edm_and_flow_gaussian(backend):
    edm = fd.EDMSchedule()
    D = lambda x, sig: S_DATA**2 * x / (S_DATA**2 + sig.reshape(-1, 1).to(x.dtype) ** 2)  # noqa: E731
    errs = []
    for steps in (20, 40):
        x_T = 80.0 * fd.randn((4, 2048), seed=2, backend="cpu")
        x0 = fd.sample(D, x_T, edm, steps, method="euler", backend=backend)
        errs.append(abs(x0.std().item() - S_DATA * x_T.std().item() / 80.0) / S_DATA)
    assert errs[1] < 0.09 and errs[1] < errs[0], errs
    x_T = 80.0 * fd.randn((4, 2048), seed=2, backend="cpu")  # Heun, 20 steps (39 model calls)
    x0 = fd.sample(D, x_T, edm, 20, method="heun", backend=backend)
    err = abs(x0.std().item() - S_DATA * x_T.std().item() / 80.0) / S_DATA
    assert err < 0.06 and err < errs[1], (err, errs)  # second order: better than Euler's 40 calls

    def v(x, sig):  # E[eps - x0 | x] for x = (1 - sig) x0 + sig eps
        sig = sig.reshape(-1, 1).to(x.dtype)
        var = (1 - sig) ** 2 * S_DATA**2 + sig**2
        return sig * x / var - (1 - sig) * S_DATA**2 * x / var

    errs = []
    for steps in (15, 30):
        x_T = fd.randn((4, 2048), seed=4, backend="cpu")
        x0 = fd.sample(v, x_T, fd.FlowSchedule(shift=3.0), steps, method="flow_euler", backend=backend)
        errs.append(abs(x0.std().item() - S_DATA * x_T.std().item()) / S_DATA)
    assert errs[1] < 0.11 and errs[1] < errs[0], errs


def test_sample_bad_input():
    sch = fd.VPSchedule()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"sample: method 'ddpm' draws noise: give source"):
        fd.sample(lambda x, t: x, x, sch, 4, method="ddpm")
    with pytest.raises(ValueError, match=r"sample: a VPSchedule takes method in ddim, ddpm, dpmpp_2m, lcm"):
        fd.sample(lambda x, t: x, x, sch, 4, method="euler")
    with pytest.raises(ValueError, match=r"with guidance, model_fn must return \(cond, uncond\)"):
        fd.sample(lambda x, t: x, x, sch, 4, guidance=2.0)


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "ddpm", "lcm", "euler", "heun", "flow_euler"])
def test_sample_loop_has_no_host_sync(method):
    """The capture-safety check available on a CPU: the whole loop traces as ONE graph (torch.compile,
    fullgraph=True fails on any .item(), bool(tensor) or data-dependent branch, the host syncs a CUDA
    graph cannot capture), and the traced loop gives the eager loop's result, noise offsets included."""
    if method in ("euler", "heun"):
        sch, x_T = fd.EDMSchedule(), 80.0 * torch.randn(2, 64)
        model = lambda x, s: S_DATA**2 * x / (S_DATA**2 + s.reshape(-1, 1).to(x.dtype) ** 2)  # noqa: E731
    elif method == "flow_euler":
        sch, x_T = fd.FlowSchedule(shift=2.0), torch.randn(2, 64)
        model = lambda x, s: x * s.reshape(-1, 1).to(x.dtype)  # noqa: E731
    else:
        sch, x_T = fd.VPSchedule(), torch.randn(2, 64)
        model = _vp_model(sch, "eps")
    sources = [fd.NoiseSource(seed=5), fd.NoiseSource(seed=5)]

    def run(x, src):
        return fd.sample(model, x, sch, 4, method=method, source=src, backend="cpu")

    eager = run(x_T, sources[0])
    traced = torch.compile(run, fullgraph=True, backend="aot_eager")(x_T, sources[1])
    torch.testing.assert_close(traced, eager)
    assert int(sources[1].offset) == int(sources[0].offset)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "ddpm", "lcm", "euler", "heun", "flow_euler"])
def test_sample_loop_cuda_graph(backend, method):
    """On a GPU: the whole 4-step loop runs under the sync-debug mode "error" (any host sync raises),
    is captured as one CUDA graph, and each replay equals an eager loop from the same noise offset:
    the offset advances on the device, so replays draw fresh noise."""
    dev = torch.device("cuda")
    if method in ("euler", "heun"):
        sch, x_T = fd.EDMSchedule(), 80.0 * torch.randn(2, 64, device=dev)
        model = lambda x, s: S_DATA**2 * x / (S_DATA**2 + s.reshape(-1, 1).to(x.dtype) ** 2)  # noqa: E731
    elif method == "flow_euler":
        sch, x_T = fd.FlowSchedule(shift=2.0), torch.randn(2, 64, device=dev)
        model = lambda x, s: x * s.reshape(-1, 1).to(x.dtype)  # noqa: E731
    else:
        sch, x_T = fd.VPSchedule(device=dev), torch.randn(2, 64, device=dev)
        model = _vp_model(sch, "eps")
    src, check = fd.NoiseSource(seed=5, device=dev), fd.NoiseSource(seed=5, device=dev)

    def run(source):
        return fd.sample(model, x_T, sch, 4, method=method, source=source, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(src)  # warm-up: lazy initialization and Triton compiles happen here, not in the capture
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(src)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(src)
    check.offset.copy_(src.offset)
    for _ in range(2):
        want = run(check)
        graph.replay()
        torch.testing.assert_close(out, want)
    assert int(src.offset) == int(check.offset)
