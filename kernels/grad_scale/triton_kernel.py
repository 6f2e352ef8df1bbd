"""Triton twin of grad_scale (see __init__.py): out = src * (scale * factor), one rounding.

Traffic: read n·b, write n·b; 1 flop per element. BLOCK=1024 is tuning only.
"""

import torch
import triton
import triton.language as tl

from flashdistill.kernels import native, triton_utils


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@triton.jit
def _grad_scale_kernel(
    # data
    src_ptr, out_ptr, scale_ptr,
    # shapes and scalars
    n, factor,
    OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(scale_ptr) * factor
    v = tl.load(src_ptr + offs, mask=mask, other=0.0).to(s.dtype)
    tl.store(out_ptr + offs, triton_utils.round_to(v * s, OUT_DTYPE), mask=mask)


def grad_scale(src: torch.Tensor, scale: torch.Tensor, factor: float) -> torch.Tensor:
    out = native.empty(src.shape, src.dtype, src.device)
    n = src.numel()
    BLOCK = 1024
    _grad_scale_kernel[(triton.cdiv(n, BLOCK),)](src, out, scale, n, factor, OUT_DTYPE=_TL[src.dtype], BLOCK=BLOCK)
    return out
