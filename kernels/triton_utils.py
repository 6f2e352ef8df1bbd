"""Device helpers shared by the Triton kernels of every op (the Triton twin of csrc's common.h).

They keep one definition of the rounding rules all backends share: IEEE division, torch.nan_to_num's
defaults in the compute type, and round-to-nearest-even stores (also under TRITON_INTERPRET=1, whose
plain fp32 -> bf16 cast truncates).
"""

import triton
import triton.language as tl


@triton.jit
def div_rn(a, b, COMPUTE_DTYPE: tl.constexpr):
    """IEEE round-to-nearest division in the compute type."""
    if COMPUTE_DTYPE == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def nan_to_num(v, COMPUTE_DTYPE: tl.constexpr):
    """torch.nan_to_num with its defaults: NaN -> 0, +-inf -> +-(largest finite of the compute type)."""
    if COMPUTE_DTYPE == tl.float64:
        big = tl.full([], 1.7976931348623157e308, tl.float64)
    else:
        big = tl.full([], 3.4028234663852886e38, tl.float32)
    v = tl.where(v != v, 0.0, v)
    v = tl.where(v > big, big, v)
    v = tl.where(v < -big, -big, v)
    return v


@triton.jit
def round_to(g, OUT_DTYPE: tl.constexpr):
    """g rounded to the output dtype, round to nearest even; g must not be NaN (finite or +-inf).

    bfloat16 is rounded by hand on the bit pattern (as csrc's to_bf16 does): the same result as the
    GPU's cvt.rn.bf16.f32, and it keeps TRITON_INTERPRET=1 exact too (the interpreter's plain fp32 ->
    bf16 cast truncates, e.g. FLT_MAX -> bf16 max instead of inf). No int32 overflow: finite |g|
    has bits <= 0x7f7fffff, and adding at most 0x8000 stays below 2^31.
    """
    if OUT_DTYPE == tl.bfloat16:
        bits = g.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = g.to(OUT_DTYPE)
    return out


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------
