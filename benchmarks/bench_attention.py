"""Attention and attention_kd_loss (issue #6): flashdistill vs SDPA (its default and math backends) and
torch.compile of the plain formula, forward and forward + backward.

Cases (``--cases``, comma list), on [B, H, N, D] q, k, v (self-attention, Lq = Lk = N):

    fwd         out = attention(q, k, v)                        FLOPs 4 B H N^2 D (halved if causal)
    fwdbwd      out, then out.backward(dout)                    FLOPs 3.5 x fwd (the backward counted
                                                                as 2.5 x fwd, FlashAttention-2's rule)
    kd          attention_kd_loss(q_s, k_s, q_t, k_t), the      FLOPs 2 B H N^2 (Ds + Dt) (2 GEMMs)
                teacher with head dim Dt = D (same model size)
    kdbwd       kd, then loss.backward() (to q_s, k_s)          FLOPs + 2 B H N^2 (Dt + 3 Ds)

impls, in the same run on the same inputs:
    eager               F.scaled_dot_product_attention with torch's choice of kernel (its flash kernel
                        on the CPU for these shapes; flash / cuDNN / efficient on CUDA); for kd the
                        materialized formula (two [N, N] log-softmaxes and the KL sum, what users write)
    sdpa:math           SDPA forced to its math backend (torch.nn.attention.sdpa_kernel(MATH))
    compile             torch.compile of the plain formula softmax(q k^T scale) v (kd: of the eager kd)
    flashdistill:NAME   fd.attention / fd.attention_kd_loss with backend=NAME

Bytes model (the floor): q, k, v read and out written once (fwd); + dout, out read, dq, dk, dv written
(bwd); attention is compute-bound, so the summary reports TFLOP/s (GFLOP/s on the CPU), which is the
number to compare.

--memory (CPU: peak RSS of one fwd+bwd step beyond its inputs, in a fresh process; CUDA: the
allocator's peak) for N = 1024, 2048, 4096: flashdistill's grows linearly in N (O(N) statistics), the
math path's quadratically.

Shapes: CPU: 2x8x1024x64 (issue #6's CPU target: fwd+bwd >= 1.0x SDPA) and 1x8x2048x64, 2x8x1024x128;
CUDA (bf16): N = 512 ... 16k with B N = 16k tokens, H D = 2048 (FlashAttention-2's setting), D 64, 128.
    python benchmarks/bench_attention.py                          # CPU defaults, ~3 min
    python benchmarks/bench_attention.py --quick --check          # 1x4x256x64, < 1 min
    python benchmarks/bench_attention.py --cases fwdbwd --shapes 2x8x1024x64 --no-compile --memory
"""

from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "attention"
CASES = ("fwd", "fwdbwd", "kd", "kdbwd")
CPU_SHAPES = [(2, 8, 1024, 64), (1, 8, 2048, 64), (2, 8, 1024, 128)]
QUICK_SHAPES = [(1, 4, 256, 64)]
GPU_SHAPES = [(16384 // n, 2048 // d, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192, 16384)]
MEMORY_N = (1024, 2048, 4096)


def log(msg: str) -> None:
    harness.log(f"[{NAME}] {msg}")


def import_flashdistill():
    return harness.import_flashdistill("bench_attention")


# ----------------------------------------------------------------------------------------------------
# the impls

def math_attention(q, k, v, causal):
    """The plain formula (what torch.compile gets): [N, N] scores, softmax, times v."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def sdpa_math(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def kd_eager(qs, ks, qt, kt, causal):
    """KL(teacher || student) per row, materialized, averaged: what a user writes."""
    s = torch.matmul(qs, ks.transpose(-1, -2)).float() * qs.shape[-1] ** -0.5
    t = torch.matmul(qt, kt.transpose(-1, -2)).float() * qt.shape[-1] ** -0.5
    if causal:
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1)
        s, t = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1).mean()


def make_impls(fd, case: str, backends: list[str], compile: bool) -> dict[str, Callable]:
    if case in ("fwd", "fwdbwd"):
        impls = {"eager": sdpa, "sdpa:math": sdpa_math}
        if compile:
            impls["compile"] = torch.compile(math_attention, dynamic=False)
        for b in backends:
            impls[f"flashdistill:{b}"] = functools.partial(
                lambda q, k, v, causal, b: fd.attention(q, k, v, causal=causal, backend=b), b=b)
    else:
        impls = {"eager": kd_eager}
        if compile:
            impls["compile"] = torch.compile(kd_eager, dynamic=False)
        for b in backends:
            impls[f"flashdistill:{b}"] = functools.partial(
                lambda qs, ks, qt, kt, causal, b: fd.attention_kd_loss(qs, ks, qt, kt, causal=causal, backend=b), b=b)
    return impls


def make_step(fn: Callable, case: str, causal: bool) -> Callable:
    if case == "fwd":
        def step(q, k, v, dout):
            with torch.no_grad():
                fn(q, k, v, causal)
    elif case == "fwdbwd":
        def step(q, k, v, dout):
            fn(q, k, v, causal).backward(dout)
    elif case == "kd":
        def step(qs, ks, qt, kt):
            with torch.no_grad():
                fn(qs, ks, qt, kt, causal)
    else:
        def step(qs, ks, qt, kt):
            fn(qs, ks, qt, kt, causal).backward()
    return step


def reset_grads(*args):
    for a in args:
        if a.requires_grad:
            a.grad = None


def make_inputs(case: str, shape, dtype, device, gen) -> tuple:
    B, H, N, D = shape
    grad = case in ("fwdbwd", "kdbwd")
    r = lambda *s: torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    if case in ("fwd", "fwdbwd"):
        return (r(B, H, N, D).requires_grad_(grad), r(B, H, N, D).requires_grad_(grad),
                r(B, H, N, D).requires_grad_(grad), r(B, H, N, D))
    return r(B, H, N, D).requires_grad_(grad), r(B, H, N, D).requires_grad_(grad), r(B, H, N, D), r(B, H, N, D)


def flops(case: str, shape, causal: bool) -> float:
    B, H, N, D = shape
    f = 4.0 * B * H * N * N * D * (0.5 if causal else 1.0)  # one forward; kd's (Ds + Dt) = 2 D gives the same
    return {"fwd": f, "fwdbwd": 3.5 * f, "kd": f, "kdbwd": 3.0 * f}[case]  # kd bwd: 2 (Dt + 3 Ds) = 8 D


def nbytes(case: str, shape, es: int) -> int:
    B, H, N, D = shape
    t = B * H * N * D * es
    return {"fwd": 4 * t, "fwdbwd": 11 * t, "kd": 4 * t, "kdbwd": 10 * t}[case]


# ----------------------------------------------------------------------------------------------------
# --memory: peak of one fwd+bwd step, N = 1024 ... 4096

def _peak_build(impl: str, shape, causal: bool, dtype_name: str, device: str):
    """(step, inputs, reset) of one impl's fwd+bwd step: run in harness.peak_cpu's child process, or
    here for harness.peak_cuda."""
    fd = import_flashdistill()
    backends = [impl.removeprefix("flashdistill:")] if impl.startswith("flashdistill:") else []
    fn = make_impls(fd, "fwdbwd", backends, compile=False)[impl]
    dtype = getattr(torch, dtype_name)
    args = make_inputs("fwdbwd", shape, dtype, torch.device(device), torch.Generator(device=device).manual_seed(0))
    return make_step(fn, "fwdbwd", causal), args, reset_grads


def memory_table(backends, dtype, device, causal, base_shape) -> str:
    B, H, _, D = base_shape
    rows = ["| N | " + " | ".join(["eager (sdpa)", "sdpa:math"] + [f"flashdistill:{b}" for b in backends]) + " |",
            "|---:|" + "---:|" * (2 + len(backends))]
    for n in MEMORY_N:
        shape = (B, H, n, D)
        cells = []
        for impl in ["eager", "sdpa:math"] + [f"flashdistill:{b}" for b in backends]:
            build = (impl, shape, causal, str(dtype).split(".")[-1], str(device))
            try:
                if device.type == "cuda":
                    peak = harness.peak_cuda(*_peak_build(*build), device)
                else:
                    peak, _ = harness.peak_cpu(_peak_build, *build)
                cells.append(f"{peak / 2**20:.1f} MiB")
            except Exception as e:  # noqa: BLE001
                cells.append(f"failed ({type(e).__name__})")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
        log(rows[-1])
    return (f"### attention: peak memory of one fwd+bwd step beyond its inputs (B={B}, H={H}, D={D}, "
            f"{'causal' if causal else 'non-causal'}, {harness.dtype_name(dtype)})\n\n" + "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--cases", default=None, help="comma list of fwd, fwdbwd, kd, kdbwd (default: all)")
    parser.add_argument("--shapes", default=None, help="comma list of BxHxNxD (default: see the docstring)")
    parser.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    parser.add_argument("--check", action="store_true", help="compare every impl with the float64 math path first")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory for N = 1024, 2048, 4096")
    cfg = harness.parse_config(parser)
    a = cfg.args
    fd = import_flashdistill()
    device, dtype = cfg.device, cfg.dtype_or(cpu=torch.float32, cuda=torch.bfloat16)
    cases = [c.strip() for c in a.cases.split(",")] if a.cases else list(CASES)
    if bad := [c for c in cases if c not in CASES]:
        raise SystemExit(f"bench_attention: unknown --cases {', '.join(bad)}; choose from {', '.join(CASES)}")
    if a.shapes:
        shapes = harness.parse_shapes(a.shapes)
    else:
        shapes = QUICK_SHAPES if cfg.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    backends = harness.choose_backends(fd, cfg, NAME)
    # one compiled graph per (case, shape, grad mode) of the same two functions: past dynamo's default
    # limit of 8 it silently runs them eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    bench = harness.Bench(NAME, cfg)
    gen = torch.Generator(device=device).manual_seed(0)
    summary = []
    for shape in shapes:
        for case in cases:
            label = f"{'x'.join(map(str, shape))} {case}{' causal' if a.causal else ''}"
            impls = make_impls(fd, case, backends, cfg.compile)
            es = torch.empty((), dtype=dtype).element_size()
            base = make_inputs(case, shape, dtype, device, gen)
            factory = lambda base=base: tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in base)  # noqa: E731
            inputs = bench.make_inputs(factory, sum(t.numel() for t in base) * es * 2)
            first = inputs.first()
            notes = {"compile": bench.first_call(label, impls,
                                                 lambda fn: make_step(fn, case, a.causal)(*first),
                                                 reset=lambda: reset_grads(*first))}
            if a.check:
                args64 = [harness.as_float64(t).detach().requires_grad_(t.requires_grad) for t in first]

                def outputs(fn, args):
                    args = [t.detach().clone().requires_grad_(t.requires_grad) for t in args]
                    if case in ("fwd", "fwdbwd"):
                        out = fn(*args[:3], a.causal)
                        if case == "fwd":
                            return [out.double()]
                        out.backward(args[3])
                        return [out.double()] + [t.grad.double() for t in args[:3]]
                    loss = fn(*args, a.causal)
                    if case == "kd":
                        return [loss.double()]
                    loss.backward()
                    return [loss.double()] + [t.grad.double() for t in args[:2]]

                ref_fn = math_attention if case in ("fwd", "fwdbwd") else kd_eager
                names = ["out", "dq", "dk", "dv"] if case in ("fwd", "fwdbwd") else ["loss", "dq_s", "dk_s"]
                ref64 = outputs(ref_fn, args64)
                failed = harness.check_impls(bench, label, dtype, impls, lambda fn: outputs(fn, first), ref64,
                                             names[:len(ref64)])
                for name in failed:
                    del impls[name]
            step_reset = reset_grads if case in ("fwdbwd", "kdbwd") else None
            for name, fn in impls.items():
                rows = bench.time(case=label, dtype=dtype, impl=name, fn=make_step(fn, case, a.causal), inputs=inputs,
                                  nbytes=nbytes(case, shape, es), setup=step_reset, note=notes.get(name, ""))
                for r in rows:
                    work = flops(case, shape, a.causal)
                    r.note = f"{r.note}; flops={work:.6g}" if r.note else f"flops={work:.6g}"  # read by bench_report
                    summary.append((label, name, r.median_ms, work / (r.median_ms * 1e-3)))
            del inputs, base
            gc.collect()
    bench.finish()
    unit, div = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    print(f"### attention: compute rate ({unit}; FLOPs as in the docstring) and time vs eager (SDPA)\n")
    print(f"| case | impl | median ms | {unit} | eager / impl |\n|---|---|---:|---:|---:|")
    eager = {lab: ms for lab, n, ms, _ in summary if n == "eager"}
    for lab, n, ms, rate in summary:
        print(f"| {lab} | {n} | {harness.fmt(ms)} | {rate / div:.1f} | {harness.fmt(eager[lab] / ms) if lab in eager else '-'} |")
    if a.memory:
        print()
        print(memory_table(backends, dtype, device, a.causal, shapes[0]))
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
