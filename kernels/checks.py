"""Input validation shared by every op: clear errors that name the op, the argument and what was found.

Nothing is broadcast or cast on the user's behalf: a mismatch is an error, never a silent fix.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels compute and accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(op: str, name: str, t, *, min_dim: int = 0, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """``t`` is a tensor of rank >= min_dim, of one of ``dtypes``, with no zero-sized dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: argument '{name}' has dtype {t.dtype}; supported: {allowed}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: argument '{name}' must have at least {min_dim} dimensions "
                         f"(batch first), got {_desc(t)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: argument '{name}' is empty ({_desc(t)})")
    return t


def like(op: str, name: str, t, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """``t`` has exactly the shape, dtype and device of ``ref`` (no broadcasting, no casting)."""
    tensor(op, name, t)
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{op}: argument '{name}' must match '{ref_name}' in shape, dtype and device "
                         f"(no broadcasting or casting): '{name}' has {_desc(t)}, '{ref_name}' has {_desc(ref)}")
    return t


def per_sample(op: str, name: str, t, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` is a [batch] tensor of ``dtype`` on ``device`` (a per-sample scalar)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a float or a torch.Tensor, got {type(t).__name__}")
    if t.shape != (batch,) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{op}: argument '{name}' must be a per-sample tensor of shape ({batch},), dtype "
                         f"{dtype}, device {device}; got {_desc(t)}")
    return t
