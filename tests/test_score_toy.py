"""End-to-end check of the score-distillation ops (issue #3): distil a 2-D Gaussian mixture into a
one-step generator with an exact teacher, with DMD and with SiD, and watch the samples reach the data.

Data: K = 8 isotropic Gaussians N(mu_k, s^2 I), s = 0.08, equal weights, on a circle of radius 2.
Noise is EDM's x_t = x0 + sigma eps. The teacher is the exact denoiser of the mixture (differentiable
torch code, so SiD can backpropagate through it): x_t ~ sum_k pi_k N(mu_k, (s^2 + sigma^2) I), so

    p(k | x_t)        = softmax_k(log pi_k - |x_t - mu_k|^2 / (2 (s^2 + sigma^2)))     (log-sum-exp)
    E[x0 | x_t, k]    = mu_k + s^2 / (s^2 + sigma^2) (x_t - mu_k)
    D_real(x_t, sigma) = sum_k p(k | x_t) E[x0 | x_t, k]

A one-step generator G (MLP, z in R^2 -> x in R^2) and a fake denoiser D_fake (MLP on (x_t, log sigma),
EDM preconditioning) train in alternation: D_fake on G's samples with ``flashdistill.dsm_loss``
(target "x0", EDM weight), then G with ``flashdistill.dmd_loss`` (x0 predictions under no_grad) or
``flashdistill.sid_loss`` (alpha 1.2, both predictions with autograd through x_t). The distance between
G's samples and the data (sliced Wasserstein-1 over fixed directions) must fall well below its start.

The ops run on the default backend (``auto``: the fused kernels for the device; ``FLASHDISTILL_BACKEND``
overrides) and on the reference; the runs must converge alike (STYLE.md: "a tiny end-to-end training run
with and without the fused kernels converges alike").
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import flashdistill

K, RADIUS, STD = 8, 2.0, 0.08
SIGMA_DATA = math.sqrt(RADIUS**2 / 2 + STD**2)  # per-coordinate std of the data
BATCH = 256
N_EVAL = 2000
# Smallest sigma of the generator's step. SiD with alpha > 1 has a term -(alpha - 1)|r - f|^2 that
# widens the generator wherever the fake network errs, and its restoring force vanishes as sigma -> 0
# (both denoisers tend to the identity) while that term does not. With sigma down to 0.02 (or 0.2),
# every SiD run tried here (seed 0; several learning rates and fake steps per generator step) diverged
# after ~200 steps, the samples' radius growing without bound; from sigma >= 1 (0.7 x the data std)
# on it converges. DMD uses EDM's full range, as DMD samples t in [0.02, 0.98].
GEN_SIGMA_MIN = {"dmd": 0.02, "sid": 1.0}


def mixture_means() -> torch.Tensor:
    angle = torch.arange(K, dtype=torch.float32) * (2 * math.pi / K)
    return RADIUS * torch.stack([angle.cos(), angle.sin()], dim=1)


MEANS = mixture_means()


def sample_data(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.randint(0, K, (n,), generator=gen)
    return MEANS[k] + STD * torch.randn(n, 2, generator=gen)


def teacher_x0(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] of the mixture (equal weights); sigma [B, 1]. Differentiable in x_t."""
    var = STD**2 + sigma**2  # [B, 1]
    d2 = (x_t[:, None, :] - MEANS[None]).square().sum(-1)  # [B, K]
    post = torch.softmax(-d2 / (2 * var), dim=1)  # log pi_k is a constant: drops out
    shrink = STD**2 / var  # [B, 1]
    comp = MEANS[None] + shrink[:, :, None] * (x_t[:, None, :] - MEANS[None])  # [B, K, 2]
    return (post[:, :, None] * comp).sum(1)


def mlp(n_in: int, n_out: int, hidden: int = 64, layers: int = 3) -> torch.nn.Sequential:
    mods, d = [], n_in
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(d, hidden), torch.nn.SiLU()]
        d = hidden
    return torch.nn.Sequential(*mods, torch.nn.Linear(d, n_out))


class FakeDenoiser(torch.nn.Module):
    """EDM-preconditioned denoiser D(x_t, sigma) = c_skip x_t + c_out F(c_in x_t, log sigma / 4)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(3, 2, hidden=64, layers=3)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sd2 = SIGMA_DATA**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip * x_t + c_out * self.net(torch.cat([c_in * x_t, sigma.log() / 4], dim=1))


def sample_sigma(n: int, gen: torch.Generator) -> torch.Tensor:
    """EDM's training lognormal, ln sigma ~ N(-0.5, 1.2), clamped to [0.02, 8] (data std ~1.4)."""
    return (torch.randn(n, 1, generator=gen) * 1.2 - 0.5).exp().clamp(0.02, 8.0)


def edm_weight(sigma: torch.Tensor) -> torch.Tensor:
    return ((sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2).reshape(-1)


def sliced_w1(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> float:
    """Sliced Wasserstein-1 between two equal-size samples over fixed unit directions."""
    pa, pb = (a @ dirs.T).sort(dim=0).values, (b @ dirs.T).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def distill(method: str, *, seed: int, steps: int = 300, backend=None) -> tuple[float, float]:
    """Train G from scratch with ``method`` ("dmd" or "sid"); (distance at start, distance at end)."""
    torch.manual_seed(seed)  # the networks' initialisation
    gen = torch.Generator().manual_seed(seed)  # every sample of the run
    G, fake = mlp(2, 2), FakeDenoiser()
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-3, betas=(0.0, 0.99))  # beta1 = 0 as DMD2 / SiD
    opt_f = torch.optim.Adam(fake.parameters(), lr=2e-3, betas=(0.0, 0.99))
    eval_gen = torch.Generator().manual_seed(1000 + seed)
    z_eval, data = torch.randn(N_EVAL, 2, generator=eval_gen), sample_data(N_EVAL, eval_gen)
    angle = torch.arange(32, dtype=torch.float32) * (math.pi / 32)
    dirs = torch.stack([angle.cos(), angle.sin()], dim=1)

    def distance():
        with torch.no_grad():
            return sliced_w1(G(z_eval), data, dirs)

    start = distance()
    for _ in range(steps):
        # fake score: denoising score matching on the generator's current samples
        with torch.no_grad():
            x0 = G(torch.randn(BATCH, 2, generator=gen))
        sigma = sample_sigma(BATCH, gen)
        x_t = x0 + sigma * torch.randn(BATCH, 2, generator=gen)
        loss_f = flashdistill.dsm_loss(fake(x_t, sigma), x0, target="x0", weight=edm_weight(sigma), backend=backend)
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        opt_f.step()

        # generator
        x = G(torch.randn(BATCH, 2, generator=gen))
        sigma = sample_sigma(BATCH, gen).clamp_min(GEN_SIGMA_MIN[method])
        x_t = x + sigma * torch.randn(BATCH, 2, generator=gen)
        if method == "dmd":
            with torch.no_grad():
                real, fk = teacher_x0(x_t, sigma), fake(x_t, sigma)
            loss_g = flashdistill.dmd_loss(x, real, fk, backend=backend)
        else:  # gradients through both predictions to x_t, hence x; the fake's parameters stay out
            fake.requires_grad_(False)
            loss_g = flashdistill.sid_loss(x, teacher_x0(x_t, sigma), fake(x_t, sigma), alpha=1.2, backend=backend)
            fake.requires_grad_(True)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return start, distance()


@pytest.fixture
def one_thread():
    """Tensors of 256 x 2: OpenMP threads only add fork/join time (and contention on a shared box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The measured ratios (end / start distance, 300 steps) for seeds 0, 1, 2, reference backend:
# dmd 0.14 0.15 0.14, sid 0.15 0.18 0.13; the bound 0.3 leaves a 1.7x margin. At the start the
# generator's samples sit near the origin (distance ~1.23); two independent data samples of 2000 are
# 0.03-0.045 apart.
RATIO = 0.3


@pytest.mark.parametrize("backend", [None, "reference"], ids=["default", "reference"])
@pytest.mark.parametrize("method", ["dmd", "sid"])
def test_distill_mixture(method, backend, one_thread):
    t0 = time.perf_counter()
    start, end = distill(method, seed=0, backend=backend)
    took = time.perf_counter() - t0
    assert end < RATIO * start, (f"{method} (backend={backend or 'default'}): sliced W1 from the data went "
                                 f"{start:.3f} -> {end:.3f} ({end / start:.2f}x, {took:.1f} s); expected < {RATIO}x")


if __name__ == "__main__":  # calibration: python tests/test_score_toy.py [backend]  (3 seeds, both methods)
    import sys

    torch.set_num_threads(1)
    be = sys.argv[1] if len(sys.argv) > 1 else None
    for method in ("dmd", "sid"):
        for seed in (0, 1, 2):
            t0 = time.perf_counter()
            s, e = distill(method, seed=seed, backend=be)
            print(f"{method} seed {seed} backend {be or 'default'}: {s:.3f} -> {e:.3f} ({e / s:.2f}x) "
                  f"in {time.perf_counter() - t0:.1f} s", flush=True)
