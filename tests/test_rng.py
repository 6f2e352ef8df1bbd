"""The Philox4x32-10 noise stream: the spec against the published known answers, every backend against
the spec (bits and uniforms exactly, normals within rounding), the stream layout (start shards,
offsets as substreams), the device-side NoiseSource, distribution checks, the op contract, bad input.

Distribution checks run with fixed seeds, so they are deterministic; their thresholds are set so that
a fresh random seed would fail them with probability below 1e-6 each (5 sigma for the moments, the
Kolmogorov-Smirnov critical value at alpha = 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

import flashdistill as fd
from flashdistill.kernels import rng
from flashdistill.kernels.rng import reference
from oracle import backends_under_test

BACKENDS = [b for b in backends_under_test("cpu") if b in rng.IMPLEMENTED]
FAST = [b for b in BACKENDS if b != "reference"]

# Random123's known-answer vectors for Philox4x32-10 (counter, key, output), from the authors'
# distribution accompanying Salmon et al. (SC 2011)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# (n, seed, offset, start): odd sizes, a start inside a block, 64-bit seeds / offsets / starts
STREAMS = [(1, 0, 0, 0), (7, 1, 0, 3), (1001, 7, 3, 5), (64, 2**62 + 5, 2**40 + 7, 2**33 + 1)]


@pytest.mark.parametrize("ctr,key,out", KAT)
def test_spec_known_answers(ctr, key, out):
    got = reference.philox4x32_10(torch.tensor(ctr), torch.tensor(key))
    assert got.tolist() == list(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_block_is_the_zero_vector(backend):
    """seed 0, offset 0, elements 0..3: counter (0, 0, 0, 0), key (0, 0), the first known answer."""
    assert fd.philox_bits(4, seed=0, backend=backend).tolist() == list(KAT[0][2])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_bits_and_uniforms_equal_the_spec(backend, stream):
    n, seed, offset, start = stream
    kw = dict(seed=seed, offset=offset, start=start)
    assert torch.equal(fd.philox_bits(n, backend=backend, **kw), fd.philox_bits(n, backend="reference", **kw))
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        u = fd.rand(n, dtype=dtype, backend=backend, **kw)
        assert u.dtype == dtype
        assert torch.equal(u, fd.rand(n, dtype=dtype, backend="reference", **kw)), dtype


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_normals_equal_the_spec_within_rounding(backend, stream):
    n, seed, offset, start = stream
    kw = dict(seed=seed, offset=offset, start=start)
    spec = reference.normal(n, seed, offset, start, torch.float64)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-14), (torch.bfloat16, 2**-8)):
        got = fd.randn(n, dtype=dtype, backend=backend, **kw)
        assert got.dtype == dtype
        err = ((got.double() - spec).abs() / spec.abs().clamp(min=1.0)).max().item()
        assert err <= tol, (dtype, err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_shards_the_stream(backend):
    """A shard [a, b) drawn with start = a equals the same slice of the whole draw."""
    whole = fd.randn(103, seed=11, offset=2, backend=backend)
    for a, b in ((0, 1), (3, 50), (50, 103), (1, 2)):
        torch.testing.assert_close(fd.randn(b - a, seed=11, offset=2, start=a, backend=backend), whole[a:b],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_source_advances_on_the_device(backend):
    src = fd.NoiseSource(seed=5)
    a = src.randn((4, 6), backend=backend)
    b = src.randn((4, 6), backend=backend)
    assert int(src.offset) == 2 and not torch.equal(a, b)
    torch.testing.assert_close(a, fd.randn((4, 6), seed=5, offset=0, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(b, fd.randn((4, 6), seed=5, offset=1, backend=backend), rtol=0, atol=0)
    src.offset.fill_(0)  # rewinding reproduces
    torch.testing.assert_close(src.randn((4, 6), backend=backend), a, rtol=0, atol=0)


def _ks_statistic(x: torch.Tensor, cdf) -> float:
    x, _ = x.double().sort()
    n = x.numel()
    F = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - F).max().item(), (F - (i - 1) / n).max().item())


@pytest.mark.parametrize("backend", ["cpu"] if "cpu" in BACKENDS else BACKENDS)
def test_distributions(backend):
    n = 200_000
    ks_crit = math.sqrt(-math.log(1e-6 / 2) / 2) / math.sqrt(n)  # KS at alpha = 1e-6
    z = fd.randn(n, seed=2024, offset=9, backend=backend, dtype=torch.float64)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert _ks_statistic(z, lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))) < ks_crit
    u = fd.rand(n, seed=2024, offset=10, backend=backend, dtype=torch.float64)
    assert u.min().item() >= 0 and u.max().item() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert _ks_statistic(u, lambda x: x) < ks_crit
    # neighbouring substreams and seeds are uncorrelated
    for other in (fd.randn(n, seed=2024, offset=10, backend=backend, dtype=torch.float64),
                  fd.randn(n, seed=2025, offset=9, backend=backend, dtype=torch.float64)):
        assert abs(torch.dot(z, other).item() / n) < 5 / math.sqrt(n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_and_compile(backend):
    off = torch.tensor(3)
    torch.library.opcheck(torch.ops.flashdistill.philox_fill.default, (17, 9, off, 2, 2, torch.float32, backend))

    def draw(offset):
        return fd.randn((3, 5), seed=9, offset=offset, backend=backend)

    torch.testing.assert_close(torch.compile(draw, fullgraph=True, backend="aot_eager")(off), draw(off),
                               rtol=0, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda: fd.randn(3, seed=-1), r"philox: seed must be an int in \[0, 2\^63\)"),
    (lambda: fd.randn(3, seed=2**63), r"philox: seed must be an int in \[0, 2\^63\)"),
    (lambda: fd.randn(3, seed=1, offset=-2), r"philox: offset must be an int in \[0, 2\^63\) or a tensor"),
    (lambda: fd.randn(3, seed=1, offset=torch.tensor(1.0)), r"philox: offset must be an int or a 0-d int64 tensor"),
    (lambda: fd.randn(3, seed=1, start=-1), r"philox: start must be an int in \[0, 2\^62\)"),
    (lambda: fd.randn(3, seed=1, dtype=torch.int32), r"philox: dtype must be one of"),
    (lambda: fd.randn(3, seed=1, backend="cuda"), r"philox: backend 'cuda' cannot run on cpu tensors"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("stream", STREAMS + [(1_000_003, 3, 1, 0)], ids=str)
def test_gpu_streams_equal_the_spec(backend, stream):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, seed, offset, start = stream
    kw = dict(seed=seed, offset=torch.tensor(offset, device="cuda"), start=start)
    ref = dict(seed=seed, offset=offset, start=start)
    assert torch.equal(fd.philox_bits(n, backend=backend, **kw).cpu(), fd.philox_bits(n, backend="cpu", **ref))
    assert torch.equal(fd.rand(n, backend=backend, **kw).cpu(), fd.rand(n, backend="cpu", **ref))
    torch.testing.assert_close(fd.randn(n, backend=backend, **kw).cpu(), fd.randn(n, backend="cpu", **ref),
                               rtol=2e-6, atol=2e-6)


def _guarded_fill_tail(backend, device, kind, n, start, monkeypatch):
    """The fill's output as the head of a sentinel-filled buffer: returns what lies past its end."""
    guard, bufs = 64, []

    def guarded(n_, kind_, dtype, dev):
        buf = torch.full((n_ + guard,), 7, dtype=torch.int64 if kind_ == rng.KINDS["bits"] else dtype, device=dev)
        bufs.append(buf)
        return buf[:n_]

    monkeypatch.setattr(rng, "_out", guarded)
    fn = {"bits": fd.philox_bits, "uniform": fd.rand, "normal": fd.randn}[kind]
    fn(n, seed=3, offset=torch.tensor(2, device=device), start=start, backend=backend)
    assert len(bufs) == 1
    return bufs[0][n:].cpu()


CUTS = [(5, 0), (1, 3), (7, 1), (130, 1), (128, 2)]  # start + n not a multiple of the 4-word block


@pytest.mark.parametrize("backend", [b for b in FAST if b in ("cpu", "triton")])
@pytest.mark.parametrize("kind", ["bits", "uniform", "normal"])
@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_fill_writes_nothing_past_its_end(backend, kind, cut, monkeypatch):
    """A Philox block holds 4 words; a fill that ends inside one must not store the rest (the CUDA
    kernel once compared against a shadowed name and wrote up to 3 words past the output)."""
    assert (_guarded_fill_tail(backend, "cpu", kind, *cut, monkeypatch) == 7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["bits", "uniform", "normal"])
@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_gpu_fill_writes_nothing_past_its_end(backend, kind, cut, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    assert (_guarded_fill_tail(backend, "cuda", kind, *cut, monkeypatch) == 7).all()
