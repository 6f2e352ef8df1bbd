"""Philox4x32-10 in plain PyTorch: the spec of the noise every flashdistill kernel draws.

Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011): a 128-bit
counter and a 64-bit key go through 10 rounds of two 32x32 -> 64-bit multiplies (by 0xD2511F53 and
0xCD9E8D57) and xors, the key bumped by (0x9E3779B9, 0xBB67AE85) between rounds. The known-answer
vectors of the authors' Random123 distribution check it (tests/test_rng.py).

Every 32-bit quantity is held in int64 and every product is split into 16-bit halves, so nothing
overflows a signed 64-bit integer and the bits are exact. Slow and clear: the kernels are checked
against it bit for bit. The stream layout (which counter and word feed which element) is in
kernels/rng/__init__.py.
"""

from __future__ import annotations

import math

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and b an int64 tensor of values < 2^32."""
    ah, al = a >> 16, a & 0xFFFF
    p1, p0 = ah * b, al * b                      # < 2^48 each
    s = p1 + (p0 >> 16)                          # a * b = s * 2^16 + (p0 & 0xFFFF), s < 2^49
    return s >> 16, ((s & 0xFFFF) << 16) | (p0 & 0xFFFF)


def philox4x32_10(counter, key):
    """The 4 output words of Philox4x32-10 for counters [..., 4] and keys [..., 2] (int64 tensors
    holding 32-bit values), as an int64 tensor [..., 4]."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for _ in range(10):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return torch.stack([c0, c1, c2, c3], -1)


def stream_words(n: int, seed: int, offset: int, start: int = 0) -> torch.Tensor:
    """The 32-bit words of elements start .. start + n - 1 of stream (seed, offset), as int64 [n]:
    element e takes word e mod 4 of the block with counter (e // 4 as two 32-bit halves, offset as two)
    and key (seed as two halves)."""
    e = torch.arange(start, start + n, dtype=torch.int64)
    b = e // 4
    ctr = torch.stack([b & MASK, b >> 32, torch.full_like(b, offset & MASK), torch.full_like(b, (offset >> 32) & MASK)],
                      -1)
    key = torch.tensor([seed & MASK, (seed >> 32) & MASK], dtype=torch.int64).expand(n, 2)
    return philox4x32_10(ctr, key).gather(-1, (e % 4).unsqueeze(-1)).squeeze(-1)


def uniform(words: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """u = (word >> 8) 2^-24 in [0, 1): 24 random bits, exact in float32."""
    return (words >> 8).to(dtype) * 2.0**-24


def normal(n: int, seed: int, offset: int, start: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Box-Muller on each block's word pairs (w0, w1), (w2, w3): u1 = ((w_even >> 8) + 1) 2^-24 in
    (0, 1], u2 = (w_odd >> 8) 2^-24, r = sqrt(-2 log u1); the even element gets r cos(2 pi u2), the
    odd one r sin(2 pi u2). Computed in ``dtype``."""
    lo = start - start % 2
    words = stream_words(n + (start - lo) + 1, seed, offset, lo)
    e = torch.arange(start, start + n, dtype=torch.int64)
    even = words[(e - e % 2) - lo]
    odd = words[(e - e % 2) + 1 - lo]
    u1 = ((even >> 8) + 1).to(dtype) * 2.0**-24
    u2 = (odd >> 8).to(dtype) * 2.0**-24
    r = torch.sqrt(-2.0 * torch.log(u1))
    th = 2.0 * math.pi * u2
    return torch.where(e % 2 == 0, r * torch.cos(th), r * torch.sin(th))
