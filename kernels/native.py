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
