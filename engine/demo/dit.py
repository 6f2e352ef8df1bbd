"""A small class-conditional DiT for the 8x8 digits, and the one-step student built from it.

DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748), at toy size:

    x_t [B, C, 8, 8] --patchify (p x p, linear)--> tokens [B, L = (8/p)^2, W] + fixed 2-D sin-cos positions
    c = MLP(sinusoidal(t)) + Embedding(class)       (class index ``num_classes`` = the null class, CFG)
    depth x adaLN-Zero block:
        h = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)        shift/scale/gate = Linear(SiLU(c)),
        x = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)         zero-initialised (block = identity)
    final: LN(x) * (1 + scale) + shift -> Linear(W, p * p * C) (zero-initialised) -> unpatchify

LayerNorms have no affine parameters (the conditioning supplies them, DiT Sec. 3.2 "adaLN-Zero").
Self-attention is ``flashdistill.attention`` on q, k, v [B, heads, L, W / heads] (the C++ kernel on a
CPU, forward and backward; looked up on the ``flashdistill`` module at every call so a test can count
the calls).

The output is the prediction in ``prediction`` space ("v" by default, "eps" or "x0"), as ``dsm_loss``'s
``target`` and ``to_x0``'s ``space`` name it. v (Salimans & Ho 2022) rather than eps because the
one-step student reads x0 at the largest timestep, where alpha_T is ~0.006 on the linear VP schedule:
x0 = (x_t - sigma eps) / alpha would multiply the network's error by ~160, x0 = alpha x_t - sigma v
does not.

``student_from_teacher(teacher, schedule)`` is DMD2's generator initialisation (Yin et al. 2024,
"Improved Distribution Matching Distillation", arXiv:2405.14867; tianweiy/DMD2 ``sd_unified_model``,
research notes score_distill.md Sec. 3.4): a deep copy of the teacher, evaluated at one fixed
conditioning timestep (T - 1 = 999, as DMD2's ``conditioning_timestep``) on pure noise z, whose
prediction is converted to x0 (``flashdistill.to_x0``, in float32). The fake score of the DMD2 recipe is
another copy of the teacher, trained with ``dsm_loss`` (score_distill.md Sec. 3.6).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flashdistill

__all__ = ["DiTConfig", "DiT", "OneStepGenerator", "student_from_teacher", "timestep_embedding"]

PREDICTIONS = ("eps", "x0", "v")


@dataclass(frozen=True)
class DiTConfig:
    """The architecture. The defaults (width 64, depth 2, 4 heads of 16, MLP ratio 2: 0.13 M parameters)
    train to recognisable digits in the teacher's default 1,500 steps of batch 128 (26 ms a step on 2
    idle CPU cores, ~40 s; FD 11.8 at 8 DDIM steps, guidance 1.5). Width 96, depth 3, MLP ratio 4 reached
    FD 7.0 in the same steps at ~3x the time; 2,500 steps of the default 9.0 (teacher.py has the table).
    """

    image_size: int = 8
    channels: int = 1
    patch: int = 2
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10
    prediction: str = "v"
    freq_dim: int = 64            # sinusoidal timestep features before the MLP
    time_scale: float = 1.0       # t is multiplied by this before the sinusoid (1 for int timesteps in [0, 1000))

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"DiTConfig: prediction={self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        if self.image_size % self.patch:
            raise ValueError(f"DiTConfig: patch={self.patch} does not divide image_size={self.image_size}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"DiTConfig: width={self.width} must split into {self.heads} heads of even size")
        if self.width % 4:
            raise ValueError(f"DiTConfig: width={self.width} must be a multiple of 4 (2-D sin-cos positions)")
        for name in ("depth", "heads", "num_classes", "freq_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig: {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B, dim] sinusoidal features of (float) t, as DiT / ADM: cos then sin of t * 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding [grid * grid, width] (MAE / DiT): half the channels for the
    row, half for the column, each a 1-D sin-cos of the coordinate."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        out = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([one_d(width // 2, ys.reshape(-1)), one_d(width // 2, xs.reshape(-1))], dim=1)
    return emb.to(torch.float32)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention through ``flashdistill.attention``: no mask, or ``causal`` (top-left, as
    SDPA's is_causal; the kd demo's language model)."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, L, W = x.shape
        # [B, L, 3, H, D] -> three [B, H, L, D] views; the kernels read these strides in place
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = flashdistill.attention(q, k, v, causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    """One adaLN-Zero transformer block (DiT Fig. 3, right)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """``model(x_t, t, cond)``: x_t [B, C, H, W], t [B] (int or float: the timestep as the schedule
    defines it, int64 in [0, T) for a VPSchedule), cond int64 labels [B] in [0, num_classes], where
    ``num_classes`` is the null (unconditional) class. Returns the prediction in ``self.prediction``
    space, shaped like x_t."""

    def __init__(self, config: Optional[DiTConfig] = None, **overrides):
        super().__init__()
        cfg = DiTConfig(**{**(config.to_dict() if config is not None else {}), **overrides})
        self.config = cfg
        self.prediction = cfg.prediction
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes
        W, p = cfg.width, cfg.patch
        self.grid = cfg.image_size // p
        self.patch_embed = nn.Linear(cfg.channels * p * p, W)
        self.register_buffer("pos", _sincos_2d(W, self.grid), persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(cfg.freq_dim, W), nn.SiLU(), nn.Linear(W, W))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, W)
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        self.final = nn.Linear(W, cfg.channels * p * p)
        self._init_weights()

    def _init_weights(self):
        # DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        for lin in (self.final_ada[1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def patchify(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p, g = self.config.patch, self.grid
        return x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def unpatchify(self, tok: Tensor) -> Tensor:
        B = tok.shape[0]
        p, g, C = self.config.patch, self.grid, self.config.channels
        return tok.reshape(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def forward(self, x_t: Tensor, t, cond: Tensor) -> Tensor:
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != want:
            raise ValueError(f"DiT: x_t must be [B, {', '.join(map(str, want))}], got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(B) if t.dim() == 0 else t
        if not isinstance(cond, Tensor) or cond.dtype != torch.int64 or cond.shape != (B,):
            got = f"{tuple(cond.shape)} {cond.dtype}" if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"DiT: cond must be int64 labels [{B}] in [0, {self.null_class}] "
                             f"({self.null_class} = the null class), got {got}")
        if t.shape != (B,):
            raise ValueError(f"DiT: t must be a scalar or [{B}], got {tuple(t.shape)}")
        dtype = self.patch_embed.weight.dtype
        c = self.t_mlp(timestep_embedding(t * cfg.time_scale, cfg.freq_dim).to(dtype)) + self.y_embed(cond)
        h = self.patch_embed(self.patchify(x_t.to(dtype))) + self.pos.to(dtype)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.unpatchify(self.final(_modulate(self.final_norm(h), shift, scale)))


class OneStepGenerator(nn.Module):
    """``student(z, cond) -> x0``: the wrapped DiT evaluated once at timestep ``t`` on z ~ N(0, I),
    its prediction turned into x0 with ``flashdistill.to_x0`` at the schedule's (alpha_t, sigma_t).

    ``net`` is trained (it is the generator's only parameter set); ``t``, alpha and sigma are buffers.
    """

    def __init__(self, net: DiT, schedule: flashdistill.VPSchedule, t: Optional[int] = None):
        super().__init__()
        if not isinstance(schedule, flashdistill.VPSchedule):
            raise TypeError(f"OneStepGenerator: schedule must be a flashdistill.VPSchedule, got "
                            f"{type(schedule).__name__}")
        T = schedule.num_train_timesteps
        t = T - 1 if t is None else int(t)
        if not 0 <= t < T:
            raise ValueError(f"OneStepGenerator: t must be in [0, {T}), got {t}")
        self.net = net
        self.prediction = net.prediction
        ab = schedule.alphas_cumprod.detach().to("cpu", torch.float64)[t]
        self.register_buffer("t", torch.tensor(t, dtype=torch.int64))
        self.register_buffer("alpha", ab.sqrt().reshape(1))
        self.register_buffer("sigma", (1 - ab).sqrt().reshape(1))

    def forward(self, z: Tensor, cond: Tensor) -> Tensor:
        B = z.shape[0]
        t = self.t.expand(B)
        pred = self.net(z, t, cond)
        return flashdistill.to_x0(pred, z, space=self.prediction, alpha=self.alpha.expand(B),
                                  sigma=self.sigma.expand(B)).to(pred.dtype)


def student_from_teacher(teacher: DiT, schedule: flashdistill.VPSchedule, t: Optional[int] = None) -> OneStepGenerator:
    """DMD2's one-step generator: a deep copy of ``teacher`` (trainable, in train mode) read at timestep
    ``t`` (default T - 1) on pure noise; see the module docstring. The teacher is not changed."""
    if not isinstance(teacher, DiT):
        raise TypeError(f"student_from_teacher: teacher must be a DiT, got {type(teacher).__name__}")
    net = copy.deepcopy(teacher)
    net.requires_grad_(True).train()
    return OneStepGenerator(net, schedule, t).to(next(teacher.parameters()).device)
