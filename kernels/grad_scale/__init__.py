"""grad_scale: ``src * (scale * factor)`` computed in the compute dtype and rounded once to src's dtype.

The backward of every loss whose forward saves dloss/dx up to the scalar upstream gradient: the
fused forward writes g (one pass it makes anyway), and the backward multiplies by
``grad_output * factor`` (factor = 1/N for a mean). Doing that with a plain ``g * (grad_output / N)``
would round the factor to g's dtype on a GPU, and 1/N underflows float16 for large N; this op keeps
it in float32 (float64 for float64) and reads it from device memory, so there is no host sync.

Traffic: read n·b, write n·b (b = element size), 1 flop per element.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native

OP = "grad_scale"


def reference(src: Tensor, scale: Tensor, factor: float) -> Tensor:
    cd = checks.compute_dtype(src.dtype)
    return (src.to(cd) * (scale.to(cd) * factor)).to(src.dtype)


def _native(mod, src, scale, factor):
    src = src.contiguous()
    out = native.empty(src.shape, src.dtype, src.device)
    args = (native.DTYPE_CODES[src.dtype], src.numel(), src.data_ptr(), out.data_ptr(), scale.data_ptr(), factor)
    if src.is_cuda:
        with torch.cuda.device(src.device):
            mod.grad_scale(*args, native.stream_of(src))
    else:
        mod.grad_scale(*args)
    return out


def _triton(src, scale, factor):
    from flashdistill.kernels.grad_scale import triton_kernel

    return triton_kernel.grad_scale(src.contiguous(), scale, factor)


_IMPLS = {
    "reference": reference,
    "cpu": lambda *a: _native(native.cpu_module()[0], *a),
    "cuda": lambda *a: _native(native.cuda_module()[0], *a),
    "triton": _triton,
}


@eager.custom_op("flashdistill::grad_scale")
def grad_scale(src: Tensor, scale: Tensor, factor: float, backend: str) -> Tensor:
    """src * (scale * factor); scale is a 0-d tensor of the compute dtype on src's device."""
    checks.tensor(OP, "src", src)
    if scale.shape != () or scale.dtype != checks.compute_dtype(src.dtype) or scale.device != src.device:
        raise ValueError(f"{OP}: scale must be a 0-d {checks.compute_dtype(src.dtype)} tensor on {src.device}, "
                         f"got shape {tuple(scale.shape)}, dtype {scale.dtype}, device {scale.device}")
    return _IMPLS[backends.resolve(OP, backend, src.device)](src, scale, factor)


@grad_scale.register_fake
def _(src, scale, factor, backend):
    return torch.empty(src.shape, dtype=src.dtype, device=src.device)
