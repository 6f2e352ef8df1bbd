"""What the Triton kernels of every op share (the Triton twin of csrc's common.h).

Device helpers keep one definition of the rounding rules all backends share: IEEE division and square
root, torch.nan_to_num's defaults in the compute type, and round-to-nearest-even stores (also under
TRITON_INTERPRET=1, whose plain fp32 -> bf16 cast truncates); and of the per-sample guidance weight and
the classifier-free-guidance combination. Then the row-reduction kernel, the launch heuristic (one
definition of tile, chunk and grid sizes; a kernel file passes what differs for it) and the launchers'
host helpers (input checks, row slicing for the launches, the device guard).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# Device helpers (rounding rules, guidance)
# ----------------------------------------------------------------------------------------------------

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


@triton.jit
def sqrt_rn(v, COMPUTE_DTYPE: tl.constexpr):
    """IEEE round-to-nearest square root in the compute type (fp64 ``sqrt`` is already correctly rounded)."""
    if COMPUTE_DTYPE == tl.float64:
        s = tl.sqrt(v)
    else:
        s = tl.math.sqrt_rn(v)
    return s


@triton.jit
def round_out(v, OUT_DTYPE: tl.constexpr):
    """v rounded to the output dtype (nearest even) like round_to, but NaN kept (round_to's bf16 path needs no NaN)."""
    if OUT_DTYPE == tl.bfloat16:
        nan = v != v
        out = tl.where(nan, v.to(OUT_DTYPE), round_to(tl.where(nan, 0.0, v), OUT_DTYPE))
    else:
        out = v.to(OUT_DTYPE)
    return out


@triton.jit
def store_rounded(ptrs, v, mask):
    """tl.store of v rounded (round_out: nearest even, NaN kept) to the pointers' element dtype."""
    tl.store(ptrs, round_out(v, ptrs.dtype.element_ty), mask=mask)


@triton.jit
def weight(w_ptr, w_scalar, b, PER_SAMPLE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """w_b in the compute type: w_ptr[b] when per-sample, else the scalar argument."""
    if PER_SAMPLE:
        w = tl.load(w_ptr + b).to(COMPUTE_DTYPE)
    else:
        w = tl.full([], w_scalar, COMPUTE_DTYPE)
    return w


@triton.jit
def cfg(p_row, pu_row, offs, mask, w, HAS_UNCOND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Classifier-free guidance: p_u + w (p - p_u) when guided, else p; loaded and computed in the compute type.

    Inlined wherever a kernel needs a guided prediction, so that every kernel (and every pass of one op)
    forms it with the same operations in the same order.
    """
    p = tl.load(p_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    if HAS_UNCOND:
        pu = tl.load(pu_row + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        p = pu + w * (p - pu)
    return p


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------

@triton.jit
def reduce_rows(
    ws_ptr,                                 # in: [R, n] partials (contiguous)
    out_ptr,                                # out: [R] their sums
    n,
    N_POW2: tl.constexpr,                   # power of two >= n
):
    """Grid (R,): each row of n partials summed in one fixed order (deterministic)."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, N_POW2)
    parts = tl.load(ws_ptr + row * n + i, mask=i < n, other=0.0)
    tl.store(out_ptr + row, tl.sum(parts, axis=0))


def sum_partials(ws: torch.Tensor, out: torch.Tensor, n_rows: int, n: int) -> None:
    """out[r] = sum of ws's row r of n partials, for n_rows contiguous rows (reduce_rows; n <= MAX_CHUNKS)."""
    reduce_rows[(n_rows,)](ws, out, n, N_POW2=triton.next_power_of_2(n),
                         num_warps=NUM_WARPS, enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------------------
# Launch heuristic (static: depends only on B and D; the constants are tuning unless marked otherwise)
# ----------------------------------------------------------------------------------------------------
# Read at call time (tests shrink them to reach the multi-tile, multi-chunk and multi-launch paths).

MAX_BLOCK = 1024        # tuning: elements per tile (8 per thread at 4 warps: 16-byte loads for 16-bit)
MIN_BLOCK = 128         # tuning: one element per thread at 4 warps
NUM_WARPS = 4           # tuning
# enable_fp_fusion=False on every launch: no mul+add contracted into an FMA, so each product and sum
# rounds as in the reference (elementwise results bit-identical to it in float64); free here (memory bound).
TARGET_PROGRAMS = 528   # tuning: ~4 programs per SM on a 132-SM H100, summed over the B rows
MAX_CHUNKS = 1024       # cap on programs per row (reduce_rows holds a row's partials in one tile)
MAX_GRID_Y = 65535      # CUDA limit on gridDim.y (rows per launch); correctness, not tuning


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_size(D: int) -> int:
    """Elements per tile (BLOCK) for rows of D elements: a power of two in [MIN_BLOCK, MAX_BLOCK]."""
    return min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(D)))


def launch_config(B: int, D: int, max_chunks: int | None = None, chunk_per_partial: int = 0) -> tuple[int, int, int]:
    """(BLOCK, chunk_size, n_chunks) of a chunked pass over B rows of D elements (grid (n_chunks, B)).

    chunk_size is a multiple of BLOCK. Enough programs to fill the GPU (TARGET_PROGRAMS over all rows),
    no more, and at most ``max_chunks`` (default MAX_CHUNKS) per row. With ``chunk_per_partial`` = k > 0,
    also chunk_size >= k * n_chunks (for a kernel whose every program re-reads its row's n_chunks partials).
    """
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks
    block = block_size(D)
    tiles = cdiv(D, block)
    tiles_per_chunk = max(cdiv(tiles, cdiv(TARGET_PROGRAMS, B)), cdiv(tiles, max_chunks))
    if chunk_per_partial > 0:
        # tpc * block >= k * tiles / tpc  <=>  tpc^2 >= k * tiles / block
        tiles_per_chunk = max(tiles_per_chunk, math.isqrt(max(cdiv(chunk_per_partial * tiles, block), 1) - 1) + 1)
    n_chunks = cdiv(tiles, tiles_per_chunk)
    return block, tiles_per_chunk * block, n_chunks


def row_batches(B: int):
    """(b0, b1) row ranges of at most MAX_GRID_Y rows, one launch each (more than one only when B > 65535)."""
    for b0 in range(0, B, MAX_GRID_Y):
        yield b0, min(B, b0 + MAX_GRID_Y)


# ----------------------------------------------------------------------------------------------------
# Host helpers of the launchers
# ----------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute type C: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_compute(dtype: torch.dtype):
    """compute_dtype(dtype) as the Triton dtype of the kernels' COMPUTE_DTYPE."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_lead(op: str, name: str, t: torch.Tensor) -> None:
    """The [B, D] input that sets the shape, dtype and device of the others: a 2-D float tensor."""
    if t.dtype not in DTYPES or t.dim() != 2:
        raise ValueError(f"{op} (triton): {name} must be a 2-D float tensor, got {tuple(t.shape)} {t.dtype}")


def check_rows(op: str, name: str, t: torch.Tensor | None, ref_name: str, ref: torch.Tensor) -> None:
    """A [B, D] input (None: absent): like ``ref`` in shape, dtype and device, rows unit-stride."""
    if t is None:
        return
    if t.dim() != 2 or t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{op} (triton): '{name}' must be [B, D] like {ref_name} {tuple(ref.shape)} {ref.dtype} "
                         f"{ref.device}; got {tuple(t.shape)} {t.dtype} {t.device}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{op} (triton): '{name}' rows must be unit-stride (stride(1) == 1); "
                         f"got strides {t.stride()}")


def check_per_sample(op: str, name: str, t: torch.Tensor | None, shape: tuple, cdt: torch.dtype, device) -> None:
    """A per-sample tensor (None: absent): contiguous, of ``shape``, of the compute dtype, on ``device``."""
    if t is None:
        return
    if t.shape != shape or t.dtype != cdt or t.device != device or not t.is_contiguous():
        raise ValueError(f"{op} (triton): '{name}' must be a contiguous {list(shape)} tensor of {cdt} "
                         f"on {device}; got {tuple(t.shape)} {t.dtype} {t.device} strides {t.stride()}")


def rows(t: torch.Tensor | None, b0: int, b1: int, dummy: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows b0:b1, batch stride) of a [B, D] input; absent -> (dummy, 0), a pointer never read."""
    return (t[b0:b1], t.stride(0)) if t is not None else (dummy, 0)


def vec(t: torch.Tensor | None, b0: int, b1: int, dummy: torch.Tensor) -> torch.Tensor:
    """Samples b0:b1 of a per-sample tensor; absent -> dummy, a pointer never read."""
    return t[b0:b1] if t is not None else dummy


def device_guard(t: torch.Tensor):
    """The launches' device context: t's CUDA device (Triton launches on the current one), else none."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
