"""Recipes: distillation methods as a few ``Step``s each, ready for ``flashdistill.engine.capture`` (issue #7).

A recipe is a thin builder, not a trainer. It takes your networks, optimizers, schedule and noise source and
returns a ``Recipe`` (engine/step.py) of named steps; each step's ``fn`` runs one whole update
(``zero_grad(set_to_none=True)``, forward, loss, ``loss.backward(inputs=<the trained parameters>)``,
``optimizer.step()``) and returns a dict of detached 0-d tensors (``"loss"`` and a few parts). Nothing in a
step synchronizes with the host (no ``.item()``, no branch on a tensor's value), so it captures as a graph;
all its randomness comes from the ``NoiseSource`` named in ``Step.sources``, so runs are reproducible and a
replayed graph draws fresh noise. There is no state outside the closures and the objects you passed.

    dmd2(generator, teacher, fake_score, *, gen_optimizer, fake_optimizer, schedule, source, sample_shape, ...)
    sid(generator, teacher, fake_score, *, gen_optimizer, fake_optimizer, schedule, source, sample_shape, ...)
    vsd(generator, teacher, fake_score, *, gen_optimizer, fake_optimizer, schedule, source, sample_shape, ...)
        steps "fake" (every iteration) then "generator"; step fn(cond=None)
    consistency(student, teacher, ema_student, *, optimizer, schedule, source, ...)
        step "student"; fn(x0, cond=None)
    llm_kd(student, teacher, *, optimizer, ...)
        step "student"; fn(input_ids, labels, attention_mask=None)

    for i, batch in enumerate(loader):
        for name in recipe.due(i):
            metrics = recipe[name](*batch)

Network conventions (score distillation)
    generator(z, cond) -> x          one-step generator; z ~ N(0, I) of shape [B, *sample_shape] drawn inside
                                     the step in the dtype of the generator's parameters; x shaped like z
    teacher(x_t, t, cond) -> pred    the pretrained diffusion model, and fake_score(x_t, t, cond) -> pred the
                                     critic trained on the generator's samples, both in the ``prediction``
                                     space: "eps", "x0", "v" or "flow"
    t                                VPSchedule: int64 timesteps [B]; FlowSchedule: float64 t [B] in [0, 1);
                                     EDMSchedule: float64 sigma [B], and prediction "x0" (the denoiser D)
    cond                             None (unconditional: give ``batch_size``) or anything the networks take
                                     (a tensor: its first dim is the batch), passed to them untouched
    guidance                         classifier-free guidance in the Ho form u + w (c - u) (w = 1: plain
                                     conditional), a float or a per-sample [B] tensor; the unconditional
                                     branch is a second call with ``null_cond`` (a cond with batch B, or batch
                                     1, which is expanded). The guidance arithmetic is done by the fused ops.

Predictions are given to the ops in their own dtype cast to x's (the ops take one dtype); run a bf16
teacher inside ``teacher`` (e.g. under autocast) as you like. The noising is x_t = alpha_t x + sigma_t eps with
(alpha, sigma) = ``schedule.coefficients(t)`` (float64 [B]), by ``flashdistill.q_sample`` (one kernel, eps
drawn from the source and returned for the critic's target).

Times: ``t_range`` (generator step) and ``fake_t_range`` (critic step) are fractions (lo, hi) of the
schedule's noise axis, 0 the cleanest and 1 the noisiest: VPSchedule timesteps uniform in
[round(lo T), round(hi T)); FlowSchedule t uniform in [lo, hi); EDMSchedule sigma at the position u ~ U[lo, hi)
of the Karras rho-ramp, sigma = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho (Karras et
al. 2022, Eq. 5; SiD's generator times are u ~ U(0, 0.8) on it). Defaults: (0.02, 0.98) for the generator (DMD2,
SwiftBrush, SiD-LSG: t in {20..980} of 1000), (0, 1) for the critic (DMD2's fake score: t in {0..999}).

The critic ("fake" step, shared by dmd2, sid and vsd): x = generator(z, cond) under no_grad, then denoising
score matching in the prediction space, ``dsm_loss(pred, x, eps, target=prediction)``: the unweighted mean
squared error of FastGen's ``denoising_score_matching_loss`` and DMD2's SD critic (score_distill.md Sec. 3.6,
Sec. 4); with an EDMSchedule weighted by EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 as DMD2's
and SiD's EDM critics (Karras et al. 2022, Table 1). The critic step runs first in an iteration: it tracks the
generator's current samples, then the generator moves against it (SiD's loop order; DMD2's script updates the
generator first, which shifts the alternation by one critic update).

Distributed (DDP, FSDP2): build the recipe after wrapping the networks and creating the optimizers. A step
calls the network it trains as given (a ``DistributedDataParallel`` wrapper runs its forward, which its
gradient synchronization needs) and every network it only evaluates through ``.module``; the backward is
``loss.backward(inputs=trained parameters)``, so no other network receives a gradient, whether or not its
parameters require one (freeze teachers anyway: ``requires_grad_(False)`` saves their graph in SiD's step).
Under FSDP2 (``fully_shard``, on any network) the networks are called as they are (their forward gathers the
parameters) and the backward's inputs are the unsharded parameters that forward made (``_trained``). The score
losses are means over the batch with per-sample normalizers (DMD's and SiD's |x - x0| means are per sample), so
with an equal part of the batch on each rank the averaged gradients are the whole batch's
(tests/test_distributed.py).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flashdistill.engine.step import Recipe, Step
from flashdistill.kernels import (EDMSchedule, FlowSchedule, NoiseSource, VPSchedule, consistency_loss, convert,
                                  ddim_step, dmd_loss, dsm_loss, fused_linear_kd_loss, q_sample, sid_loss, to_x0,
                                  uniform_timesteps, vsd_loss)
from flashdistill.kernels.kd import KINDS as KD_DIVERGENCES

__all__ = ["dmd2", "sid", "vsd", "consistency", "llm_kd"]

# prediction spaces each schedule supports (v needs alpha^2 + sigma^2 = 1; flow is the rectified-flow velocity)
SPACES = {VPSchedule: ("eps", "x0", "v"), FlowSchedule: ("flow", "x0", "eps"), EDMSchedule: ("x0",)}
GEN_T_RANGE, FAKE_T_RANGE = (0.02, 0.98), (0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# score distillation: DMD2, SiD, VSD


def dmd2(generator: nn.Module, teacher: nn.Module, fake_score: nn.Module, *, gen_optimizer, fake_optimizer,
         schedule, source: NoiseSource, sample_shape, batch_size: Optional[int] = None, prediction: str = "eps",
         guidance=None, null_cond=None, fake_updates: int = 5, t_range=None, fake_t_range=None,
         gan: Optional[Callable] = None) -> Recipe:
    """DMD2 (Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024) on
    DMD's distribution-matching gradient (Yin et al., CVPR 2024, Eq. 7-8).

    Steps: "fake" every iteration (the critic, module docstring) and "generator" every ``fake_updates``-th
    (the two time-scale update rule, TTUR: 5 in DMD2's SDXL and ImageNet runs). The generator step draws t in
    ``t_range``, noises x = generator(z, cond) to x_t, predicts with the teacher (guided) and the fake score
    under no_grad and applies ``dmd_loss``: gradient (x0_fake - x0_real) / mean_b |x - x0_real| to x only
    (DMD's Eq. 8 normaliser; FastGen's canonical form, score_distill.md Sec. 3.4, 3.6).

    gan: optional ``gan(x, t, cond) -> 0-d loss`` added to the generator's (weight included, e.g. DMD2's
    5e-3 softplus(-D(x_t)).mean(); x carries its graph to the generator, t are the step's times). Draw its
    noise from ``source``. The discriminator is not trained here: add your own step for it,
    ``recipe.steps["discriminator"] = Step(d_fn, optimizers=(d_opt,), sources=(source,))``.
    Returns metrics "loss", "dmd" (and "gan") for the generator, "loss" for the fake step.
    """
    R = "dmd2"
    _check_schedule(R, schedule, source, prediction)
    _check_guidance(R, "guidance", guidance, null_cond)
    _check_int(R, "fake_updates", fake_updates)
    if gan is not None and not callable(gan):
        raise TypeError(f"{R}: gan must be a callable gan(x, t, cond) -> loss, got {type(gan).__name__}")
    shape = _sample_shape(R, sample_shape, batch_size)
    gen_params = _trained(R, "generator", generator, gen_optimizer, "gen_optimizer")
    draw_t = _time_sampler(R, "t_range", schedule, t_range, GEN_T_RANGE)
    real_net, fake_net, dtype = _unwrap(teacher), _unwrap(fake_score), _dtype(generator)
    fake = _fake_step(R, generator, fake_score, fake_optimizer, schedule, source, shape, batch_size, prediction,
                      fake_t_range)

    def generator_step(cond=None):
        gen_optimizer.zero_grad(set_to_none=True)
        B = _batch(R, cond, batch_size, guidance)
        x = generator(source.randn((B, *shape), dtype=dtype), cond)
        t = draw_t(source, B)
        x_t, _, alpha, sigma = _noised(x.detach(), t, schedule, source)
        with torch.no_grad():
            real, real_u = _predict(real_net, x, x_t, t, cond, null_cond, guidance)
            fake_pred = _as(x, fake_net(x_t, t, cond))
        where = {} if prediction == "x0" else dict(x_t=x_t, alpha=alpha, sigma=sigma)
        loss_dmd = dmd_loss(x, real, fake_pred, real_uncond=real_u, guidance=guidance, space=prediction, **where)
        loss, metrics = loss_dmd, {"dmd": loss_dmd.detach()}
        if gan is not None:
            loss_gan = gan(x, t, cond)
            loss, metrics["gan"] = loss + loss_gan, loss_gan.detach()
        loss.backward(inputs=gen_params())
        gen_optimizer.step()
        return {"loss": loss.detach(), **metrics}

    return Recipe(R, {"fake": fake, "generator": Step(generator_step, optimizers=(gen_optimizer,), sources=(source,),
                                                      every=fake_updates)})


def sid(generator: nn.Module, teacher: nn.Module, fake_score: nn.Module, *, gen_optimizer, fake_optimizer, schedule,
        source: NoiseSource, sample_shape, batch_size: Optional[int] = None, prediction: str = "eps",
        alpha: float = 1.2, guidance=None, fake_guidance=None, fake_train_guidance=None, null_cond=None,
        t_range=None, fake_t_range=None, scale: Optional[float] = None) -> Recipe:
    """SiD, Score identity Distillation (Zhou et al., ICML 2024, the alpha-weighted generator loss of Sec. 4;
    score_distill.md Sec. 3.13), and SiD-LSG's long and short guidance (Zhou et al. 2024b; Sec. 3.14).

    Steps: "fake" then "generator", every iteration. The generator step noises x = generator(z, cond) to x_t
    *with* autograd (no no_grad), converts the teacher's and the fake score's predictions to x0 (r, f) and
    applies ``sid_loss``: scale sum_b sum_i (r - f)((r - x) - alpha (r - f)) / w_b, w_b = sg(mean_b |x - r|), whose
    gradient reaches x directly and through both networks' inputs (their parameters get none).
    alpha: 1.2 in SiD's runs, 1.0 in SiD-LSG's; scale: the op's 1/B by default (times SiD's loss scaling 100
    for fp16). Guidance (Ho form) on the teacher (``guidance``, SiD-LSG's kappa_4) and on the fake score in the
    generator loss (``fake_guidance``, kappa_2 = kappa_3), and the fake score fit with its own guided output
    (``fake_train_guidance``, kappa_1; SiD-LSG trains the fake on u + kappa_1 (c - u)). Metrics: "loss".
    """
    R = "sid"
    _check_schedule(R, schedule, source, prediction)
    for name, w in (("guidance", guidance), ("fake_guidance", fake_guidance),
                    ("fake_train_guidance", fake_train_guidance)):
        _check_guidance(R, name, w, null_cond)
    shape = _sample_shape(R, sample_shape, batch_size)
    gen_params = _trained(R, "generator", generator, gen_optimizer, "gen_optimizer")
    draw_t = _time_sampler(R, "t_range", schedule, t_range, GEN_T_RANGE)
    real_net, fake_net, dtype = _unwrap(teacher), _unwrap(fake_score), _dtype(generator)
    fake = _fake_step(R, generator, fake_score, fake_optimizer, schedule, source, shape, batch_size, prediction,
                      fake_t_range, guidance=fake_train_guidance, null_cond=null_cond)

    def generator_step(cond=None):
        gen_optimizer.zero_grad(set_to_none=True)
        B = _batch(R, cond, batch_size, guidance, fake_guidance)
        x = generator(source.randn((B, *shape), dtype=dtype), cond)
        t = draw_t(source, B)
        x_t, _, a, s = _noised(x, t, schedule, source)  # the gradient flows to x through x_t too

        def x0(net, w):  # (cond, uncond or None) predictions as x0 estimates, with autograd
            return [None if p is None else _as(x, to_x0(p, x_t, space=prediction, alpha=a, sigma=s))
                    for p in _predict(net, x, x_t, t, cond, null_cond, w)]

        real, real_u = x0(real_net, guidance)
        fake_x0, fake_u = x0(fake_net, fake_guidance)
        loss = sid_loss(x, real, fake_x0, real_uncond=real_u, guidance=guidance, fake_uncond=fake_u,
                        fake_guidance=fake_guidance, alpha=alpha, scale=scale)
        loss.backward(inputs=gen_params())
        gen_optimizer.step()
        return {"loss": loss.detach()}

    return Recipe(R, {"fake": fake, "generator": Step(generator_step, optimizers=(gen_optimizer,),
                                                      sources=(source,))})


def vsd(generator: nn.Module, teacher: nn.Module, fake_score: nn.Module, *, gen_optimizer, fake_optimizer, schedule,
        source: NoiseSource, sample_shape, batch_size: Optional[int] = None, prediction: str = "eps",
        guidance=None, fake_guidance=None, null_cond=None, t_range=None, fake_t_range=None) -> Recipe:
    """VSD (Wang et al., "ProlificDreamer", NeurIPS 2023, the VSD gradient of Sec. 3) for a one-step generator,
    i.e. SwiftBrush (Nguyen & Tran, CVPR 2024; score_distill.md Sec. 3.2-3.3), with a fake score that is the full
    network or a LoRA of the teacher (its optimizer then holds the LoRA parameters only).

    Steps: "fake" then "generator", every iteration. The generator step predicts with the teacher and the
    fake score at x_t under no_grad, both converted to eps, and applies ``vsd_loss``: gradient
    sigma_t^2 (eps_real - eps_fake) / N to x (ProlificDreamer's w(t) = 1 - abar_t). Guidance (Ho form) on the
    teacher, and with ``fake_guidance`` on the fake score too (SwiftBrush: the same 4.5 on both).
    Metrics: "loss" (the surrogate 0.5 kappa sum g^2, not a divergence).
    """
    R = "vsd"
    _check_schedule(R, schedule, source, prediction)
    _check_guidance(R, "guidance", guidance, null_cond)
    _check_guidance(R, "fake_guidance", fake_guidance, null_cond)
    shape = _sample_shape(R, sample_shape, batch_size)
    gen_params = _trained(R, "generator", generator, gen_optimizer, "gen_optimizer")
    draw_t = _time_sampler(R, "t_range", schedule, t_range, GEN_T_RANGE)
    real_net, fake_net, dtype = _unwrap(teacher), _unwrap(fake_score), _dtype(generator)
    fake = _fake_step(R, generator, fake_score, fake_optimizer, schedule, source, shape, batch_size, prediction,
                      fake_t_range)

    def generator_step(cond=None):
        gen_optimizer.zero_grad(set_to_none=True)
        B = _batch(R, cond, batch_size, guidance, fake_guidance)
        x = generator(source.randn((B, *shape), dtype=dtype), cond)
        t = draw_t(source, B)
        x_t, _, a, s = _noised(x.detach(), t, schedule, source)

        def eps(net, w):  # CFG commutes with the affine conversion, so each branch converts alone
            return [p if p is None or prediction == "eps" else
                    _as(x, convert(p, x_t, src=prediction, dst="eps", alpha=a, sigma=s))
                    for p in _predict(net, x, x_t, t, cond, null_cond, w)]

        with torch.no_grad():
            real, real_u = eps(real_net, guidance)
            fake_eps, fake_u = eps(fake_net, fake_guidance)
        loss = vsd_loss(x, real, fake_eps, real_uncond=real_u, guidance=guidance, fake_uncond=fake_u,
                        fake_guidance=fake_guidance, weight=s.square().to(_compute(x)), space="eps")
        loss.backward(inputs=gen_params())
        gen_optimizer.step()
        return {"loss": loss.detach()}

    return Recipe(R, {"fake": fake, "generator": Step(generator_step, optimizers=(gen_optimizer,),
                                                      sources=(source,))})


def _fake_step(R, generator, fake_score, fake_optimizer, schedule, source, shape, batch_size, prediction,
               fake_t_range, *, guidance=None, null_cond=None) -> Step:
    """The critic: denoising score matching of fake_score on the generator's samples (module docstring).
    ``guidance``: fit the fake's guided output u + w (c - u) instead (SiD-LSG's kappa_1)."""
    fake_params = _trained(R, "fake_score", fake_score, fake_optimizer, "fake_optimizer")
    draw_t = _time_sampler(R, "fake_t_range", schedule, fake_t_range, FAKE_T_RANGE)
    gen, dtype = _unwrap(generator), _dtype(generator)
    edm = isinstance(schedule, EDMSchedule)

    def fake_step(cond=None):
        fake_optimizer.zero_grad(set_to_none=True)
        B = _batch(R, cond, batch_size, guidance)
        with torch.no_grad():
            x = gen(source.randn((B, *shape), dtype=dtype), cond)
        t = draw_t(source, B)
        x_t, eps, alpha, sigma = _noised(x, t, schedule, source)
        pred, pred_u = _predict(fake_score, x, x_t, t, cond, null_cond, guidance)
        if pred_u is not None:  # no op fuses a guided DSM target, so the one line of CFG is written here
            pred = pred_u + _per_sample(guidance, x) * (pred - pred_u)
        weight = None
        if edm:  # EDM's lambda(sigma) (Karras et al. 2022, Table 1)
            sd2 = schedule.sigma_data**2
            weight = ((sigma.square() + sd2) / (sigma.square() * sd2)).to(_compute(x))
        loss = dsm_loss(pred, x, eps, target=prediction, alpha=alpha, sigma=sigma, weight=weight)
        loss.backward(inputs=fake_params())
        fake_optimizer.step()
        return {"loss": loss.detach()}

    return Step(fake_step, optimizers=(fake_optimizer,), sources=(source,))


# ----------------------------------------------------------------------------------------------------
# consistency distillation


def consistency(student: nn.Module, teacher: nn.Module, ema_student: nn.Module, *, optimizer, schedule: VPSchedule,
                source: NoiseSource, num_ddim_timesteps: int = 50, prediction: str = "eps", guidance=None,
                null_cond=None, ema_decay: float = 0.95, kind: str = "l2", c: Optional[float] = None,
                timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Recipe:
    """Latent consistency distillation (LCM, Luo et al. 2023, Alg. 1), as diffusers'
    ``train_lcm_distill_sd_wds.py`` writes it (score_distill.md Sec. 3.20), on a VPSchedule.

    One step "student", fn(x0, cond=None) on a batch of data x0. With k = T // num_ddim_timesteps: the
    solver index n ~ U{0..N-1}, t = (n + 1) k - 1 (the DDIM grid) and s = max(t - k, 0); x_t = q_sample(x0, t);
    the online estimate c_skip(t) x_t + c_out(t) x0_hat(student(x_t, t)); the teacher's DDIM step (Song et al.
    2021, Eq. 12, eta = 0) from t to s with guidance; the target c_skip(s) x_s + c_out(s) x0_hat(ema(x_s, s))
    under no_grad, with LCM's boundary scalings c_skip(t) = sigma_d^2 / ((10 t)^2 + sigma_d^2), c_out(t) =
    10 t / sqrt((10 t)^2 + sigma_d^2) (``timestep_scaling`` 10, ``sigma_data`` 0.5); then ``consistency_loss``
    (kind "l2" as LCM's default, "huber" LCM's elementwise sqrt(d^2 + c^2) - c, "pseudo_huber" iCT's per-sample
    one), the optimizer step, and ema <- ema + (1 - ema_decay)(student - ema) (LCM's target network, decay
    0.95) with one ``torch._foreach_lerp_``. ``ema_student`` (a copy of the student) is the step's ``state``.
    FSDP2: a ``fully_shard``-ed EMA is updated on its shards and its units are resharded after the update.

    guidance: Ho form; LCM's w (its "offset" form c + w (c - u), w ~ U[5, 15]) is guidance = w + 1. A fixed
    scale without a w-embedding in the student, as the released LCM-LoRA (LCM issue #40). Metrics: "loss".
    """
    R = "consistency"
    if not isinstance(schedule, VPSchedule):
        raise TypeError(f"{R}: schedule must be a VPSchedule (LCM's DDIM solver), got {type(schedule).__name__}")
    _check_schedule(R, schedule, source, prediction)
    _check_guidance(R, "guidance", guidance, null_cond)
    T = schedule.num_train_timesteps
    if not isinstance(num_ddim_timesteps, int) or isinstance(num_ddim_timesteps, bool) or \
            not 1 <= num_ddim_timesteps <= T:
        raise ValueError(f"{R}: num_ddim_timesteps must be an int in [1, {T}], got {num_ddim_timesteps!r}")
    if not isinstance(ema_decay, (int, float)) or isinstance(ema_decay, bool) or not 0.0 <= ema_decay <= 1.0:
        raise ValueError(f"{R}: ema_decay must be a float in [0, 1], got {ema_decay!r}")
    if kind not in ("l2", "huber", "pseudo_huber"):
        raise ValueError(f"{R}: kind={kind!r} is not one of l2, huber, pseudo_huber")
    params = _trained(R, "student", student, optimizer, "optimizer")
    online, ema = list(_unwrap(student).parameters()), list(_unwrap(ema_student).parameters())
    if len(online) != len(ema) or any(p.shape != q.shape for p, q in zip(online, ema)):
        raise ValueError(f"{R}: ema_student must have the student's parameters (a copy of it)")
    real_net, ema_net = _unwrap(teacher), _unwrap(ema_student)
    FSDPModule = _fsdp_module_type()  # the EMA's FSDP2 units: resharded after the update (see below)
    ema_units = [m for m in ema_net.modules() if isinstance(m, FSDPModule)] if FSDPModule is not None else []
    N, k = num_ddim_timesteps, T // num_ddim_timesteps

    def boundary(t, x):  # (c_skip, c_out) [B, 1, ...] in x's compute dtype
        st = timestep_scaling * t.to(torch.float64)
        return (_per_sample(sigma_data**2 / (st.square() + sigma_data**2), x),
                _per_sample(st / torch.sqrt(st.square() + sigma_data**2), x))

    def student_step(x0, cond=None):
        _needs_cond(R, cond, guidance)
        optimizer.zero_grad(set_to_none=True)
        n = uniform_timesteps(source, x0.shape[0], 0, N)
        t = (n + 1) * k - 1
        s = (t - k).clamp(min=0)
        a_t, s_t = schedule.coefficients(t)
        x_t = q_sample(x0, alpha=a_t, sigma=s_t, source=source)
        c_skip, c_out = boundary(t, x0)
        x0_hat = to_x0(student(x_t, t, cond), x_t, space=prediction, alpha=a_t, sigma=s_t)
        pred = _as(x0, c_skip * x_t + c_out * x0_hat)
        with torch.no_grad():
            real, real_u = _predict(real_net, x0, x_t, t, cond, null_cond, guidance)
            x_s = ddim_step(real, x_t, t, s, schedule, prediction=prediction, uncond=real_u, guidance=guidance)
            a_s, s_s = schedule.coefficients(s)
            c_skip, c_out = boundary(s, x0)
            target = _as(x0, c_skip * x_s + c_out * to_x0(ema_net(x_s, s, cond), x_s, space=prediction, alpha=a_s,
                                                           sigma=s_s))
        loss = consistency_loss(pred, target, kind=kind, c=c)
        loss.backward(inputs=params())
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, online, 1.0 - ema_decay)
        for unit in ema_units:  # FSDP2 keeps a root unit gathered after a no_grad forward; the lerp updated the
            unit.reshard()      # shards, so the next forward must gather them again, not reuse the stale copy
        return {"loss": loss.detach()}

    return Recipe(R, {"student": Step(student_step, optimizers=(optimizer,), sources=(source,),
                                      state=(ema_student,))})


# ----------------------------------------------------------------------------------------------------
# language-model distillation

# fused_linear_kd_loss options a recipe passes through as given (the rest it sets itself)
KD_OPTIONS = ("beta", "alpha", "lam", "vocab", "softcap", "teacher_softcap", "pack_valid", "backend")


def llm_kd(student: nn.Module, teacher: nn.Module, *, optimizer, divergence: str = "forward_kl",
           temperature: float = 1.0, t_squared: bool = False, hard_weight: float = 0.0, soft_weight: float = 1.0,
           ignore_index: int = -100, chunk_size: Optional[int] = None, process_group=None,
           student_hidden: Optional[Callable] = None, student_head: Optional[nn.Module] = None,
           teacher_hidden: Optional[Callable] = None, teacher_head: Optional[nn.Module] = None,
           **kd_options) -> Recipe:
    """Logit distillation of a causal language model (Hinton et al. 2015; the divergences of
    ``flashdistill.kd_loss``), with ``fused_linear_kd_loss``: the student's and the teacher's LM heads are
    applied chunk by chunk inside the loss, so neither [tokens x vocabulary] logit tensor ever exists.

    One step "student", fn(input_ids, labels, attention_mask=None). Position i predicts token i + 1: the
    labels are shifted left with ``ignore_index`` at the end (as transformers' causal-LM loss), so the hidden
    states are used whole; labels equal to ``ignore_index`` (prompt, padding) count in neither the KL nor the
    hard-label CE, and the loss is divided by the number of valid targets of the batch.

    Hidden states and heads: by default the models are Hugging Face causal LMs; the student runs as given
    (a DDP wrapper's forward runs) with ``output_hidden_states=True, logits_to_keep=1`` and its hidden state is
    ``hidden_states[-1]`` (after the final norm), its head ``get_output_embeddings()``; the teacher runs under
    no_grad through ``.base_model`` (no logits at all), ``last_hidden_state``. Or give ``student_hidden(input_ids,
    attention_mask) -> [B, L, H]`` and ``student_head`` (a module with ``weight`` [V, H] and ``bias``), and the
    same for the teacher. A model that transforms its logits after the head (Gemma 2's soft-capping) needs
    ``softcap`` / ``teacher_softcap``. ``process_group``: the heads are vocab-parallel slices (tensor
    parallelism), passed through to the op: rank r of the group holds the rows [start_r, start_r + V_r) of the
    student's and of the teacher's head, the slices in rank order (uneven widths allowed), e.g. the model's
    ``lm_head`` replaced by an ``nn.Linear`` of its rows, or ``student_head`` (a module of the student, so that
    it is trained); every rank gives the same tokens (labels are global ids) and gets the same loss and the
    whole gradient of the hidden states. Other options of the op: ``beta``, ``alpha``, ``lam``, ``vocab``,
    ``softcap``, ``teacher_softcap``, ``pack_valid``, ``backend``. Put the teacher in eval mode; a student
    with dropout draws from torch's generator (add it to the step's sources to capture).
    Metrics: "loss", "soft" and "hard" (the two terms, each divided by the valid-target count).

    FSDP2: the loss reads the heads' weights outside their forward. A head in the root unit is gathered there
    (FSDP2 keeps the root gathered after its forward); a head in a unit that resharded after its forward is
    gathered for the loss with ``unshard()`` (the student's is resharded by FSDP2's post-backward, the
    teacher's after the loss). A ``fully_shard``-ed teacher runs through its root forward (with
    ``output_hidden_states``, ``logits_to_keep=1``), not ``.base_model``, which would skip the root unit's
    all-gather. Data parallel: the loss is divided by the valid targets of the rank's batch, so averaged
    gradients equal the whole batch's only when the ranks hold equally many.
    """
    R = "llm_kd"
    if divergence not in KD_DIVERGENCES:
        raise ValueError(f"{R}: divergence={divergence!r} is not one of {', '.join(KD_DIVERGENCES)}")
    for key in kd_options:
        if key not in KD_OPTIONS:
            raise TypeError(f"{R}: unknown option {key!r}; fused_linear_kd_loss options it passes: "
                            f"{', '.join(KD_OPTIONS)}")
    params = _trained(R, "student", student, optimizer, "optimizer")
    s_head, t_head = student_head, teacher_head
    for name, head, model in (("student_head", s_head, student), ("teacher_head", t_head, teacher)):
        if head is None and not hasattr(_unwrap(model), "get_output_embeddings"):
            raise TypeError(f"{R}: {name} is needed: {type(_unwrap(model)).__name__} has no get_output_embeddings()")
    s_head = s_head if s_head is not None else _unwrap(student).get_output_embeddings()
    t_head = t_head if t_head is not None else _unwrap(teacher).get_output_embeddings()
    for name, head in (("student_head", s_head), ("teacher_head", t_head)):
        if not isinstance(getattr(head, "weight", None), Tensor):
            raise TypeError(f"{R}: {name} must be a module with a weight [V, H] (and bias), got {type(head).__name__}")
    teacher_model = _unwrap(teacher)
    s_unit, t_unit = _fsdp_unit(student, s_head), _fsdp_unit(teacher, t_head)
    FSDPModule = _fsdp_module_type()
    fsdp_teacher = FSDPModule is not None and isinstance(teacher_model, FSDPModule)
    options = dict(divergence=divergence, temperature=temperature, t_squared=t_squared, hard_weight=hard_weight,
                   soft_weight=soft_weight, ignore_index=ignore_index, chunk_size=chunk_size,
                   process_group=process_group, **kd_options)

    def hidden_of_student(input_ids, attention_mask):
        if student_hidden is not None:
            return student_hidden(input_ids, attention_mask)
        out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=1)
        return out.hidden_states[-1]

    def hidden_of_teacher(input_ids, attention_mask):
        if teacher_hidden is not None:
            return teacher_hidden(input_ids, attention_mask)
        if fsdp_teacher:  # FSDP2 gathers the root unit (embeddings, final norm) in the root's forward only
            return teacher_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                 logits_to_keep=1).hidden_states[-1]
        return teacher_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def student_step(input_ids, labels, attention_mask=None):
        optimizer.zero_grad(set_to_none=True)
        targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # position i predicts token i + 1
        h = hidden_of_student(input_ids, attention_mask)
        with torch.no_grad():
            h_t = hidden_of_teacher(input_ids, attention_mask)
        gathered = [_gather_head(R, name, head, unit) for name, head, unit in
                    (("student_head", s_head, s_unit), ("teacher_head", t_head, t_unit))]
        loss, soft, hard = fused_linear_kd_loss(
            h, s_head.weight, student_bias=s_head.bias, teacher_hidden=h_t, teacher_weight=t_head.weight,
            teacher_bias=getattr(t_head, "bias", None), labels=targets, return_parts=True, **options)
        if gathered[1] and t_unit is not s_unit:  # no backward reshards the teacher's unit
            t_unit.reshard()
        loss.backward(inputs=params())
        optimizer.step()
        return {"loss": loss.detach(), "soft": soft.detach(), "hard": hard.detach()}

    return Recipe(R, {"student": Step(student_step, optimizers=(optimizer,))})


# ----------------------------------------------------------------------------------------------------
# helpers


def _unwrap(module):
    """The module inside a DistributedDataParallel wrapper (for a network a step only evaluates)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def _fsdp_module_type():
    """FSDP2's FSDPModule (what ``fully_shard`` makes a module), or None in a torch without distributed."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return None
    return FSDPModule


def _fsdp_unit(model, sub):
    """The FSDP2 unit (``fully_shard``-ed module) that holds the parameters of ``sub``: ``sub`` itself or its
    nearest ancestor in ``model`` that is an FSDPModule; None without FSDP2."""
    FSDPModule = _fsdp_module_type()
    if FSDPModule is None:
        return None
    model = _unwrap(model)
    path = next((n for n, m in model.named_modules() if m is sub), None)
    if path is None:  # a head given outside the model
        return sub if isinstance(sub, FSDPModule) else None
    units = [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule) and
             (n == "" or path == n or path.startswith(n + "."))]
    return max(units, key=lambda u: len(u[0]))[1] if units else None


def _gather_head(R, name, head, unit) -> bool:
    """Makes ``head.weight`` a plain tensor for the loss, which reads it outside the head's forward; True if
    it gathered. Under FSDP2 it is the unsharded parameter while the head's unit is gathered: always for the
    root unit (FSDP2 keeps the root gathered after its forward), and for a unit that resharded after its
    forward after ``unit.unshard()`` here (FSDP2's post-backward reshards it, as after any backward)."""
    if unit is None:
        return False
    from torch.distributed.tensor import DTensor

    if not isinstance(head.weight, DTensor):
        return False
    unit.unshard()
    if isinstance(head.weight, DTensor):
        raise ValueError(f"{R}: {name}'s weight is a DTensor after unsharding its FSDP2 unit; for a tensor-parallel "
                         f"head give its local rows as a plain module and process_group")
    return True


def _trained(R, name, module, optimizer, opt_name) -> Callable[[], list]:
    """``inputs()``: the tensors the step's backward takes as ``inputs``, i.e. the parameters of ``module`` that
    require grad. The optimizer must hold only ``module``'s parameters (a swapped or shared optimizer is an error).

    Under FSDP2 (``fully_shard``) a parameter is a sharded DTensor that the autograd graph never sees: the forward
    all-gathers it into an unsharded parameter, a separate leaf that FSDP2 keeps for the module's lifetime and
    whose gradient it reduce-scatters into the sharded one. ``backward(inputs=<sharded>)`` would leave every
    gradient None without an error, so ``inputs()`` gives the unsharded parameter in its place (it exists once a
    forward has run, i.e. at every backward)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{R}: {name} must be an nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{R}: {opt_name} must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{R}: {name} has no parameters that require grad")
    own = {id(p) for p in module.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise ValueError(f"{R}: {opt_name} holds parameters that are not {name}'s")
    sharded = _fsdp_params(R, name, module)
    if not sharded:
        return lambda: params
    return lambda: [sharded[id(p)].unsharded_param if id(p) in sharded else p for p in params]


def _fsdp_params(R, name, module) -> dict:
    """{id(sharded parameter): its FSDP2 FSDPParam} over the ``fully_shard``-ed modules in ``module``; empty
    without FSDP2. FSDP2 has no public handle on the unsharded parameters: this reads its internals and fails
    here, at build time, naming them, if a torch release changes them (tests/test_distributed.py would too)."""
    FSDPModule = _fsdp_module_type()
    if FSDPModule is None:
        return {}
    out = {}
    for m in module.modules():
        if isinstance(m, FSDPModule):
            try:
                state = m._get_fsdp_state()
                groups = getattr(state, "_fsdp_param_groups", None)  # torch 2.13; one _fsdp_param_group before
                groups = groups if groups is not None else [g for g in [state._fsdp_param_group] if g is not None]
                for fp in (fp for g in groups for fp in g.fsdp_params):
                    out[id(fp.sharded_param)] = fp
                    type(fp).unsharded_param  # noqa: B018 (the property the backward reads)
            except AttributeError as e:
                raise RuntimeError(f"{R}: {name} is fully_shard-ed (FSDP2), and torch {torch.__version__} lacks the "
                                   f"FSDP2 internals the recipe reads to take gradients of its unsharded parameters "
                                   f"({e}); use DistributedDataParallel, or a torch whose FSDPState has "
                                   f"_fsdp_param_groups[i].fsdp_params with sharded_param, unsharded_param") from None
    return out


def _check_schedule(R, schedule, source, prediction):
    spaces = next((v for k, v in SPACES.items() if isinstance(schedule, k)), None)
    if spaces is None:
        raise TypeError(f"{R}: schedule must be a VPSchedule, FlowSchedule or EDMSchedule, got "
                        f"{type(schedule).__name__}")
    if prediction not in spaces:
        raise ValueError(f"{R}: prediction={prediction!r} is not one of {', '.join(spaces)} for a "
                         f"{type(schedule).__name__}")
    if not isinstance(source, NoiseSource):
        raise TypeError(f"{R}: source must be a flashdistill.NoiseSource, got {type(source).__name__}")
    if isinstance(schedule, VPSchedule) and schedule.alphas_cumprod.device != source.offset.device:
        raise ValueError(f"{R}: the schedule is on {schedule.alphas_cumprod.device}, the source on "
                         f"{source.offset.device}; build both on the training device")


def _check_guidance(R, name, w, null_cond):
    if w is None:
        return
    if not isinstance(w, Tensor) and (not isinstance(w, (int, float)) or isinstance(w, bool)):
        raise TypeError(f"{R}: {name} must be None, a float or a per-sample tensor, got {type(w).__name__}")
    if null_cond is None:
        raise ValueError(f"{R}: {name} needs null_cond, the unconditional cond of the second network call")


def _check_int(R, name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{R}: {name} must be an int >= 1, got {v!r}")


def _sample_shape(R, shape, batch_size) -> tuple:
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ValueError(f"{R}: sample_shape must be the per-sample shape, a tuple of ints >= 1 (e.g. (4, 64, 64)), "
                         f"got {shape!r}")
    if batch_size is not None:
        _check_int(R, "batch_size", batch_size)
    return tuple(shape)


def _time_sampler(R, name, schedule, t_range, default):
    """draw(source, B) -> t for the schedule (module docstring, "Times")."""
    lo, hi = default if t_range is None else t_range
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not 0 <= lo < hi <= 1:
        raise ValueError(f"{R}: {name} must be (lo, hi) with 0 <= lo < hi <= 1 (fractions of the noise axis), "
                         f"got {t_range!r}")
    if isinstance(schedule, VPSchedule):
        T = schedule.num_train_timesteps
        low = min(round(lo * T), T - 1)
        high = max(round(hi * T), low + 1)
        return lambda source, B: uniform_timesteps(source, B, low, high)

    def draw(source, B):
        u = lo + (hi - lo) * source.rand((B,), dtype=torch.float64)
        if isinstance(schedule, FlowSchedule):
            return u
        r = 1.0 / schedule.rho
        lo_r, hi_r = schedule.sigma_min**r, schedule.sigma_max**r
        return (lo_r + u * (hi_r - lo_r)) ** schedule.rho

    return draw


def _batch(R, cond, batch_size, *guidance) -> int:
    """B from a tensor cond or batch_size; a guided step needs a cond."""
    _needs_cond(R, cond, *guidance)
    if isinstance(cond, Tensor):
        if batch_size is not None and cond.shape[0] != batch_size:
            raise ValueError(f"{R}: cond has batch {cond.shape[0]}, the recipe's batch_size is {batch_size}")
        return cond.shape[0]
    if batch_size is None:
        raise ValueError(f"{R}: the batch size comes from a tensor cond or from batch_size; the step got "
                         f"cond={type(cond).__name__} and the recipe has no batch_size")
    return batch_size


def _needs_cond(R, cond, *guidance):
    if cond is None and any(w is not None for w in guidance):
        raise ValueError(f"{R}: guidance needs a cond; the step was called with cond=None")


def _noised(x0, t, schedule, source):
    """(x_t, eps, alpha, sigma): x_t = alpha x0 + sigma eps, eps drawn in the kernel from ``source``."""
    alpha, sigma = schedule.coefficients(t)
    x_t, eps = q_sample(x0, alpha=alpha, sigma=sigma, source=source, return_noise=True)
    return x_t, eps, alpha, sigma


def _predict(net, x, x_t, t, cond, null_cond, guidance):
    """(net(x_t, t, cond), net(x_t, t, null_cond) when guided else None), cast to x's dtype."""
    pred = _as(x, net(x_t, t, cond))
    if guidance is None:
        return pred, None
    if isinstance(null_cond, Tensor) and null_cond.shape[0] == 1 and x.shape[0] != 1:
        null_cond = null_cond.expand(x.shape[0], *null_cond.shape[1:])
    return pred, _as(x, net(x_t, t, null_cond))


def _as(x, p):
    return p if p.dtype == x.dtype else p.to(x.dtype)


def _compute(x) -> torch.dtype:
    """The ops' compute dtype for x (per-sample weights are given in it)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(v, x):
    """A float or [B] tensor as [B, 1, ...] broadcasting against x, in x's compute dtype."""
    if not isinstance(v, Tensor):
        return v
    return v.to(_compute(x)).reshape((-1,) + (1,) * (x.dim() - 1))


def _dtype(module) -> torch.dtype:
    return next((p.dtype for p in _unwrap(module).parameters() if p.is_floating_point()), torch.float32)

