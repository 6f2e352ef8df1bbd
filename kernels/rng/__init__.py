"""Counter-based noise (issue #5): the same Philox4x32-10 stream on every backend.

    randn(shape, *, seed, offset=0, start=0, dtype=torch.float32, device=None, backend=None)
    rand(shape, ...)                      uniforms in [0, 1)
    philox_bits(n, *, seed, offset=0, start=0, device=None, backend=None)   the raw 32-bit words
    NoiseSource(seed, device)             a generator whose offset lives in device memory

The stream: a seed (an int in [0, 2^63)) is the Philox key; the offset (a 64-bit counter half) picks
a substream, one per call of a NoiseSource; element e of a substream is word e mod 4 of the Philox
block with counter (e // 4, offset) (include/flashdistill/philox.h writes it out, kernels/rng/
reference.py is the spec). Uniforms take the word's top 24 bits; normals pair the words of a block
(Box-Muller). So the same (seed, offset, start) gives the same bits on the cpu, triton and cuda
backends and on any machine, and the uniforms exactly; normals agree within the rounding of
log / sin / cos. ``start`` shifts the element index (a shard of a larger tensor draws exactly the
elements it would have drawn in the whole).

``offset`` may be an int or a 0-d int64 tensor on the output's device, read by the kernel: a
NoiseSource keeps it on the device and advances it there after each draw, so a captured graph
(issue #7) draws fresh noise at every replay with no host synchronization. The sampler and noising
kernels generate their noise inline from the same stream instead of reading a noise tensor.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native
from flashdistill.kernels.rng import reference

OP = "philox"
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")
KINDS = {"bits": 0, "uniform": 1, "normal": 2}

__all__ = ["randn", "rand", "philox_bits", "NoiseSource"]


def _offset_tensor(offset, device) -> Tensor:
    if isinstance(offset, Tensor):
        if offset.shape != () or offset.dtype != torch.int64 or offset.device != device:
            raise ValueError(f"{OP}: offset must be an int or a 0-d int64 tensor on {device}, got "
                             f"{tuple(offset.shape)} {offset.dtype} on {offset.device}")
        return offset
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset < 2**63:
        raise ValueError(f"{OP}: offset must be an int in [0, 2^63) or a tensor, got {offset!r}")
    return torch.tensor(offset, dtype=torch.int64, device=device)


def _draw(kind: str, n: int, seed: int, offset, start: int, dtype, device, backend) -> Tensor:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"{OP}: seed must be an int in [0, 2^63), got {seed!r}")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < 2**62:
        raise ValueError(f"{OP}: start must be an int in [0, 2^62), got {start!r}")
    if kind != "bits" and dtype not in checks.FLOAT_DTYPES:
        raise ValueError(f"{OP}: dtype must be one of {', '.join(map(str, checks.FLOAT_DTYPES))}, got {dtype}")
    device = torch.device(device) if device is not None else (
        offset.device if isinstance(offset, Tensor) else torch.device("cpu"))
    off = _offset_tensor(offset, device)
    backend = backends.requested(OP, backend, device, IMPLEMENTED)
    return _philox_op(n, seed, off, start, KINDS[kind], dtype, backend)


def randn(shape, *, seed: int, offset=0, start: int = 0, dtype: torch.dtype = torch.float32, device=None,
          backend: Optional[str] = None) -> Tensor:
    """Standard normals of the stream (seed, offset) from element ``start`` on, in ``shape``."""
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    return _draw("normal", math.prod(shape), seed, offset, start, dtype, device, backend).reshape(shape)


def rand(shape, *, seed: int, offset=0, start: int = 0, dtype: torch.dtype = torch.float32, device=None,
         backend: Optional[str] = None) -> Tensor:
    """Uniforms in [0, 1) (24 random bits) of the stream (seed, offset) from element ``start`` on."""
    shape = tuple(shape) if not isinstance(shape, int) else (shape,)
    return _draw("uniform", math.prod(shape), seed, offset, start, dtype, device, backend).reshape(shape)


def philox_bits(n: int, *, seed: int, offset=0, start: int = 0, device=None, backend: Optional[str] = None) -> Tensor:
    """The stream's raw 32-bit words (as int64) of elements start .. start + n - 1."""
    return _draw("bits", n, seed, offset, start, torch.int64, device, backend)


class NoiseSource:
    """A seed and an offset in device memory: each draw uses the current offset, then adds 1 to it on
    the device (no host sync; a CUDA graph that captured draws replays them with fresh noise).

    >>> src = NoiseSource(seed=1234, device="cpu")
    >>> eps = src.randn((4, 3, 8, 8))        # substream 0
    >>> eps2 = src.randn((4, 3, 8, 8))       # substream 1
    """

    def __init__(self, seed: int, device=None):
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"NoiseSource: seed must be an int in [0, 2^63), got {seed!r}")
        self.seed = seed
        self.offset = torch.zeros((), dtype=torch.int64, device=device)

    def _next(self, draw):
        out = draw()
        self.offset.add_(1)
        return out

    def randn(self, shape, dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> Tensor:
        return self._next(lambda: randn(shape, seed=self.seed, offset=self.offset, dtype=dtype,
                                        device=self.offset.device, backend=backend))

    def rand(self, shape, dtype: torch.dtype = torch.float32, backend: Optional[str] = None) -> Tensor:
        return self._next(lambda: rand(shape, seed=self.seed, offset=self.offset, dtype=dtype,
                                       device=self.offset.device, backend=backend))


# ----------------------------------------------------------------------------------------------------
# backends

def _reference(n, seed, offset, start, kind, dtype):
    off = int(offset)  # the spec runs on the host (a sync on a GPU: it is the spec, not a fast path)
    if kind == KINDS["bits"]:
        return reference.stream_words(n, seed, off, start).to(offset.device)
    cd = checks.compute_dtype(dtype)
    if kind == KINDS["uniform"]:
        v = reference.uniform(reference.stream_words(n, seed, off, start), cd)
    else:
        v = reference.normal(n, seed, off, start, cd)
    return v.to(dtype).to(offset.device)


def _out(n, kind, dtype, device):
    if kind == KINDS["bits"]:
        return torch.empty((n,), dtype=torch.int64, device=device)
    return native.empty((n,), dtype, device)


def _cpu(n, seed, offset, start, kind, dtype):
    out = _out(n, kind, dtype, offset.device)
    native.cpu_module()[0].philox_fill(native.DTYPE_CODES.get(dtype, 0), n, seed, offset.data_ptr(), start, kind,
                                       out.data_ptr())
    return out


def _cuda(n, seed, offset, start, kind, dtype):
    out = _out(n, kind, dtype, offset.device)
    with torch.cuda.device(offset.device):
        native.cuda_module()[0].philox_fill(native.DTYPE_CODES.get(dtype, 0), n, seed, offset.data_ptr(), start,
                                            kind, out.data_ptr(), native.stream_of(out))
    return out


def _triton(n, seed, offset, start, kind, dtype):
    from flashdistill.kernels.rng import triton_kernel

    out = _out(n, kind, dtype, offset.device)
    triton_kernel.fill(out, seed, offset, start, kind)
    return out


_IMPLS = {"reference": _reference, "cpu": _cpu, "triton": _triton, "cuda": _cuda}


@eager.custom_op("flashdistill::philox_fill")
def _philox_op(n: int, seed: int, offset: Tensor, start: int, kind: int, dtype: torch.dtype,
               backend: str) -> Tensor:
    """[n] elements of the stream (see the module docstring); int64 words for kind 0."""
    name = backends.resolve(OP, backend, offset.device, IMPLEMENTED)
    return _IMPLS[name](n, seed, offset, start, kind, dtype)


@_philox_op.register_fake
def _(n, seed, offset, start, kind, dtype, backend):
    return torch.empty((n,), dtype=torch.int64 if kind == 0 else dtype, device=offset.device)
