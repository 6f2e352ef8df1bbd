"""Loading the compiled modules and handing tensors to them as raw pointers.

``flashdistill._C`` (CPU) and ``flashdistill._C_cuda`` take only integers and floats (csrc/README.md):
data pointers, sizes, strides in elements, a dtype code and the current CUDA stream. The op layer has
validated every tensor before it gets here.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

# Dtype codes of csrc/include/flashdistill/common.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@functools.cache
def _load(name: str):
    try:
        return importlib.import_module(name), None
    except ImportError as e:
        return None, str(e)


def cpu_module():
    """(module, None) or (None, why it failed to import)."""
    return _load("flashdistill._C")


def cuda_module():
    return _load("flashdistill._C_cuda")


# Debug mode for tests: outputs the kernels must fully overwrite start as NaN instead of whatever
# memory held, so an element a kernel forgets to write shows up in every comparison.
POISON = os.environ.get("FLASHDISTILL_POISON") == "1"


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when POISON is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer (0 for CPU tensors)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as [B, D] with unit stride inside each row; a view when the layout allows, else a copy.

    Kernels address row b at ``data_ptr + b * stride(0)``, so batch-strided views (``t[::2]``,
    ``t[:, :4]`` of a contiguous tensor) cost nothing; other layouts (e.g. channels_last) are copied.
    """
    t2 = t.reshape(t.shape[0], -1)
    if t2.shape[1] > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


# ---- argument packing for the kernels' ABI (absent tensors are passed as 0) -----------------------

def rows_of(*ts):
    """``rows(t)`` of each tensor, None for None."""
    return [rows(t) if t is not None else None for t in ts]


def row_arg(t) -> tuple[int, int]:
    """(data pointer, batch stride in elements) of a [B, D] row view; (0, 0) when absent."""
    return (t.data_ptr(), t.stride(0)) if t is not None else (0, 0)


def ptr(t) -> int:
    """Data pointer, 0 when absent."""
    return t.data_ptr() if t is not None else 0


def contiguous(t):
    """A contiguous tensor (keep the result alive while its pointer is in use), None for None."""
    return t.contiguous() if t is not None else None


def workspace(nbytes: int, device: torch.device):
    """Scratch of ``nbytes`` bytes for a kernel (None when it needs none)."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None


def on_cuda_module(fn):
    """``fn(cuda_module, t, *args)`` run with ``t``'s device current: the CUDA backend of an op."""
    def run(t, *args):
        with torch.cuda.device(t.device):
            return fn(cuda_module()[0], t, *args)
    return run


def on_cpu_module(fn):
    """``fn(cpu_module, *args)``: the CPU backend of an op."""
    return lambda *args: fn(cpu_module()[0], *args)
