"""Compile every Triton kernel of flashdistill for an NVIDIA GPU target, without a GPU (``make check-triton``).

What it does
------------
The tests run the Triton kernels in the interpreter (TRITON_INTERPRET=1), which never lowers them for a
GPU: errors that only the GPU compile sees (tl.dot shape / dtype rules, constexpr misuse, a layout the
backend rejects, shared memory beyond the chip's limit, register spills) would land unnoticed. This
program compiles every kernel through the real code path, as ``check-cuda`` does with nvcc for the .cu
files:

  1. A fake Triton driver makes the current target an NVIDIA sm_90 (``--arch 90``, H100/H200; ``--arch
     80``: A100), and every launch ``kernel[grid](...)`` becomes a warm-up: Triton specializes, generates
     TTIR -> TTGIR -> LLVM IR -> PTX and runs ptxas, then returns without loading or running anything.
  2. Each op's host launch functions (the ``triton_kernel`` functions the op layer calls) are called with
     small CPU tensors, for every dtype (float32, float16, bfloat16, float64) and the main compile-time
     variants (attention: head dims 32 to 256, causal or not, MHA and GQA; KD: every divergence and top-k
     mode; DMD / SDS, guided or not; ...: build_cases), so the launchers choose block sizes, warps and
     stages exactly as they do for CUDA tensors of those shapes.
  3. Per compiled kernel and configuration it prints warps, pipeline stages, shared memory (Triton's
     metadata), registers and spill bytes (ptxas ``-v``, which Triton runs anyway), and warns on spills.
  4. It walks the kernel modules for every ``@triton.jit`` function and lists those never compiled, as a
     kernel or inlined into one (a helper in a constexpr branch that no variant takes counts as not
     compiled).

It fails (exit status 1) when a kernel does not compile, when a kernel needs more shared memory than the
target has (228 KB per SM, 227 KB per block on sm_90; 163 KB per block on sm_80: the launch would raise
OutOfResources), or when a ``@triton.jit`` function was never compiled (add a case to build_cases that
reaches it). Spills only warn. Exit status 2: this Triton lacks an internal API the program needs (below).

Limits: it compiles, it does not run. Nothing here checks results, speed or occupancy, or that a launch
would not fault (out-of-bounds addresses, grid limits); Triton's host-side launcher stub is never built.
Integer arguments are specialized as for the values used here (e.g. sequence lengths divisible by 16,
unit-stride contiguous tensors; an integer argument equal to 1 is a compile-time constant to Triton, hence
the seed=1 cases); other values compile other specializations, whose register counts may differ a little.
Shared memory is checked against the per-block limit only, not occupancy.

Options: ``--arch 90`` (default) or ``80``; ``--quick``: float32 and bfloat16 only, fewer variants
(still every kernel; ~30 s on 2 cores); default: a covering subset, every dtype for every op, attention
in bfloat16 at every head-dim class and float16 / float32 / float64 at 64 and 128 (~165 compiles, ~100 s
on 2 cores); ``--full``: every dtype x every variant (~490 compiles, ~6 min on 2 cores); ``--jobs N``:
compile processes (default: the CPUs available); ``--traceback``: full tracebacks of failures.
Every kernel is really compiled (a fresh temporary Triton cache, TRITON_ALWAYS_COMPILE; nothing written
to ~/.triton). Must not run under TRITON_INTERPRET=1 (removed from the environment here before Triton
is imported: Triton and the attention module read it at import).

Triton internals it relies on (checked at start; exit 2 with a message if one changed): tested with
triton 3.9.
  - ``triton.runtime.driver.driver.set_active(d)``: the fake driver ``d`` answers
    ``get_current_target()`` (a ``triton.backends.compiler.GPUTarget("cuda", arch, 32)``),
    ``get_current_device()`` and ``get_current_stream(device)``.
  - ``triton.runtime.jit.JITFunction.run(self, *args, grid, warmup, **kwargs)``: replaced by a wrapper
    that calls the original with ``warmup=True`` (compile, no launch) and returns the CompiledKernel
    (``.metadata.num_warps / num_stages / shared``, ``.hash``, ``.name``).
  - ``triton.compiler.code_generator.CodeGenerator.call_JitFunction(self, fn, ...)``: wrapped to record
    which ``@triton.jit`` helpers code generation inlines (coverage).
  - ``triton.knobs``: ``runtime.interpret``, ``nvidia.dump_ptxas_log`` (env TRITON_DUMP_PTXAS_LOG: the
    NVIDIA backend prints ptxas's ``-v`` log, parsed here), ``cache.dir`` (env TRITON_CACHE_DIR) and
    ``compilation.always_compile`` (env TRITON_ALWAYS_COMPILE).
  A three-line kernel is compiled first: if that fails, the message says so instead of one failure per
  kernel.
Patched in the project (the minimum, no kernel code): ``attention.triton_kernel._interpreted`` returns
False, because that launcher picks interpreter-sized tiles for CPU tensors; every other launcher only asks
``t.is_cuda`` for its device guard (``triton_utils.device_guard``), which is a no-op for CPU tensors and
is left alone. Outputs the launchers allocate live on the CPU and are never written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, NamedTuple

# Shared memory per block of the targets (the opt-in maximum, bytes).
ARCHS = {90: dict(name="sm_90 (H100/H200)", max_shared=232448), 80: dict(name="sm_80 (A100)", max_shared=166912)}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


class ApiError(Exception):
    """An internal Triton API this program relies on is missing or changed."""


class Case(NamedTuple):
    op: str                       # the op family (table grouping)
    label: str                    # the configuration, as printed
    run: Callable[[], None]       # calls the host launch functions (compiles, launches nothing)


# ----------------------------------------------------------------------------------------------------
# The fake environment (everything here runs before the kernel modules are imported)
# ----------------------------------------------------------------------------------------------------

class _State:
    """Per-process record of what was compiled (reset by each case in a worker)."""
    case: str = ""
    records: list = []            # one dict per newly compiled kernel
    failures: list = []           # (kernel, config, message)
    covered: set = set()          # qualified names of the jit functions code generation reached
    seen: set = set()             # ids of CompiledKernels already reported in this process


def _qualname(fn) -> str:
    return f"{fn.module}.{fn.fn.__qualname__}"


def install_fake_gpu(arch: int, show_tb: bool):
    """Install the fake driver and the compile-only launch; returns the ptxas path used (for the header)."""
    import importlib
    import inspect

    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import code_generator
        from triton.runtime.jit import JITFunction
        # the module: the name triton.runtime.driver is rebound to its DriverConfig object
        driver_mod = importlib.import_module("triton.runtime.driver")
    except ImportError as e:
        raise ApiError(f"cannot import a Triton internal module: {e}") from e
    checks = [
        (hasattr(driver_mod, "driver") and hasattr(driver_mod.driver, "set_active"),
         "triton.runtime.driver.driver.set_active"),
        (hasattr(code_generator, "CodeGenerator") and hasattr(code_generator.CodeGenerator, "call_JitFunction"),
         "triton.compiler.code_generator.CodeGenerator.call_JitFunction"),
        (hasattr(knobs, "runtime") and hasattr(knobs.runtime, "interpret"), "triton.knobs.runtime.interpret"),
        (hasattr(knobs, "nvidia") and hasattr(knobs.nvidia, "dump_ptxas_log"), "triton.knobs.nvidia.dump_ptxas_log"),
    ]
    params = inspect.signature(JITFunction.run).parameters
    checks.append(([p.kind for p in params.values()][:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                             inspect.Parameter.VAR_POSITIONAL]
                   and all(k in params for k in ("grid", "warmup")),
                   "JITFunction.run(self, *args, grid, warmup, **kwargs)"))
    missing = [name for ok, name in checks if not ok]
    if missing:
        raise ApiError("missing or changed: " + ", ".join(missing))
    if knobs.runtime.interpret:
        raise ApiError("TRITON_INTERPRET is set: unset it (this program compiles for the GPU)")

    class FakeDriver:
        """The minimum of a DriverBase that compilation asks for; nothing can be loaded or launched."""

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch
            return torch.device("cpu")

        def is_active(self):
            return True

    driver_mod.driver.set_active(FakeDriver())

    orig_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        cfg = _config_of(kwargs)
        log = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # reported per kernel below
                kernel = orig_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # noqa: BLE001  (a compile error is a finding: record it, go on)
            _State.failures.append((self.fn.__name__, f"{_State.case}{cfg}", _summary(e, show_tb)))
            return None
        _State.covered.add(_qualname(self))
        if kernel is None or id(kernel) in _State.seen:  # None: a jit cache hook; else compiled before
            return kernel
        _State.seen.add(id(kernel))
        ptxas = _parse_ptxas(log.getvalue())
        md = kernel.metadata
        _State.records.append(dict(
            kernel=self.fn.__name__, config=f"{_State.case}{cfg}", hash=kernel.hash, warps=md.num_warps,
            stages=md.num_stages, shared=md.shared, fp_fusion_default="enable_fp_fusion" not in kwargs,
            seconds=time.perf_counter() - t0, **ptxas))
        return kernel

    JITFunction.run = compile_only

    orig_call = code_generator.CodeGenerator.call_JitFunction

    def recording_call(self, fn, *args, **kwargs):
        if isinstance(fn, JITFunction):
            _State.covered.add(_qualname(fn))
        return orig_call(self, fn, *args, **kwargs)

    code_generator.CodeGenerator.call_JitFunction = recording_call
    _preflight()
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001  (only for the header)
        return "?"


def _preflight():
    """Compile a three-line kernel through the fake GPU: if that fails, Triton's internals changed."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)

    _State.case = "preflight"
    t = torch.zeros(100)
    try:
        _copy[(1,)](t, t, 100, BLOCK=128)
    except Exception as e:  # noqa: BLE001
        raise ApiError(f"the compile of a trivial kernel raised {_summary(e, False)}") from e
    failures, records = _State.failures, _State.records
    _State.records, _State.failures, _State.covered, _State.seen = [], [], set(), set()
    if failures:
        raise ApiError(f"the compile of a trivial kernel failed: {failures[0][2]}")
    if not records:
        raise ApiError("a launch returned no compiled kernel (JITFunction.run no longer compiles on warmup=True?)")
    if records[0]["regs"] is None:
        raise ApiError("no ptxas -v log was printed (TRITON_DUMP_PTXAS_LOG / knobs.nvidia.dump_ptxas_log)")


def _config_of(kwargs) -> str:
    """The tile of a launch, for the config column: BLOCK_MxBLOCK_N or BLOCK (the rest is in the label)."""
    if "BLOCK_M" in kwargs and "BLOCK_N" in kwargs:
        return f" tile {kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
    if "BLOCK" in kwargs:
        return f" B{kwargs['BLOCK']}"
    return ""


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str) -> dict:
    regs, frame = _PTXAS_REGS.search(log), _PTXAS_FRAME.search(log)
    if not regs or not frame:
        return dict(regs=None, stack=None, spill_st=None, spill_ld=None)
    return dict(regs=int(regs.group(1)), stack=int(frame.group(1)), spill_st=int(frame.group(2)),
                spill_ld=int(frame.group(3)))


def _summary(e: BaseException, show_tb: bool) -> str:
    """A compile error in a few lines: Triton's message (source excerpt or ptxas stderr), not the stack."""
    if show_tb:
        return "".join(traceback.format_exception(e)).rstrip()
    lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    cause = e.__cause__
    while cause is not None:  # CompilationError wraps the error of an inlined callee
        lines += [f"caused by {type(cause).__name__}: {ln}" if i == 0 else ln
                  for i, ln in enumerate(str(cause).splitlines()) if ln.strip()]
        cause = cause.__cause__
    if len(lines) > 30:
        lines = lines[:30] + [f"... ({len(lines) - 30} more lines; --traceback for everything)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The cases: each op's host launch functions on small CPU tensors
# ----------------------------------------------------------------------------------------------------

def build_cases(tier: str) -> list[Case]:
    """Cases of ``tier`` ('quick', 'default', 'full'); every tier reaches every jit function."""
    import torch

    from flashdistill.kernels.attention import triton_kernel as attn
    from flashdistill.kernels.grad_scale import triton_kernel as gs
    from flashdistill.kernels.kd import triton_kernel as kd
    from flashdistill.kernels.regression import triton_kernel as reg
    from flashdistill.kernels.rng import triton_kernel as rng
    from flashdistill.kernels.sampling import triton_kernel as smp
    from flashdistill.kernels.score_diff import triton_kernel as sd
    from flashdistill.kernels.score_identity import triton_kernel as si

    # The one patch in the project: CPU tensors would get the interpreter's tiles (see the docstring).
    attn._interpreted = lambda t: False

    full, quick = tier == "full", tier == "quick"
    dts = {n: getattr(torch, n) for n in DTYPE_NAMES}
    all_dt = list(DTYPE_NAMES) if not quick else ["float32", "bfloat16"]
    cases: list[Case] = []

    def add(op, label, fn):
        cases.append(Case(op, label, fn))

    def cd(dt):
        return torch.float64 if dt == torch.float64 else torch.float32

    def z(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)

    # ---- attention: forward, backward (preprocess, dK/dV, dQ), KD forward and backward ----------------
    # B = 1, H = 2 query heads, L = 256; the tiles come from attention's _config table. Heads: H kv heads
    # (MHA, GROUP = 1, a compile-time 1 to Triton) or 1 (GQA, GROUP = 2). Causal kernels hold both the
    # unmasked and the masked key loops, so the secondary dtypes and head dims compile causal only.
    def attention_case(dt, D, causal, Dt, hk):
        def run():
            B, H, L = 1, 2, 256
            q, k = z(B, H, L, D, dtype=dt), z(B, hk, L, D, dtype=dt)
            lse = z(B, H, L, dtype=cd(dt))
            attn.forward(q, k, k, causal, 0.1)
            attn.backward(q, k, k, q, q, lse, causal, 0.1)
            qt, kt = z(B, H, L, Dt, dtype=dt), z(B, hk, L, Dt, dtype=dt)
            attn.kd_forward(q, k, qt, kt, causal, 0.1, 0.1)
            attn.kd_backward(q, k, qt, kt, lse, lse, lse, causal, 0.1, 0.1)
        return run

    # (dtype, head dim, causal, teacher head dim, kv heads)
    if full:
        attn_matrix = ([(n, D, c, D, 2) for n in DTYPE_NAMES for D in (32, 64, 96, 128, 256) for c in (False, True)]
                       + [(n, D, True, D, 1) for n in DTYPE_NAMES for D in (32, 64, 96, 128, 256)]
                       + [(n, 64, True, 128, 1) for n in DTYPE_NAMES])
    elif quick:
        attn_matrix = [("bfloat16", 64, True, 128, 1), ("bfloat16", 128, True, 128, 2), ("float32", 64, True, 64, 2)]
    else:
        # bfloat16 at every head-dim class; float16 shares its code and tiles; float32 / float64 have their own
        # tiles; non-causal float32 GQA at D = 128 has the highest register pressure (see the report)
        attn_matrix = ([("bfloat16", D, True, D, 2) for D in (32, 64, 96, 128, 256)]
                       + [("bfloat16", D, False, D, 2) for D in (64, 128)] + [("float16", 128, True, 128, 2)]
                       + [(n, D, True, D, 2) for n in ("float32", "float64") for D in (64, 128)]
                       + [("bfloat16", 128, True, 128, 1), ("float32", 128, False, 128, 1),
                          ("bfloat16", 64, True, 128, 1)])
    for name, D, causal, Dt, hk in attn_matrix:
        label = (f"{SHORT[name]} D{D}{' causal' if causal else ''}{' GQA' if hk == 1 else ''}"
                 f"{f' KD-Dt{Dt}' if Dt != D else ''}")
        add("attention", label, attention_case(dts[name], D, causal, Dt, hk))

    # ---- kd_loss rows and topk_kd_loss rows --------------------------------------------------------------
    # N = 2 rows of V = 4096 (BLOCK = 2048, 8 warps: the tile of any vocabulary >= 2048)
    N, V = 2, 4096
    kind_names = ["fkl", "rkl", "jsd", "jsd_n", "tvd", "skew_f", "skew_r", "mixed", "taid"]

    def kd_case(dt, kind, labels, T, lam_tensor=False):
        def run():
            c = cd(dt)
            s, t, g = z(N, V, dtype=dt), z(N, V, dtype=dt), z(N, V, dtype=dt)
            lab = torch.zeros(N, dtype=torch.int64) if labels else None
            hw = z(N, dtype=c) if labels else None
            lam = torch.zeros((), dtype=c) if lam_tensor else 0.5
            kd.kd_rows(s, t, kind, T, 0.5, 0.1, lam, z(N, dtype=c), lab, hw, g, z(N, dtype=c),
                       z(N, dtype=c) if labels else None)
        return run

    for name in all_dt:
        kinds = range(9) if (full or name in ("float32", "bfloat16")) else [kd.FKL]
        for kind in kinds:
            add("kd", f"{SHORT[name]} {kind_names[kind]} T2 labels", kd_case(dts[name], kind, True, 2.0))
    add("kd", "bf16 taid lam-tensor T1", kd_case(dts["bfloat16"], kd.TAID, False, 1.0, lam_tensor=True))
    if full:
        for name in all_dt:
            for kind in range(9):
                add("kd", f"{SHORT[name]} {kind_names[kind]} T1", kd_case(dts[name], kind, False, 1.0))

    def topk_case(dt, mode):
        def run():
            c, K = cd(dt), 20
            zl, g = z(N, V, dtype=dt), z(N, V, dtype=dt)
            ids = torch.zeros((N, K), dtype=torch.int64)
            kd.topk_rows(zl, ids, z(N, K, dtype=c), mode, 2.0, 1.0, z(N, dtype=c), torch.zeros(N, dtype=torch.int64),
                         z(N, dtype=c), g, z(N, dtype=c), z(N, dtype=c))
        return run

    for name in all_dt:
        for mode in (range(3) if (full or name == "float32") else [0]):
            add("kd", f"{SHORT[name]} topk mode{mode}", topk_case(dts[name], mode))

    # ---- the elementwise / row-reduction families: B = 2 rows of D = 4096 (BLOCK 1024, 4 chunks) -----------
    B, D = 2, 4096

    def score_diff_case(dt, variant):
        def run():
            c = cd(dt)
            x = z(B, D, dtype=dt)
            if variant == "dmd":    # norm, guided teacher with per-sample w, x_t conversion, weight, clip
                sd.forward(x, x, None, None, 1.0, x, x, z(B, dtype=c), 1.0, x, z(B, 2, dtype=c), z(B, dtype=c),
                           True, 0.0, 1.0, 1.0)
            elif variant == "sds":  # no norm, guided pred with a scalar w, no weight, no clip
                sd.forward(x, x, x, None, 7.5, x, None, None, 1.0, None, None, None, False, 0.0, 0.0, 1.0)
            else:                   # vsd: guidance on both, per-sample weights on both
                sd.forward(x, x, x, z(B, dtype=c), 1.0, x, x, z(B, dtype=c), 1.0, None, None, z(B, dtype=c),
                           False, 0.0, 0.0, 1.0)
        return run

    for name in all_dt:
        for variant in ("dmd", "sds", "vsd") if full else ("dmd", "sds"):
            add("score_diff", f"{SHORT[name]} {variant}", score_diff_case(dts[name], variant))

    def score_identity_case(dt, guided, need):
        def run():
            c = cd(dt)
            x = z(B, D, dtype=dt)
            u = x if guided else None
            w = z(B, dtype=c) if guided else None
            si.forward(x, x, u, w, 1.0, x, u, w, 1.0)
            si.backward(x, x, u, w, 1.0, x, u, w, 1.0, z(B, 2, dtype=c), need)
        return run

    for name in all_dt:
        add("score_identity", f"{SHORT[name]} guided all-grads", score_identity_case(dts[name], True, (1, 1, 1, 1, 1)))
        if full or name == "float32":
            add("score_identity", f"{SHORT[name]} plain grad-x", score_identity_case(dts[name], False, (1, 0, 0, 0, 0)))

    def regression_case(dt, kind, coef, t2):
        def run():
            c = cd(dt)
            p = z(B, D, dtype=dt)
            cf = z(B, 2, dtype=c) if coef else None
            reg.forward(p, p, p if t2 else None, cf, kind, 0.03)
            reg.backward(p, p, p if t2 else None, cf, kind, 0.03, z(B, dtype=c))
        return run

    for name in all_dt:
        variants = [(0, False, False), (1, True, True)] + ([(2, True, False)] if full else [])
        for kind, coef, t2 in variants:
            label = f"{SHORT[name]} kind{kind}{' coef' if coef else ''}{'+t2' if t2 else ''}"
            add("regression", label, regression_case(dts[name], kind, coef, t2))

    # Seeds: 12345 is the common form (key words k0 = 12345, k1 = 0). Seeds 1 and 2^32 make a key word
    # equal to 1, which Triton specializes as a compile-time constant: a specialization of its own.
    seed = 12345
    edge_seeds = {"seed=1": 1, "seed=2^32": 2**32}

    def sampling_case(dt, variant, seed=seed):
        def run():
            c = cd(dt)
            x = z(B, D, dtype=dt)
            out, coef, off = z(B, D, dtype=dt), z(B, 8, dtype=c), torch.zeros((), dtype=torch.int64)
            if variant == "guided-draw":     # cfg with per-sample w, history term, drawn noise, both extra outputs
                smp.affine_step(x, x, x, x, z(B, dtype=c), 1.0, coef, None, True, seed, off, 0, out, z(B, D, dtype=dt),
                                z(B, D, dtype=dt))
            elif variant == "given-noise":   # a pred and a given noise, scalar guidance
                smp.affine_step(x, x, x, None, None, 7.5, coef, x, False, seed, off, 0, out, None, None)
            else:                            # deterministic step, x only
                smp.affine_step(x, x, None, None, None, 1.0, coef, None, False, seed, off, 0, out, None, None)
        return run

    for name in all_dt:
        variants = ("guided-draw", "given-noise", "plain") if (full or name == "float32") else ("guided-draw",)
        for variant in variants:
            add("sampling", f"{SHORT[name]} {variant}", sampling_case(dts[name], variant))
    for label, s in edge_seeds.items():
        add("sampling", f"fp32 guided-draw {label}", sampling_case(torch.float32, "guided-draw", s))

    def rng_case(kind, dt, seed=seed):
        def run():
            out = torch.zeros(1000, dtype=torch.int64 if kind == rng.BITS else dt)
            rng.fill(out, seed, torch.zeros((), dtype=torch.int64), 0, kind)
        return run

    add("rng", "bits int64", rng_case(rng.BITS, torch.int64))
    for name in all_dt:
        add("rng", f"{SHORT[name]} uniform", rng_case(rng.UNIFORM, dts[name]))
        add("rng", f"{SHORT[name]} normal", rng_case(rng.NORMAL, dts[name]))
    for label, s in edge_seeds.items():
        add("rng", f"fp32 normal {label}", rng_case(rng.NORMAL, torch.float32, s))

    def grad_scale_case(dt):
        def run():
            gs.grad_scale(z(B, D, dtype=dt), torch.zeros((), dtype=cd(dt)), 0.5)
        return run

    for name in all_dt:
        add("grad_scale", SHORT[name], grad_scale_case(dts[name]))
    return cases


def project_jit_functions() -> dict[str, object]:
    """Every @triton.jit function defined in the op layer (kernels/**.py), by qualified name."""
    import importlib
    from pathlib import Path

    from triton.runtime.jit import JITFunction, KernelInterface

    import flashdistill.kernels as pkg

    root = Path(pkg.__file__).parent
    found = {}
    for path in sorted(root.rglob("*.py")):
        if "triton" not in path.read_text():
            continue
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        mod = importlib.import_module(".".join((pkg.__name__,) + parts))
        for obj in vars(mod).values():
            while isinstance(obj, KernelInterface) and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn  # autotune / heuristics wrappers
            if isinstance(obj, JITFunction) and obj.module == mod.__name__:
                found[_qualname(obj)] = obj
    return found


# ----------------------------------------------------------------------------------------------------
# Running the cases (in worker processes) and reporting
# ----------------------------------------------------------------------------------------------------

_CASES: list[Case] = []


def _run_case(i: int):
    case = _CASES[i]
    _State.case, _State.records, _State.failures, _State.covered = f"{case.label}", [], [], set()
    try:
        case.run()
    except Exception as e:  # noqa: BLE001  (a host function that raised: the launcher changed under us)
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.filename}:{f.lineno}" for f in reversed(tb) if "/kernels/" in f.filename), "?")
        _State.failures.append(("(host function)", case.label, f"{type(e).__name__} at {where}: {e}"))
    return i, _State.records, _State.failures, _State.covered


def _worker_init():
    import torch
    torch.set_num_threads(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, choices=sorted(ARCHS), default=90, help="target: 90 (default) or 80")
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="fewer dtypes and variants (still every kernel)")
    tier.add_argument("--full", action="store_true", help="every dtype x every variant (slow)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ap.add_argument("--jobs", type=int, default=cpus, help=f"compile processes (default: the CPUs available, {cpus})")
    ap.add_argument("--traceback", action="store_true", help="full tracebacks of failures")
    args = ap.parse_args(argv)
    level = "full" if args.full else "quick" if args.quick else "default"

    # Before Triton is imported: compile for the GPU, always (fresh cache), with ptxas's -v log printed.
    if os.environ.pop("TRITON_INTERPRET", None) not in (None, "", "0"):
        print("compile_triton: TRITON_INTERPRET removed from the environment (this program compiles for the GPU)")
    cache = tempfile.TemporaryDirectory(prefix="compile_triton_")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        import triton
    except ImportError as e:
        print(f"compile_triton: triton is not importable ({e})", file=sys.stderr)
        return 2
    try:
        ptxas = install_fake_gpu(args.arch, args.traceback)
    except ApiError as e:
        print(f"compile_triton: this Triton ({triton.__version__}) does not offer what the fake GPU needs: {e}.\n"
              f"The program was written against triton 3.9 internals (see its docstring); adapt "
              f"install_fake_gpu() in {__file__}.", file=sys.stderr)
        return 2

    global _CASES
    try:
        jit_fns = project_jit_functions()
        _CASES = build_cases(level)
    except Exception as e:  # noqa: BLE001
        print(f"compile_triton: could not import the kernel modules or set up the cases: {_summary(e, True)}",
              file=sys.stderr)
        return 1

    arch = ARCHS[args.arch]
    jobs = max(1, min(args.jobs, len(_CASES)))
    print(f"compile_triton: {len(_CASES)} configurations ({level}), {len(jit_fns)} jit functions, target "
          f"{arch['name']}, triton {triton.__version__} ({os.path.basename(ptxas)}), {jobs} process(es)", flush=True)
    t0 = time.perf_counter()
    # Largest first for the balance of the pool: attention cases come first in _CASES.
    if jobs == 1:
        results = [_run_case(i) for i in range(len(_CASES))]
    else:
        with multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
            results = list(pool.imap_unordered(_run_case, range(len(_CASES)), chunksize=1))
    wall = time.perf_counter() - t0
    results.sort(key=lambda r: r[0])

    records, failures, covered, seen = [], [], set(), set()
    for i, recs, fails, cov in results:
        for r in recs:
            if r["hash"] not in seen:  # the same specialization compiled by two workers
                seen.add(r["hash"])
                records.append(dict(r, op=_CASES[i].op))
        failures += [(_CASES[i].op,) + f for f in fails]
        covered |= cov

    # ---- the table -----------------------------------------------------------------------------------
    def num(v):
        return "?" if v is None else str(v)

    header = ("op", "kernel", "config", "warps", "stages", "shared B", "regs", "spill B", "s")
    rows = [(r["op"], r["kernel"], r["config"], str(r["warps"]), str(r["stages"]), str(r["shared"]), num(r["regs"]),
             num(r["spill_st"]), f"{r['seconds']:.1f}") for r in records]
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h) for j, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8}

    def line(cells):
        return "  ".join(c.rjust(w) if j in right else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))

    # ---- findings --------------------------------------------------------------------------------------
    status = 0
    spills = [r for r in records if r["spill_st"]]
    for r in spills:
        print(f"WARNING spill: {r['kernel']} [{r['config']}]: {r['spill_st']} B spill stores, {r['spill_ld']} B "
              f"spill loads, {r['stack']} B stack frame ({r['regs']} registers, {r['warps']} warps)")
    no_log = [r for r in records if r["regs"] is None]
    if no_log:
        print(f"WARNING: no ptxas -v log for {len(no_log)} kernel(s) (registers and spills unknown): did "
              f"TRITON_DUMP_PTXAS_LOG stop printing it?")
    too_big = [r for r in records if r["shared"] > arch["max_shared"]]
    for r in too_big:
        print(f"FAIL shared memory: {r['kernel']} [{r['config']}] needs {r['shared']} B > {arch['max_shared']} B "
              f"per block on {arch['name']} (a launch would raise OutOfResources)")
        status = 1
    grouped: dict[tuple, list] = {}  # one message per (kernel, error), with every config it failed in
    for op, kernel, config, msg in failures:
        grouped.setdefault((op, kernel, msg), []).append(config)
    for (op, kernel, msg), configs in grouped.items():
        where = configs[0] if len(configs) == 1 else f"{len(configs)} configs: " + "; ".join(configs)
        print(f"FAIL compile: {op} {kernel} [{where}]\n    " + msg.replace("\n", "\n    "))
        status = 1
    never = sorted(set(jit_fns) - covered)
    if never:
        failed = {kernel for _, kernel, _, _ in failures}
        names = [f"{n} (its compiles failed)" if n.rsplit(".", 1)[1] in failed else n for n in never]
        print(f"FAIL coverage: {len(never)} @triton.jit function(s) never compiled, as a kernel or inlined into "
              f"a kernel that compiled (a case must reach them: build_cases):\n    " + "\n    ".join(names))
        status = 1
    fused = sorted({r["kernel"] for r in records if r["fp_fusion_default"]})
    if fused:
        print(f"note: launched without enable_fp_fusion (Triton's default, FMA contraction on in 3.9, off from "
              f"3.10): {', '.join(fused)}")
    max_regs = max((r["regs"] or 0 for r in records), default=0)
    max_shared = max((r["shared"] for r in records), default=0)
    print(f"compile_triton: {len(records)} kernels compiled ({len(set(r['kernel'] for r in records))} distinct, "
          f"{len(jit_fns) - len(never)}/{len(jit_fns)} jit functions covered), {len(failures)} failed, "
          f"{len(spills)} spill, max {max_regs} registers, max shared {max_shared} B; "
          f"{wall:.0f} s -> {'FAILED' if status else 'ok'}")
    cache.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
