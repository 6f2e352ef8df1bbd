"""Triton twin of csrc/cpu/rng.cpp: the Philox4x32-10 stream (include/flashdistill/philox.h has the
layout), each program a tile of BLOCK Philox blocks (4 elements each). Bits equal the spec's
exactly (uint32 arithmetic: tl.umulhi and wrapping products); uniforms exactly; normals within the
rounding of log / sqrt / sin / cos.

Work: ~40 integer ops per block; output only (no reads but the 8-byte offset).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashdistill.kernels import triton_utils

BITS, UNIFORM, NORMAL = 0, 1, 2


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 vectors (the constants of philox.h)."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c1 = a2 * 0xCD9E8D57
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _box_muller(even, odd, C: tl.constexpr):
    u1 = ((even >> 8) + 1).to(C) * (1.0 / 16777216.0)
    u2 = (odd >> 8).to(C) * (1.0 / 16777216.0)
    r = tl.sqrt(-2.0 * tl.log(u1))
    th = 6.283185307179586 * u2
    return r * tl.cos(th), r * tl.sin(th)


# seed words: never specialized (Triton makes an int argument equal to 1 a constant, which has no .to())
@triton.jit(do_not_specialize=["k0_in", "k1_in"])
def _fill_kernel(out_ptr, offset_ptr, n, start, first_block, k0_in, k1_in,
                 KIND: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    blk = first_block + pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    off = tl.load(offset_ptr)
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK], tl.uint32)
    c2 = zero + (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = zero + k0_in.to(tl.uint32)
    k1 = zero + k1_in.to(tl.uint32)
    w0, w1, w2, w3 = _philox(c0, c1, c2, c3, k0, k1)
    if KIND == 2:
        v0, v1 = _box_muller(w0, w1, C)
        v2, v3 = _box_muller(w2, w3, C)
    elif KIND == 1:
        v0 = (w0 >> 8).to(C) * (1.0 / 16777216.0)
        v1 = (w1 >> 8).to(C) * (1.0 / 16777216.0)
        v2 = (w2 >> 8).to(C) * (1.0 / 16777216.0)
        v3 = (w3 >> 8).to(C) * (1.0 / 16777216.0)
    else:
        v0, v1, v2, v3 = w0.to(tl.int64), w1.to(tl.int64), w2.to(tl.int64), w3.to(tl.int64)
    base = blk * 4 - start  # output index of the block's word 0
    _put(out_ptr, base, v0, n, KIND)
    _put(out_ptr, base + 1, v1, n, KIND)
    _put(out_ptr, base + 2, v2, n, KIND)
    _put(out_ptr, base + 3, v3, n, KIND)


@triton.jit
def _put(out_ptr, idx, v, n, KIND: tl.constexpr):
    mask = (idx >= 0) & (idx < n)
    if KIND == 0:
        tl.store(out_ptr + idx, v, mask=mask)
    else:
        triton_utils.store_rounded(out_ptr + idx, v, mask)


def fill(out: torch.Tensor, seed: int, offset: torch.Tensor, start: int, kind: int) -> None:
    """out[i] = element start + i of stream (seed, offset): bits (int64 out), uniform or normal."""
    n = out.numel()
    if n == 0:
        return
    first = start // 4
    n_blocks = (start + n + 3) // 4 - first
    BLOCK = 256
    C = triton_utils.tl_compute(out.dtype) if kind != BITS else tl.float32
    with triton_utils.device_guard(out):
        _fill_kernel[(triton.cdiv(n_blocks, BLOCK),)](out, offset, n, start, first, seed & 0xFFFFFFFF,
                                                        (seed >> 32) & 0xFFFFFFFF, KIND=kind, C=C, BLOCK=BLOCK)
