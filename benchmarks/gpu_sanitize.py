"""Small CUDA launches of the hand-written CUDA kernels, to run under compute-sanitizer (racecheck,
synccheck, memcheck) in a GPU session (benchmarks/gpu_session.sh): attention forward, backward and the
attention-map KD, fp16 / bf16 / fp32, odd lengths, causal and GQA; a sampler step and a DMD loss. Each
result is compared with the reference so a silent wrong answer is caught too. Exit status 1 on a mismatch."""

from __future__ import annotations

import sys

import torch

import flashdistill as fd


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device; nothing to do")
        return 0
    dev, bad = "cuda", 0
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (B, Hq, Hk, L, D, causal) in ((1, 2, 2, 97, 64, False), (2, 4, 2, 33, 128, True), (1, 1, 1, 1, 32, False)):
            q = torch.randn(B, Hq, L, D, device=dev, dtype=dtype, generator=g, requires_grad=True)
            k = torch.randn(B, Hk, L, D, device=dev, dtype=dtype, generator=g, requires_grad=True)
            v = torch.randn(B, Hk, L, D, device=dev, dtype=dtype, generator=g, requires_grad=True)
            out = fd.attention(q, k, v, causal=causal, backend="cuda")
            out.float().square().sum().backward()
            grads = [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
            ref = fd.attention(q, k, v, causal=causal, backend="reference")
            ref.float().square().sum().backward()
            tol = 2e-2 if dtype != torch.float32 else 1e-4
            errs = [(out.float() - ref.float()).abs().max().item()] + [
                (a.float() - t.grad.float()).abs().max().item() / max(t.grad.float().abs().max().item(), 1.0)
                for a, t in zip(grads, (q, k, v))]
            ok = max(errs) < tol
            bad += not ok
            print(f"attention {dtype} B{B} Hq{Hq} Hk{Hk} L{L} D{D} causal={causal}: max err {max(errs):.2e} "
                  f"{'ok' if ok else 'MISMATCH'}")
            qs = q.detach().requires_grad_(True)
            ks = k.detach().requires_grad_(True)
            kd = fd.attention_kd_loss(qs, ks, q.detach(), k.detach(), backend="cuda")
            kd.backward()
            kd_ref = fd.attention_kd_loss(q.detach(), k.detach(), q.detach(), k.detach(), backend="reference")
            print(f"attention_kd_loss {dtype} L{L} D{D}: {kd.item():.3e} (self-distillation: ~0, reference "
                  f"{kd_ref.item():.3e})")
    x, p = (torch.randn(3, 4, 9, 7, device=dev, generator=g) for _ in range(2))
    sig = torch.tensor([2.0, 1.0, 0.5], device=dev, dtype=torch.float64)
    step = fd.euler_step(p, x, sig, sig / 2, backend="cuda")
    ref = fd.euler_step(p, x, sig, sig / 2, backend="reference")
    ok = torch.allclose(step, ref, rtol=1e-5, atol=1e-5)
    bad += not ok
    print(f"euler_step cuda: {'ok' if ok else 'MISMATCH'}")
    xg = torch.randn(3, 4, 9, 7, device=dev, generator=g, requires_grad=True)
    real, fake = (torch.randn(3, 4, 9, 7, device=dev, generator=g) for _ in range(2))
    fd.dmd_loss(xg, real, fake, backend="cuda").backward()
    gc = xg.grad.clone()
    xg.grad = None
    fd.dmd_loss(xg, real, fake, backend="reference").backward()
    ok = torch.allclose(gc, xg.grad, rtol=1e-5, atol=1e-6)
    bad += not ok
    print(f"dmd_loss cuda backward: {'ok' if ok else 'MISMATCH'}")
    torch.cuda.synchronize()
    print(f"gpu_sanitize: {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
