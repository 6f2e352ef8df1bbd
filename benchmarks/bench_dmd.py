"""DMD generator loss, forward + backward: eager reference vs torch.compile vs flashdistill backends.

One timed run, for x a leaf that requires grad (x.grad set to None before each run, untimed):

    loss = dmd_loss(x, real, fake, real_uncond=real_uncond, guidance=1.75)   # CFG on (default)
    loss.backward()

impls, in the same run and on the same inputs:
    eager               flashdistill.kernels.score_diff.reference.dmd_loss (the plain PyTorch spec)
    compile             torch.compile of that same function (inductor, static shapes; compiled untimed)
    flashdistill:NAME   flashdistill.dmd_loss(..., backend=NAME) for each available backend, except
                        "reference" (that is eager) and "triton" on the CPU (interpreter timings mean
                        nothing) unless asked for with --backends

Bytes model (the floor): the fused op's minimal traffic, read x, real, fake (and real_uncond when
guided) once and write the gradient once: (3 or 4 reads + 1 write) x N x element size.

    python benchmarks/bench_dmd.py                 # CPU: fp32, 3 shapes, ~1-3 min
    python benchmarks/bench_dmd.py --quick --check # smoke test, < 30 s with a warm inductor cache
    python benchmarks/bench_dmd.py --no-cfg --shapes 64x16x64x64
"""

from __future__ import annotations

import functools
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = [(16, 4, 64, 64), (64, 16, 64, 64), (8, 16, 16, 64, 64)]
QUICK_SHAPES = [(16, 4, 64, 64)]
GUIDANCE = 1.75


def import_flashdistill():
    return harness.import_flashdistill("bench_dmd", "flashdistill.kernels.score_diff.reference")


def loss_kwargs(real_uncond, guidance):
    return {} if real_uncond is None else {"real_uncond": real_uncond, "guidance": guidance}


def make_step(loss_fn, guidance):
    def step(x, real, fake, real_uncond):
        loss = loss_fn(x, real, fake, **loss_kwargs(real_uncond, guidance))
        loss.backward()

    return step


def reset_grad(x, *_):
    x.grad = None


def _loss_and_grad(loss_fn, tensors, guidance):
    x, real, fake, unc = tensors
    x = x.detach().clone().requires_grad_()
    loss = loss_fn(x, real, fake, **loss_kwargs(unc, guidance))
    loss.backward()
    return loss.detach().double(), x.grad.double()


def check(bench: harness.Bench, case: str, impls: dict, args: tuple, guidance, dtype: torch.dtype) -> set[str]:
    """harness.check_impls on ``args``: each impl's loss and gradient against the float64 reference
    (eager), within a budget set by eager's error. Returns the impls that failed (recorded in ``bench``,
    not timed)."""
    ref64 = _loss_and_grad(impls["eager"], tuple(map(harness.as_float64, args)), harness.as_float64(guidance))
    return harness.check_impls(bench, case, dtype, impls, lambda fn: _loss_and_grad(fn, args, guidance), ref64,
                               ["loss", "grad"])


def main(argv=None) -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--no-cfg", action="store_true", help="no classifier-free guidance (3 inputs, not 4)")
    parser.add_argument("--per-sample-guidance", action="store_true", help=f"guidance as a [B] tensor of {GUIDANCE}")
    parser.add_argument("--shapes", default=None, help="comma list like 16x4x64x64,8x16x16x64x64 (default: the 3 standard)")
    parser.add_argument("--check", action="store_true", help="assert every impl's loss and grad match the reference first")
    cfg = harness.parse_config(parser, argv)
    a = cfg.args
    fd, reference = import_flashdistill()
    device, dtype = cfg.device, cfg.dtype_or(cpu=torch.float32, cuda=torch.bfloat16)
    shapes = harness.parse_shapes(a.shapes) if a.shapes else (QUICK_SHAPES if cfg.quick else SHAPES)
    backends = harness.choose_backends(fd, cfg, "dmd")
    bench = harness.Bench("dmd", cfg)

    ref = reference.dmd_loss
    impls = {"eager": ref}
    if cfg.compile:
        impls["compile"] = torch.compile(ref, dynamic=False)  # one static graph per shape, like a training run
    for b in backends:
        impls[f"flashdistill:{b}"] = functools.partial(fd.dmd_loss, backend=b)

    guided = not a.no_cfg
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        n, es = torch.Size(shape).numel(), torch.empty((), dtype=dtype).element_size()
        nbytes = ((4 if guided else 3) + 1) * n * es
        if not guided:
            guidance, variant = None, "nocfg"
        elif a.per_sample_guidance:
            gdtype = torch.float64 if dtype == torch.float64 else torch.float32  # the compute dtype
            guidance, variant = torch.full((shape[0],), GUIDANCE, device=device, dtype=gdtype), "cfg=[B]"
        else:
            guidance, variant = GUIDANCE, f"cfg={GUIDANCE}"
        case = "x".join(map(str, shape)) + " " + variant

        def randn():
            return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        base = (randn().requires_grad_(), randn(), randn(), randn() if guided else None)

        def factory(base=base):
            x, *rest = base
            return (x.detach().clone().requires_grad_(), *(None if t is None else t.clone() for t in rest))

        inputs = bench.make_inputs(factory, nbytes)
        harness.log(f"[dmd] {case} {harness.dtype_name(dtype)}: N={n:,}, bytes model {nbytes / 1e6:.1f} MB; {inputs.plan.why}")
        del base

        first = inputs.first()
        notes = {"compile": bench.first_call(case, impls, lambda fn: make_step(fn, guidance)(*first),
                                             reset=lambda: reset_grad(*first))}
        if a.check:
            for name in check(bench, case, impls, inputs.first(), guidance, dtype):
                del impls[name]

        for name, loss_fn in impls.items():
            bench.time(case=case, dtype=dtype, impl=name, fn=make_step(loss_fn, guidance), inputs=inputs,
                       nbytes=nbytes, setup=reset_grad, note=notes.get(name, ""))  # fmt: skip
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    bench.finish()
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
