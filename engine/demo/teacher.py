"""The demo's teacher: a class-conditional DiT trained as a multi-step diffusion model, and its samplers.

    train_teacher(images, labels, *, config=TeacherConfig(), steps=, batch_size=, lr=, schedule=, seed=,
                  progress=True) -> (model, losses)
    load_or_train_teacher(cache_dir=None, *, config=TeacherConfig(), images=None, labels=None,
                          progress=True, log=print) -> (model, losses, path)
    sample_teacher(model, n, steps, *, schedule, guidance=None, seed=0, cond=None, method="ddim") -> x0
    sample_student(student, n, *, seed=0, cond=None) -> x0

Training (DDPM, Ho et al. 2020, with the v target of Salimans & Ho 2022 by default): each step draws a
batch of images, timesteps t ~ U{0..T-1} (``uniform_timesteps``) and eps from one Philox
``NoiseSource`` (``q_sample(..., return_noise=True)`` noises in-kernel), drops the label to the null
class with probability ``p_uncond`` = 0.1 (classifier-free guidance, Ho & Salimans 2022), and descends
``dsm_loss(pred, x0, eps, target=model.prediction, alpha=, sigma=)`` with AdamW (fused), a linear
warm-up and a cosine decay. The returned model is an exponential moving average of the weights
(decay ``ema``, with the usual (1 + n) / (10 + n) ramp), in eval mode, gradients off.

The loop reads the loss on the host every ``log_every`` steps for the curve and the progress bar: it is
not a captured loop (issue #7's capture is the distillation's business).

Measured on this repository's 2-core CPU machine (default DiT, batch 128; FD from evaluate.py, 898
samples against the digits' train half, whose held-out other half scores 2.1 and Gaussian noise 270):

    steps   train time (2 idle cores)   FD at DDIM 4 / 8 / 16 / 32 steps, guidance 1.5
    1500    39 s (26 ms a step)         18.1 / 11.8 / 8.9 / 7.9        (the default)
    2500    ~65 s                       13.5 /  9.0 / 7.2 / 6.6
With other processes on the two cores a step took 40-100 ms (torch's two OpenMP threads wait on each
other); one thread (OMP_NUM_THREADS=1) then ran 1.5-2x faster. Guidance 1.5 beat none and 2.0 in every run
(2,500 steps, 8 DDIM steps: 9.0 against 16.6 and 18.3); 1.25 was within 0.5 of 1.5.

Sampling is ``flashdistill.sample`` (DDIM by default, "trailing" timesteps) with guidance fused into the
step: with ``guidance`` the model runs once on the doubled batch [cond; null] and returns the pair.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import flashdistill
from flashdistill.engine.demo import data as D
from flashdistill.engine.demo.dit import DiT, DiTConfig, OneStepGenerator

__all__ = ["TeacherConfig", "train_teacher", "load_or_train_teacher", "sample_teacher", "sample_student",
           "class_labels", "CACHE_FORMAT"]

CACHE_FORMAT = 1  # bump when the checkpoint layout or the training code changes what a config produces


@dataclass(frozen=True)
class TeacherConfig:
    """Everything that determines the cached teacher (its hash names the cache file)."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    p_uncond: float = 0.1
    ema: float = 0.999
    seed: int = 0

    def schedule(self, device=None) -> flashdistill.VPSchedule:
        return flashdistill.VPSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end,
                                       device=device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherConfig":
        d = dict(d)
        d["dit"] = DiTConfig(**d["dit"])
        return cls(**d)


def class_labels(n: int, num_classes: int = D.NUM_CLASSES, device=None) -> Tensor:
    """0, 1, ..., num_classes - 1, 0, 1, ... (n labels, int64): balanced conditioning for sampling."""
    return torch.arange(n, device=device) % num_classes


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_teacher(images: Tensor, labels: Tensor, *, config: Optional[TeacherConfig] = None,
                  steps: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                  schedule: Optional[flashdistill.VPSchedule] = None, seed: Optional[int] = None,
                  progress: bool = True, log_every: int = 10) -> tuple[DiT, list[float]]:
    """Train a DiT with ``dsm_loss`` (see the module docstring); keywords override ``config``'s fields.

    images [N, C, H, W] in [-1, 1], labels int64 [N] in [0, num_classes). Returns (the EMA model in eval
    mode, the loss curve: the mean DSM loss of each window of ``log_every`` steps)."""
    cfg = config or TeacherConfig()
    cfg = replace(cfg, **{k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed).items()
                         if v is not None})
    if images.dim() != 4 or labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"train_teacher: need images [N, C, H, W] and int64 labels [N], got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)} {labels.dtype}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"train_teacher: steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    dev = images.device
    schedule = schedule or cfg.schedule(dev)
    if not isinstance(schedule, flashdistill.VPSchedule):
        raise TypeError(f"train_teacher: schedule must be a flashdistill.VPSchedule, got {type(schedule).__name__}")
    T = schedule.num_train_timesteps

    with torch.random.fork_rng(devices=[]):  # the initial weights, without touching the global RNG
        torch.manual_seed(cfg.seed)
        model = DiT(cfg.dit).to(dev).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    fused = dev.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    src = flashdistill.NoiseSource(cfg.seed, dev)
    g = torch.Generator().manual_seed(cfg.seed)  # batch order, on the host
    N, B = images.shape[0], min(cfg.batch_size, images.shape[0])
    null = model.null_class
    perm, pos = torch.randperm(N, generator=g), 0

    tqdm = D.require_demo_extra("tqdm", "the progress bar") if progress else None
    bar = tqdm.tqdm(total=cfg.steps, desc="teacher (DiT, dsm_loss)", unit="step", leave=True) if progress else None
    losses, window = [], torch.zeros((), dtype=torch.float64, device=dev)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    for step in range(cfg.steps):
        if pos + B > N:
            perm, pos = torch.randperm(N, generator=g), 0
        idx = perm[pos:pos + B].to(dev)
        pos += B
        x0, y = images[idx], labels[idx]
        t = flashdistill.uniform_timesteps(src, B, 0, T)
        x_t, eps = flashdistill.q_sample(x0, t, schedule, source=src, return_noise=True)
        y = torch.where(src.rand((B,)) < cfg.p_uncond, torch.full_like(y, null), y)
        alpha, sigma = schedule.coefficients(t)
        loss = flashdistill.dsm_loss(model(x_t, t, y), x0, eps, target=model.prediction, alpha=alpha, sigma=sigma)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
            window += loss.detach()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            losses.append(window.item() / n)
            window.zero_()
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return ema, losses


def load_or_train_teacher(cache_dir=None, *, config: Optional[TeacherConfig] = None, images: Optional[Tensor] = None,
                          labels: Optional[Tensor] = None, device=None, progress: bool = True,
                          log: Optional[Callable[[str], None]] = print) -> tuple[DiT, list[float], Path]:
    """The teacher for ``config`` from the cache, or trained now and cached.

    Data: ``images`` and ``labels`` if given, else the train half of the digits
    (``train_eval_split(1797, 0.5, seed=0, labels)``). The file is ``<cache>/teacher-<hash>.pt``, hash over
    the config, the data and CACHE_FORMAT; the cache folder is ``cache_dir``, else
    ``$FLASHDISTILL_CACHE/demo``, else ``~/.cache/flashdistill/demo``. ``log`` (print by default) is told
    the path and whether it was loaded or trained. Returns (model in eval mode, loss curve, path)."""
    cfg = config or TeacherConfig()
    if images is None:
        all_x, all_y = D.load_digits(device=device)
        tr, _ = D.train_eval_split(all_x.shape[0], 0.5, seed=0, labels=all_y)
        images, labels = all_x[tr.to(all_x.device)], all_y[tr.to(all_y.device)]
    elif labels is None:
        raise ValueError("load_or_train_teacher: images without labels")
    dev = images.device
    key = D.config_hash({"format": CACHE_FORMAT, "config": cfg.to_dict(), "data": D.tensor_hash(images, labels)})
    path = D.cache_dir(cache_dir) / f"teacher-{key}.pt"
    if path.exists():
        try:
            ck = torch.load(path, map_location=dev, weights_only=True)
            model = DiT(DiTConfig(**ck["config"]["dit"])).to(dev)
            model.load_state_dict(ck["state_dict"])
        except Exception as e:  # a corrupt or foreign file: say so, retrain over it
            if log:
                log(f"teacher: cache file {path} unreadable ({type(e).__name__}: {e}); retraining")
        else:
            if log:
                log(f"teacher: loaded from cache {path} (trained in {ck.get('train_seconds', float('nan')):.0f} s)")
            return model.eval().requires_grad_(False), list(ck["losses"]), path
    if log:
        log(f"teacher: training ({cfg.steps} steps, batch {cfg.batch_size}); will cache at {path}")
    t0 = time.perf_counter()
    model, losses = train_teacher(images, labels, config=cfg, progress=progress)
    seconds = time.perf_counter() - t0
    D.save_checkpoint(path, {"format": CACHE_FORMAT, "config": cfg.to_dict(), "state_dict": model.state_dict(),
                             "losses": losses, "train_seconds": seconds})
    if log:
        log(f"teacher: trained in {seconds:.0f} s, cached at {path}")
    return model, losses, path


def _labels(n: int, cond, device) -> Tensor:
    if cond is None:
        return class_labels(n, device=device)
    cond = torch.as_tensor(cond, dtype=torch.int64, device=device)
    if cond.shape != (n,):
        raise ValueError(f"cond must be int64 [{n}] labels, got shape {tuple(cond.shape)}")
    return cond


@torch.no_grad()
def sample_teacher(model: DiT, n: int, steps: int, *, schedule: flashdistill.VPSchedule, guidance=None, seed: int = 0,
                   cond: Optional[Tensor] = None, method: str = "ddim") -> Tensor:
    """n samples [n, C, H, W] in ``steps`` steps of ``flashdistill.sample`` (``method`` on the VP schedule)
    from x_T = NoiseSource(seed).randn; cond: int64 [n] labels (default ``class_labels(n)``, balanced).
    guidance: None (conditional only) or w, cfg "ho": uncond + w (cond - uncond) on the prediction."""
    dev = next(model.parameters()).device
    cfg = model.config
    y = _labels(n, cond, dev)
    src = flashdistill.NoiseSource(seed, dev)
    x_T = src.randn((n, cfg.channels, cfg.image_size, cfg.image_size))
    was_training = model.training
    model.eval()
    if guidance is None:
        def model_fn(x, t):
            return model(x, t, y)
    else:
        y2 = torch.cat([y, torch.full_like(y, model.null_class)])

        def model_fn(x, t):
            return model(torch.cat([x, x]), torch.cat([t, t]), y2).chunk(2)
    try:
        return flashdistill.sample(model_fn, x_T, schedule, steps, method=method, guidance=guidance,
                                   prediction=model.prediction, source=src)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample_student(student: OneStepGenerator, n: int, *, seed: int = 0, cond: Optional[Tensor] = None) -> Tensor:
    """n one-step samples student(z, cond), z = NoiseSource(seed).randn, cond default ``class_labels(n)``."""
    dev = next(student.parameters()).device
    cfg = student.net.config
    y = _labels(n, cond, dev)
    z = flashdistill.NoiseSource(seed, dev).randn((n, cfg.channels, cfg.image_size, cfg.image_size))
    was_training = student.training
    student.eval()
    try:
        return student(z, y)
    finally:
        student.train(was_training)
