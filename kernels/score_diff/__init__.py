"""dmd_loss: the DMD / DMD2 distribution-matching generator loss as one fused op.

Contract (math and citations in ``reference.py``, which is the spec):

    dmd_loss(x, real, fake, *, real_uncond=None, guidance=None, eps=0.0, backend=None) -> loss

x is the generator output (rank >= 2, batch first: images [B, C, H, W], video latents
[B, C, T, H, W], ...); real and fake are the teacher's and the fake score network's x0 predictions at
the noised x; all three (and real_uncond) share one shape, dtype (float32, float16, bfloat16 or
float64) and device. With real_uncond, guidance (a float, or a per-sample [B] tensor of the compute
dtype: float32, or float64 for float64 inputs) applies classifier-free guidance to the teacher,
fused in the kernel. Returns a 0-d loss in the compute dtype; autograd reaches x only.

A float ``guidance`` is baked into a compiled graph (torch.compile recompiles for a new value); pass
a [B] tensor when it changes from step to step or differs per sample.

Layout: rows of the inputs (one sample each) must be contiguous inside; any batch stride is free
(``t[::2]``, ``t[:, :4]`` of a contiguous tensor); other layouts are copied once before the kernel.

Traffic of the fused backends per element (b = bytes per element of the dtype): forward reads x, real,
fake (+ real_uncond) and writes g; the per-sample normaliser must be final before any g exists, so the
forward reads real (+ real_uncond) twice, from cache while a sample fits in it. Backward reads g and
writes dloss/dx. Minimum: (3 + 1) b forward + 2 b backward without guidance; the eager reference makes
about a dozen full-size passes, several in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, grad_scale, native  # noqa: F401 (grad_scale registers its op)
from flashdistill.kernels.score_diff import reference

OP = "dmd_loss"

__all__ = ["dmd_loss"]


def dmd_loss(x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
             guidance=None, eps: float = 0.0, backend: Optional[str] = None) -> Tensor:
    """DMD/DMD2 generator loss (see the module docstring); differentiable with respect to x."""
    if backend is None:
        backend = backends.default_backend()
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"{OP}: backend={backend!r} is not a backend; choose one of auto, "
                         f"{', '.join(backends.BACKENDS)}")
    guidance_tensor, guidance_scale = None, 1.0
    if real_uncond is not None and guidance is None:
        raise ValueError(f"{OP}: real_uncond is given but guidance is None; pass the guidance scale "
                         f"(a float or a per-sample tensor)")
    if guidance is not None:
        if real_uncond is None:
            raise ValueError(f"{OP}: guidance is given but real_uncond is None; classifier-free "
                             f"guidance needs the unconditional teacher prediction")
        if isinstance(guidance, Tensor):
            guidance_tensor = guidance
        elif isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
            guidance_scale = float(guidance)
        else:
            raise TypeError(f"{OP}: guidance must be a float or a per-sample tensor, got {type(guidance).__name__}")
    # validated here too so that a non-tensor argument gets our message, not the dispatcher's
    _validate(x, real, fake, real_uncond, guidance_tensor, guidance_scale, float(eps))
    loss, _ = torch.ops.flashdistill.dmd_loss(x, real, fake, real_uncond, guidance_tensor,
                                              guidance_scale, float(eps), backend)
    return loss


# ----------------------------------------------------------------------------------------------------
# validation (shared by the real and the fake implementation)

def _validate(x, real, fake, real_uncond, guidance, guidance_scale, eps):
    checks.tensor(OP, "x", x, min_dim=2)
    checks.like(OP, "real", real, "x", x)
    checks.like(OP, "fake", fake, "x", x)
    if real_uncond is not None:
        checks.like(OP, "real_uncond", real_uncond, "x", x)
    if guidance is not None:
        if real_uncond is None:
            raise ValueError(f"{OP}: a guidance tensor needs real_uncond")
        checks.per_sample(OP, "guidance", guidance, x.shape[0], checks.compute_dtype(x.dtype), x.device)
    if not math.isfinite(guidance_scale):
        raise ValueError(f"{OP}: guidance must be finite, got {guidance_scale}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{OP}: eps must be a finite number >= 0, got {eps}")


# ----------------------------------------------------------------------------------------------------
# backends: each returns (loss in the compute dtype, g shaped like x in x.dtype)

def _native_forward(mod, x, real, fake, real_uncond, guidance, guidance_scale, eps):
    x2, real2, fake2 = native.rows(x), native.rows(real), native.rows(fake)
    uncond2 = native.rows(real_uncond) if real_uncond is not None else None
    guidance = guidance.contiguous() if guidance is not None else None
    B, D = x2.shape
    code = native.DTYPE_CODES[x.dtype]
    g = native.empty((B, D), x.dtype, x.device)
    loss = native.empty((), checks.compute_dtype(x.dtype), x.device)
    ws_bytes = mod.dmd_workspace_bytes(code, B, D)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    mod.dmd_forward(
        code, B, D,
        x2.data_ptr(), x2.stride(0), real2.data_ptr(), real2.stride(0), fake2.data_ptr(), fake2.stride(0),
        uncond2.data_ptr() if uncond2 is not None else 0, uncond2.stride(0) if uncond2 is not None else 0,
        guidance.data_ptr() if guidance is not None else 0, guidance_scale, eps,
        g.data_ptr(), loss.data_ptr(),
        ws.data_ptr() if ws is not None else 0, ws_bytes,
        native.stream_of(x))
    return loss, g.view(x.shape)


def _cpu(*args):
    return _native_forward(native.cpu_module()[0], *args)


def _cuda(x, *args):
    with torch.cuda.device(x.device):
        return _native_forward(native.cuda_module()[0], x, *args)


def _triton(x, real, fake, real_uncond, guidance, guidance_scale, eps):
    from flashdistill.kernels.score_diff import triton_kernel

    loss, g = triton_kernel.dmd_forward(
        native.rows(x), native.rows(real), native.rows(fake),
        native.rows(real_uncond) if real_uncond is not None else None,
        guidance.contiguous() if guidance is not None else None, guidance_scale, eps)
    return loss, g.view(x.shape)


_IMPLS = {"reference": reference.dmd_forward, "cpu": _cpu, "triton": _triton, "cuda": _cuda}


# ----------------------------------------------------------------------------------------------------
# torch.library registration

@torch.library.custom_op("flashdistill::dmd_loss", mutates_args=())
def _dmd_loss_op(x: Tensor, real: Tensor, fake: Tensor, real_uncond: Optional[Tensor],
                 guidance: Optional[Tensor], guidance_scale: float, eps: float,
                 backend: str) -> tuple[Tensor, Tensor]:
    _validate(x, real, fake, real_uncond, guidance, guidance_scale, eps)
    name = backends.resolve(OP, backend, x.device)
    return _IMPLS[name](x, real, fake, real_uncond, guidance, guidance_scale, eps)


@_dmd_loss_op.register_fake
def _(x, real, fake, real_uncond, guidance, guidance_scale, eps, backend):
    _validate(x, real, fake, real_uncond, guidance, guidance_scale, eps)
    loss = x.new_empty((), dtype=checks.compute_dtype(x.dtype))
    return loss, torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.numel = inputs[0].numel()
    ctx.backend = inputs[-1]


def _backward(ctx, grad_loss, grad_g):
    (g,) = ctx.saved_tensors
    # dloss/dx = g * grad_loss / N: one read of g, one write, the factor kept in the compute dtype
    # and read on the device (no host sync).
    grad_x = torch.ops.flashdistill.grad_scale(g, grad_loss, 1.0 / ctx.numel, ctx.backend)
    return grad_x, None, None, None, None, None, None, None


_dmd_loss_op.register_autograd(_backward, setup_context=_setup_context)
