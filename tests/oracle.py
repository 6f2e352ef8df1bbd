"""The comparison harness every op's tests use.

The oracle is the op's reference run in float64 on the same inputs (upcast after rounding to the
test dtype, so only the kernel's arithmetic is judged). The error budget of a backend comes from the
reference's own error in the input dtype, flash-attention style:

    |kernel - oracle|  <=  2 * max|reference_in_dtype - oracle|  +  floor * |oracle|
    floor = u * (4 + 4 * sqrt(n_reduce))

with u the unit roundoff of the output dtype: four roundings (a kernel may round once more than the
reference, e.g. when it stores an intermediate in the input dtype) plus the typical growth of a sum of
``n_reduce`` terms, whose order differs between backends. The floor matters where the reference's
error says nothing, e.g. in float64, where the reference is the oracle. The failure message states
the budget and lists the worst elements.
"""

from __future__ import annotations

import os

import torch

from flashdistill.kernels import available_backends

# Unit roundoff of each dtype (half an ulp at 1.0).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Budget floor in units of roundoff: extra roundings, plus FLOOR_SUM_UNITS * sqrt(terms) for sums.
FLOOR_UNITS = 4.0
FLOOR_SUM_UNITS = 4.0


def backends_under_test(device: str = "cpu") -> list[str]:
    """Every backend usable here, the reference included (it must honour the op contract too)."""
    names = available_backends(device)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        names = [n for n in names if n != "triton"]
    return names


def randn(shape, dtype, device="cpu", *, generator: torch.Generator, scale: float = 1.0, shift: float = 0.0):
    """Fresh normal values rounded to ``dtype`` (never zeros: N(shift, scale^2) in float64 first)."""
    t = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    return t.to(dtype).to(device)


def as_oracle(t):
    """float64 copy of a tensor (or None) for the oracle."""
    return None if t is None else t.detach().to(torch.float64)


def assert_within_budget(what: str, out: torch.Tensor, oracle: torch.Tensor, ref: torch.Tensor,
                         dtype: torch.dtype, *, n_reduce: int = 1, cancels: bool = False,
                         magnitude: float = 0.0) -> None:
    """``out`` (a backend) and ``ref`` (the reference in ``dtype``) against the float64 ``oracle``.

    ``n_reduce``: length of the longest sum each output element depends on (see the module docstring).
    ``cancels``: an element is a difference of per-sample-scaled terms (e.g. SIM's P u + Q y), each up
    to a few times the largest output, so its rounding error scales with 4 max|oracle|, not with its
    own magnitude.
    ``magnitude``: for a sum whose terms cancel, the sum of the terms' magnitudes (used when larger
    than |oracle|).
    """
    out64, oracle64, ref64 = (t.detach().to(torch.float64).cpu().reshape(-1) for t in (out, oracle, ref))
    assert out64.shape == oracle64.shape, f"{what}: shape {tuple(out.shape)} != oracle {tuple(oracle.shape)}"
    nan_out, nan_oracle = torch.isnan(out64), torch.isnan(oracle64)
    assert torch.equal(nan_out, nan_oracle), (
        f"{what}: NaN pattern differs ({int(nan_out.sum())} NaN in output vs {int(nan_oracle.sum())} in the "
        f"oracle; first mismatch at flat index {int((nan_out ^ nan_oracle).nonzero()[0])}); "
        f"NaN in the output can be a poisoned element the kernel never wrote")
    fin = torch.isfinite(oracle64)
    assert torch.equal(out64[~fin & ~nan_oracle], oracle64[~fin & ~nan_oracle]), f"{what}: infinities differ"
    o, r, k = oracle64[fin], ref64[fin], out64[fin]
    ref_err = (r - o).abs().max().item() if o.numel() else 0.0
    floor_units = FLOOR_UNITS + FLOOR_SUM_UNITS * n_reduce**0.5
    floor = floor_units * UNIT_ROUNDOFF[dtype]
    scale = 4.0 * o.abs().max() if cancels and o.numel() else o.abs()
    budget = 2.0 * ref_err + floor * torch.clamp(scale, min=magnitude).expand_as(o)
    err = (k - o).abs()
    bad = err > budget
    if bool(bad.any()):
        worst = torch.argsort(err - budget, descending=True)[:5]
        rows = "\n".join(f"    [{int(i)}] got {k[i].item():.9g}  oracle {o[i].item():.9g}  "
                         f"err {err[i].item():.3g}  budget {budget[i].item():.3g}" for i in worst)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {o.numel()} elements over budget "
            f"(2 x reference error {ref_err:.3g} + {floor_units:.3g} x roundoff({dtype}) x |oracle|):\n{rows}")
