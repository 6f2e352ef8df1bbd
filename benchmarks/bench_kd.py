"""Logit distillation (KD), forward + backward: eager PyTorch on full logits vs torch.compile vs flashdistill.

One timed run: the loss, then ``loss.backward()``; every input that requires grad (*) is a leaf whose
``.grad`` is set to None before each run (untimed), so the gradients are allocated inside it. Loss
options in every case: divergence ``--divergence`` (default forward_kl, any of kd's KINDS; topk:
forward KL with the tail bucket, whatever it says), temperature 2, labels with 10% of the tokens set
to ignore_index (masked out of both terms) and a hard-label cross-entropy of weight 0.5
(``--no-labels``: no labels, no masking, no hard term; topk then has no ce row).

Cases (``--cases``; N tokens, H student hidden, Ht teacher hidden (``--teacher-hidden``, default H),
V vocabulary, K stored teacher ids per token (``--topk``, default 64); a shape NxHxV runs the three
cases, the logits one at NxV; a shape NxV runs logits only):

    case     op                     inputs
    linear   fused_linear_kd_loss   student hidden* [N, H], student head* [V, H], teacher hidden
                                    [N, Ht] and head [V, Ht] (the teacher's logits are computed in
                                    the step, without grad)
    logits   kd_loss                student logits* [N, V], teacher logits [N, V]
    topk     fused_linear_kd_loss   student hidden* [N, H], student head* [V, H] and a stored top-k
             (teacher_ids,          teacher (the offline-teacher path): ids [N, K] int64, distinct per
             topk_mode=             row, and their log-probs [N, K] float32, the K largest of
             "tail_bucket")         log_softmax(N(0, 4^2) teacher logits) (~0.8 of the mass on the top
                                    64 of 32000 ids: both terms of the tail bucket count)

impls, in the same run and on the same inputs:
    eager               plain PyTorch on full logits, float32 (the bf16 GEMMs' outputs upcast on
                        CUDA): linear: z = h W^T, t = h_t W_t^T under no_grad, then
                        flashdistill.kernels.kd.reference.kd_loss (log_softmax, KL, cross-entropy)
                        and autograd; logits: that reference.kd_loss alone; topk: z = h W^T, then
                        reference.topk_forward_kl(z, ids, lp, mode="tail_bucket", T) and the hard
                        cross-entropy, each masked-mean over the valid tokens (kd_loss's
                        normalization, written out in the bench), and autograd
    compile             torch.compile of that same function (inductor, static shapes; compiled
                        untimed, its compile time in the note column)
    flashdistill:NAME   fused_linear_kd_loss / kd_loss with backend=NAME for each backend
                        harness.choose_backends gives (on the CPU: cpu; --backends cpu,reference
                        adds the chunked loop with the plain-PyTorch rows); topk: those with a top-k
                        row kernel (kd.topk.IMPLEMENTED). On the CPU fused_linear_kd_loss
                        packs the valid tokens first (pack_valid): its GEMMs skip the ~10% masked rows
                        that the eager, compile and ce rows compute
    ce                  topk case with labels: the baseline a top-k KD step is compared with (the
                        research target: within ~10% of it): the same head with a plain hard-label
                        cross-entropy, F.cross_entropy(h W^T, labels) eager, and autograd. Timed and
                        measured, not checked (not a KD loss)
    liger               CUDA, linear case, when liger_kernel is importable: its fused linear JSD
                        (beta 0 / 1 / 0.5 for forward_kl / reverse_kl / jsd; it has no hard-label
                        term, so with labels its loss leaves out the cross-entropy)

Work and traffic (es = element size):
    linear   flops 2NV(H + Ht) (the two projections) + 4NVH (d/dh and d/dW): four GEMMs of 2NVH
             when Ht = H, 134 GFLOP each at 2048x1024x32000, 537 GFLOP in all; GEMM-bound, so the
             table after the run gives GFLOP/s and the % of a measured torch.mm rate. Bytes (the
             floor column, tiny here): read h, W, h_t, W_t once, write dh and dW once,
             (2NH + 2VH + NHt + VHt) x es = 418 MB at 2048x1024x32000 fp32.
    logits   bytes: read both logits, write the gradient, 3 x N x V x es (786 MB at 2048x32000
             fp32); flops: ~10 per element plus 2-3 exp/log, not the bound on a GPU; the row kernel
             is exp/log-bound on the CPU.
    topk     flops 6NVH: the student projection 2NVH, d/dh 2NVH, d/dW 2NVH (403 GFLOP at
             2048x1024x32000, over all N tokens for every impl: flashdistill's packed GEMMs do ~0.9
             of it, so its GFLOP/s are effective ones); GEMM-bound like linear. Bytes: read h, W, the
             ids (8 B) and log-probs (4 B), write dh and dW: (2NH + 2VH) x es + 12NK = 280 MB at
             2048x1024x32000 fp32, K = 64. The row pass (read V logits and K pairs, write V
             gradients, one exp per element) is ~2/3 of the logits case's.

Peak memory (the note column: "peak N MB beyond inputs", and the table after the run): the most
memory one forward + backward step holds beyond its inputs, gradients included (each impl allocates
dW, 131 MB at V x H = 32000 x 1024 fp32). Measured on the second step (the first compiles, or
initializes). CUDA: max_memory_allocated - memory_allocated before the step. CPU: each impl in a fresh
spawned process that builds one copy of the inputs, runs a step, frees what it can (grads, gc,
malloc_trim), reads VmRSS, resets the peak RSS (writing 5 to /proc/self/clear_refs), runs the step
and reads VmHWM; where the peak cannot be reset it measures the first step (compile included for
compile) and says so. RSS counts pages touched, so it sees what the step writes, not what it
reserves.

Prediction, CPU (2 cores of the dev VM, AMD EPYC Zen 4; fp32, 2 threads), written before the first
run. GEMMs at an assumed 120-160 GFLOP/s (2 cores x 32 fp32 flops per cycle at ~3 GHz, MKL's
~75-85%); row passes over [N, V] fp32 (262 MB each at 2048x32000) at ~30 GB/s, plus first-touch page
faults of every fresh [N, V] tensor.
    linear 2048x1024x32000, forward_kl, hard 0.5:
        eager    GEMMs 3.4-4.5 s + elementwise log_softmax / KL / CE and their backward 1.7-2 s:
                 5-6.5 s. Peak: at the KL's where() the forward holds z, t, z/T, t/T, log q,
                 log p, p, p (log p - log q), zeros_like and the result: ~10 x 262 MB + the bool
                 mask = ~2.7 GB (the backward, ~4-7 x 262 MB + dW, is lower).
        compile  GEMMs + ~0.3-0.8 s of fused row kernels: 3.8-5.3 s. Peak: z and t (the GEMM
                 outputs) + 1-2 saved [N, V] + the gradient + dW: ~0.9-1.4 GB.
        cpu      GEMMs (on 262-row chunks; dW accumulated 8 times, +2 GB of traffic, ~0.1 s) +
                 the row kernel ~0.1 s: 3.6-4.8 s, i.e. 0.7-0.8x eager and 0.9-1.05x compile.
                 Peak: the 64 MiB chunk workspace in the forward; in the backward dW and dh twice
                 (grad_scale writes a scaled copy of the saved gradient): ~280 MB, ~0.1x eager
                 (the issue's target: <= 0.25x eager memory, <= 1x eager time).
    logits 2048x32000, forward_kl, hard 0.5:
        eager    1.7-2 s; peak ~8 x 262 MB = ~2.1 GB.
        compile  0.3-0.6 s; peak ~0.8 GB (the gradient + 2 saved [N, V]).
        cpu      the row kernel ~0.1 s + grad_scale (one pass, 262 MB read + 262 MB written) +
                 first-touch faults of the two fresh [N, V] buffers: 0.15-0.25 s, 8-12x eager,
                 ~2x compile; floor 786 MB / ~33 GB/s = 24 ms (exp/log-bound, not memory-bound).
                 Peak: the gradient written in the forward and its scaled copy, 2 x 262 = 524 MB,
                 ~0.25x eager.

    topk 2048x1024x32000, K = 64, tail_bucket, hard 0.5 (kd v1.1, written before its first run; GEMMs
    at 130-145 GFLOP/s in a step, the linear case's measured 130 with its row kernels included; each
    fresh 262 MB [N, V] buffer ~85 ms of first-touch faults (kd v1)):
        eager    GEMMs (403 GFLOP) 2.8-3.1 s + ~9 fresh [N, V] (z, z/T, log q, CE's log-softmax; in
                 the backward the gather's scatter, two log_softmax backwards, the division's and
                 nll's) and ~12 passes: 0.9-1.3 s; 3.7-4.4 s. Peak in the backward: the saved log q,
                 the CE branch's buffered dz, the gather's scatter and a log_softmax backward: ~4 x
                 262 MB ≈ 0.9-1.2 GB.
        compile  GEMMs + row reductions fused (log q never materialized), a scatter buffer and dz:
                 3.0-3.5 s. Peak: z (saved) + the scatter buffer + dz + dW: 0.5-0.8 GB.
        cpu      packed GEMMs (~0.9 N rows, 4 chunks of 524) 2.5-2.8 s + row kernel 50-70 ms +
                 grad_scale of dW and dh ~50 ms: 2.6-2.95 s. Peak as linear: dW, dh and their scaled
                 copies + the packed rows' scatter: ~290 MB.
        ce       GEMMs + 4 fresh [N, V] (z, log-softmax, nll's scatter, its backward): 3.2-3.6 s; peak
                 the saved log-probs + 2 backward [N, V] ≈ 0.8 GB.
        ratios   cpu / eager 0.6-0.75, cpu / compile 0.8-0.95, cpu / ce 0.75-0.9 (a top-k KD step
                 cheaper than an eager CE step: it materializes no [N, V] and skips the masked rows;
                 the ~10% target met), compile / ce 0.9-1.05, eager / ce 1.1-1.3; peak cpu / eager
                 0.25-0.3, cpu / ce ~0.35.

    python benchmarks/bench_kd.py                    # CPU: fp32, all three cases at 2048x1024x32000, ~6 min
    python benchmarks/bench_kd.py --quick --check    # 512x256x8000, < 1 min with a warm inductor cache
    python benchmarks/bench_kd.py --cases logits --shapes 2048x32000 --divergence jsd --no-labels
    python benchmarks/bench_kd.py --cases topk --check --topk 32   # top-k teacher and the ce baseline, ~2.5 min
    python benchmarks/bench_kd.py --shapes 512x256x8000 --backends cpu,reference --no-memory
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NAME = "kd"
CASES = ("linear", "logits", "topk")
SHAPES = {"cpu": [(2048, 1024, 32000)], "cuda": [(8192, 4096, 128256)]}  # the sizes
QUICK_SHAPES = [(512, 256, 8000)]
TEMPERATURE = 2.0
HARD_WEIGHT = 0.5
IGNORE_FRAC = 0.1
IGNORE_INDEX = -100
# Warm-up runs of the linear and topk cases unless --warmup says otherwise: a step takes seconds at the
# default shape and allocates everything afresh, so one run reaches the steady state (compile and the
# check run before it); 3 would add ~45 s per case to the default run here.
LINEAR_WARMUP = 1
GEMM_CASES = ("linear", "topk")  # the cases with a head (hidden [N, H], weight [V, H]): GEMM-bound
TOPK_K = 64  # ids per token of the stored teacher (--topk)
TOPK_MODE = "tail_bucket"
# The stored teacher: log_softmax of N(0, TOPK_TEACHER_SCALE^2) logits, its top K. Scale 4 puts ~0.8 of
# the mass on the top 64 of 32000 ids (0.03 at scale 1, 0.93 at 5): peaked like an LM teacher, with a
# tail bucket big enough that both terms of tail_bucket count.
TOPK_TEACHER_SCALE = 4.0
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # Liger's beta convention = the reference's

MB = 1e6


def log(msg: str) -> None:
    harness.log(f"[{NAME}] {msg}")


def import_flashdistill():
    """Lazily: the harness and --help work without the package; a missing build is one clear message."""
    try:
        import flashdistill
        from flashdistill.kernels.kd import KINDS
        from flashdistill.kernels.kd import reference
    except ImportError as e:
        raise SystemExit(f"bench_kd: cannot import flashdistill ({e}); from the repo root: pip install -e .") from e
    return flashdistill, reference, KINDS


# ----------------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass(frozen=True)
class Spec:
    """One case at one shape; plain values only, so that a memory-measuring child process can rebuild
    the inputs and impls from it. ``shape``: (N, H, V) for linear and topk, (N, V) for logits."""

    case: str
    shape: tuple[int, ...]
    teacher_hidden: int  # Ht (linear only)
    divergence: str  # forward_kl for topk (a top-k teacher has no other)
    labels: bool
    dtype: str
    device: str
    topk: int = TOPK_K  # K (topk only)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def es(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def label(self) -> str:
        dims = "x".join(map(str, self.shape))
        if self.case == "linear" and self.teacher_hidden != self.shape[1]:
            dims += f" Ht={self.teacher_hidden}"
        opts = f"hard={HARD_WEIGHT:g}" if self.labels else "nolabels"
        kind = f"K={self.topk} {TOPK_MODE}" if self.case == "topk" else self.divergence
        return f"{dims} {self.case} {kind} T={TEMPERATURE:g} {opts}"

    @property
    def grad_names(self) -> tuple[str, ...]:
        return ("dh", "dW") if self.case in GEMM_CASES else ("dz",)

    @property
    def nbytes(self) -> int:
        """The floor's traffic: every input read once, every gradient written once (labels left out)."""
        if self.case == "linear":
            N, H, V = self.shape
            Ht = self.teacher_hidden
            return (2 * N * H + 2 * V * H + N * Ht + V * Ht) * self.es
        if self.case == "topk":  # h, W read and dh, dW written; ids int64 and log-probs float32 read
            N, H, V = self.shape
            return (2 * N * H + 2 * V * H) * self.es + N * self.topk * (8 + 4)
        N, V = self.shape
        return 3 * N * V * self.es

    @property
    def flops(self) -> int | None:
        """The GEMMs over all N tokens (flashdistill's pack_valid skips the masked ones: its GFLOP/s are
        then effective ones, the same work counted for every impl)."""
        if self.case == "logits":
            return None
        N, H, V = self.shape
        if self.case == "topk":  # student projection, dh, dW
            return 6 * N * V * H
        return 2 * N * V * (H + self.teacher_hidden) + 4 * N * V * H


def make_inputs(spec: Spec, gen: torch.Generator) -> tuple:
    """One argument tuple, leaves marked as requiring grad: linear (h, W, h_t, W_t, labels); logits
    (z, t, labels); topk (h, W, ids, logprobs, labels). Heads scaled by 1/sqrt(hidden) so the logits
    are ~N(0, 1). The top-k teacher: the K largest of log_softmax(N(0, TOPK_TEACHER_SCALE^2) logits),
    ids int64 (distinct per row, largest first), log-probs float32 whatever the dtype."""
    dev, dt = torch.device(spec.device), spec.torch_dtype

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=dev, dtype=torch.float32) * scale).to(dt)

    N, V = spec.shape[0], spec.shape[-1]
    labels = None
    if spec.labels:
        labels = torch.randint(0, V, (N,), generator=gen, device=dev)
        labels[torch.rand(N, generator=gen, device=dev) < IGNORE_FRAC] = IGNORE_INDEX
    if spec.case == "linear":
        H, Ht = spec.shape[1], spec.teacher_hidden
        return (randn(N, H).requires_grad_(), randn(V, H, scale=H**-0.5).requires_grad_(), randn(N, Ht),
                randn(V, Ht, scale=Ht**-0.5), labels)
    if spec.case == "topk":
        H, K = spec.shape[1], spec.topk
        h, w = randn(N, H).requires_grad_(), randn(V, H, scale=H**-0.5).requires_grad_()
        ids = torch.empty((N, K), dtype=torch.int64, device=dev)
        lp = torch.empty((N, K), dtype=torch.float32, device=dev)
        rows = max(1, (64 << 20) // (4 * V))  # the teacher's [N, V] logits by row blocks of 64 MiB
        for i in range(0, N, rows):
            t = torch.randn((min(rows, N - i), V), generator=gen, device=dev) * TOPK_TEACHER_SCALE
            lp[i:i + rows], ids[i:i + rows] = torch.log_softmax(t, -1).topk(K, -1)
        return h, w, ids, lp, labels
    return randn(N, V).requires_grad_(), randn(N, V), labels


def clone_inputs(args: tuple) -> tuple:
    return tuple(a if a is None else a.detach().clone().requires_grad_(a.requires_grad) for a in args)


def make_impls(spec: Spec, fd, reference, backends: list[str], *, compile: bool, liger: bool) -> dict[str, Callable]:
    """name -> loss function of the case's argument tuple; topk with labels adds the "ce" baseline (a
    plain CE step of the same head, timed and measured, not checked: not a KD loss)."""
    opts = dict(temperature=TEMPERATURE, hard_weight=HARD_WEIGHT if spec.labels else 0.0)
    ce = None

    if spec.case == "linear":

        def eager(h, w, th, tw, labels):
            z = h @ w.t()
            with torch.no_grad():
                t = th @ tw.t()
            return reference.kd_loss(z, t, kind=spec.divergence, labels=labels, **opts)[0]

        def flashdistill(backend, h, w, th, tw, labels):
            return fd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, divergence=spec.divergence,
                                           labels=labels, backend=backend, **opts)
    elif spec.case == "topk":

        def eager(h, w, ids, lp, labels):
            # reference.kd_loss's masking, normalization and hard term around reference.topk_forward_kl
            z = h @ w.t()
            cd = torch.float64 if z.dtype == torch.float64 else torch.float32
            d = reference.topk_forward_kl(z, ids, lp, mode=TOPK_MODE, temperature=TEMPERATURE)
            if labels is None:
                return d.mean()
            valid = labels != IGNORE_INDEX
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            xent = F.cross_entropy(z.to(cd), safe, reduction="none")
            zero = torch.zeros((), dtype=cd, device=z.device)
            n = valid.sum().to(cd)
            n = torch.where(n > 0, n, torch.ones_like(n))
            return torch.where(valid, d, zero).sum() / n + HARD_WEIGHT * torch.where(valid, xent, zero).sum() / n

        def flashdistill(backend, h, w, ids, lp, labels):
            return fd.fused_linear_kd_loss(h, w, teacher_ids=ids, teacher_logprobs=lp, topk_mode=TOPK_MODE,
                                           labels=labels, backend=backend, **opts)

        if spec.labels:

            def ce(h, w, ids, lp, labels):  # the baseline: the same head, hard labels only
                return F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX)
    else:

        def eager(z, t, labels):
            return reference.kd_loss(z, t, kind=spec.divergence, labels=labels, **opts)[0]

        def flashdistill(backend, z, t, labels):
            return fd.kd_loss(z, t, divergence=spec.divergence, labels=labels, backend=backend, **opts)

    impls = {"eager": eager}
    if compile:
        impls["compile"] = torch.compile(eager, dynamic=False)  # one static graph per shape, like a training run
    for b in backends:
        impls[f"flashdistill:{b}"] = functools.partial(flashdistill, b)
    if liger:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[spec.divergence], ignore_index=IGNORE_INDEX,
                                  temperature=TEMPERATURE)
        impls["liger"] = lambda h, w, th, tw, labels: jsd(h, w, th, tw, labels)
    if ce is not None:
        impls["ce"] = ce
    return impls


def liger_applies(spec: Spec) -> str | None:
    """Why the Liger row is left out of this case, or None when it is timed."""
    if spec.case != "linear" or torch.device(spec.device).type != "cuda":
        return "Liger's fused linear JSD is timed on CUDA in the linear case only"
    if spec.divergence not in LIGER_BETA:
        return f"Liger's JSD has no {spec.divergence}"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001  (not installed, or broken: either way there is no row)
        return f"liger_kernel is not importable ({type(e).__name__}: {e})"
    return None


def make_step(loss_fn: Callable):
    def step(*args):
        loss_fn(*args).backward()

    return step


def reset_grads(*args):
    for a in args:
        if a is not None and a.requires_grad:
            a.grad = None


# ----------------------------------------------------------------------------------------------------
# --check


def loss_and_grads(fn: Callable, args: tuple) -> list[torch.Tensor]:
    """[loss, grad of each leaf] in float64, on fresh leaves (the inputs are left untouched)."""
    args = clone_inputs(args)
    loss = fn(*args)
    loss.backward()
    return [loss.detach().double()] + [a.grad.double() for a in args if a is not None and a.requires_grad]


def check(bench: harness.Bench, spec: Spec, impls: dict, args: tuple) -> set[str]:
    """harness.check_impls on ``args``: each impl's loss and gradients against eager in float64, within a
    budget set by eager's error in the benchmark's dtype. Returns the impls that failed (recorded in
    ``bench``, not timed). Liger is not checked with labels: it has no hard-label term."""
    ref64 = loss_and_grads(impls["eager"], tuple(map(harness.as_float64, args)))

    def skip(name: str) -> str | None:
        if name == "ce":
            return "the plain-CE baseline, not a KD loss: timed only"
        return "no hard-label term: a different loss" if name == "liger" and spec.labels else None

    failed = harness.check_impls(bench, spec.label, spec.torch_dtype, impls,
                                 lambda fn: loss_and_grads(fn, args), ref64, ["loss", *spec.grad_names], skip)
    gc.collect()
    return failed


# ----------------------------------------------------------------------------------------------------
# Peak memory of one step beyond its inputs


def _peak_build(spec: Spec, impl: str):
    """In harness.peak_cpu's child process: (step, inputs, reset) of one impl (spawn-picklable)."""
    fd, reference, _ = import_flashdistill()
    backend = [impl.removeprefix("flashdistill:")] if impl.startswith("flashdistill:") else []
    fn = make_impls(spec, fd, reference, backend, compile=impl == "compile", liger=False)[impl]
    return make_step(fn), make_inputs(spec, torch.Generator().manual_seed(0)), reset_grads


def peak_cpu(spec: Spec, impl: str) -> tuple[int, bool]:
    return harness.peak_cpu(_peak_build, spec, impl)


def peak_cuda(step: Callable, args: tuple, device: torch.device) -> int:
    return harness.peak_cuda(step, args, device, reset_grads)


# ----------------------------------------------------------------------------------------------------
# The GEMM rate beside the linear case (the harness has floors for bytes only)


def mm_rate(spec: Spec) -> tuple[float, float]:
    """(FLOP/s, other processes' CPU share) of torch.mm [min(N, 1024), H] x [H, min(V, 8192)] in the
    case's dtype: the matmul speed the linear case is bound by, measured like the bandwidth (the median
    of 10 runs, ~1 s on the dev VM)."""
    N, H, V = spec.shape
    m, n = min(N, 1024), min(V, 8192)
    dev = torch.device(spec.device)
    a = torch.randn(m, H, device=dev).to(spec.torch_dtype)
    b = torch.randn(H, n, device=dev).to(spec.torch_dtype)
    load = harness.CpuLoad()
    t = harness.time_fn(lambda: torch.mm(a, b), [()], device=dev, warmup=2, min_reps=10, max_reps=10, budget_s=0.0)
    return 2 * m * n * H / (t.median_ms * 1e-3), load.others()


def memory_table(rows: list[harness.Result], peaks: dict, rates: dict, busy_rates: set, specs: dict) -> str:
    """impl, median, time and peak memory relative to eager, and GFLOP/s for the linear and topk cases;
    below it, each impl of a case with a ce row relative to that plain-CE step."""
    lines = [f"### {NAME}: time and peak memory vs eager", "",
             "peak = the most memory one forward + backward step holds beyond its inputs, gradients included; "
             "issue #4's CPU targets for linear 2048x1024x32000: peak / eager <= 0.25, time / eager <= 1; "
             "topk: a step within ~10% of a plain CE step of the same head (the ce row)  ", ""]
    lines += ["| case | impl | median ms | time / eager | peak MB | peak / eager | GFLOP/s | % of mm rate |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    eager = {r.case: r for r in rows if r.impl == "eager"}
    busy = False
    for r in rows:
        spec, e = specs[r.case], eager.get(r.case)
        peak, peak_e = peaks.get((r.case, r.impl)), peaks.get((r.case, "eager"))
        flops, rate = spec.flops, rates.get(r.case)
        mark = "*" if r.other_load_pct > 100 * harness.BUSY_WARN else ""
        rate_mark = "*" if r.case in busy_rates else ""
        busy = busy or bool(mark or rate_mark)
        gflops = flops / (r.median_ms * 1e-3) / 1e9 if flops else None
        lines.append("| " + " | ".join([
            r.case, r.impl, harness.fmt(r.median_ms) + mark,
            harness.fmt(r.median_ms / e.median_ms) if e else "–",
            harness.fmt(peak / MB) if peak is not None else "–",
            harness.fmt(peak / peak_e) if peak is not None and peak_e else "–",
            harness.fmt(gflops) if gflops else "–",
            harness.fmt(100 * gflops * 1e9 / rate, 2) + "%" + rate_mark if gflops and rate else "–",
        ]) + " |")  # fmt: skip
    for case in dict.fromkeys(r.case for r in rows):
        base = next((r for r in rows if r.case == case and r.impl == "ce"), None)
        if base is None:
            continue
        peak_ce = peaks.get((case, "ce"))
        parts = []
        for r in rows:
            if r.case == case and r.impl != "ce":
                peak = peaks.get((case, r.impl))
                mem = f", peak {harness.fmt(peak / peak_ce)}" if peak is not None and peak_ce else ""
                parts.append(f"{r.impl} time {harness.fmt(r.median_ms / base.median_ms)}{mem}")
        lines += ["", f"{case}, vs the ce step (time / ce, peak / ce): " + "; ".join(parts)]
    if rates:
        lines += ["", "mm rate: " + "; ".join(f"{specs[c].case} {c.split()[0]} {v / 1e9:.0f} GFLOP/s"
                                          + ("*" if c in busy_rates else "") for c, v in rates.items())
                  + " (torch.mm [min(N, 1024), H] x [H, min(V, 8192)], measured in this run)"]
    if busy:
        lines += ["", f"\\* other processes used more than {harness.BUSY_WARN:.0%} of the CPUs during this "
                  "measurement: not reliable"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------


def make_specs(shapes, cases, teacher_hidden, divergence, labels, dtype, device, topk=TOPK_K) -> list[Spec]:
    specs = []
    for shape in shapes:
        if len(shape) == 3:
            for_case = {"linear": shape, "logits": (shape[0], shape[2]), "topk": shape}
        elif len(shape) == 2:
            for_case = {"logits": shape}
            if "linear" in cases or "topk" in cases:
                log(f"{'x'.join(map(str, shape))}: a 2-d shape NxV runs the logits case only")
        else:
            raise SystemExit(f"bench_kd: --shapes {'x'.join(map(str, shape))}: give NxHxV (every case) or NxV "
                             "(logits)")
        for case in cases:
            if case in for_case:
                ht = teacher_hidden or (shape[1] if case == "linear" else 0)
                kind = "forward_kl" if case == "topk" else divergence
                if case == "topk" and not 1 <= topk <= shape[2]:
                    raise SystemExit(f"bench_kd: --topk {topk}: K must be in [1, V = {shape[2]}]")
                specs.append(Spec(case, tuple(for_case[case]), ht if case == "linear" else 0, kind, labels,
                                  harness.dtype_name(dtype), str(device), topk if case == "topk" else 0))
    return specs


def main(argv=None) -> int:
    parser = harness.make_parser(__doc__)
    parser.add_argument("--cases", default=",".join(CASES), help="comma list of linear, logits, topk (default: all)")
    parser.add_argument("--shapes", default=None, help="comma list of NxHxV (every case) or NxV (logits only), "
                        "e.g. 512x256x8000 (default: 2048x1024x32000 on the CPU, 8192x4096x128256 on CUDA)")
    parser.add_argument("--teacher-hidden", type=int, default=None, help="the teacher's hidden size Ht (default: H)")
    parser.add_argument("--topk", type=int, default=TOPK_K, help="topk case: the stored teacher's ids per token K "
                        "(default: %(default)s)")
    parser.add_argument("--divergence", default="forward_kl", help="any of kd's KINDS (default: %(default)s)")
    parser.add_argument("--no-labels", action="store_true", help="no labels: every token counts, no hard-label term")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (on the CPU, "
                        "one process per impl running two steps)")
    parser.add_argument("--check", action="store_true", help="assert every impl's loss and grads match eager first")
    cfg = harness.parse_config(parser, argv)
    a = cfg.args
    fd, reference, kinds = import_flashdistill()
    if a.divergence not in kinds:
        parser.error(f"--divergence {a.divergence!r}: choose one of {', '.join(kinds)}")
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if unknown := [c for c in cases if c not in CASES]:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    device, dtype = cfg.device, cfg.dtype_or(cpu=torch.float32, cuda=torch.bfloat16)
    shapes = harness.parse_shapes(a.shapes) if a.shapes else (QUICK_SHAPES if cfg.quick else SHAPES[device.type])
    specs = make_specs(shapes, cases, a.teacher_hidden, a.divergence, not a.no_labels, dtype, device, a.topk)
    backends = harness.choose_backends(fd, cfg, NAME)
    if "topk" in cases:
        if a.divergence != "forward_kl":
            log(f"topk: forward KL only (a top-k teacher); --divergence {a.divergence} applies to linear and logits")
        if a.no_labels:
            log("topk: no ce row with --no-labels (the baseline is a hard-label cross-entropy)")
    bench = harness.Bench(NAME, cfg)

    gen = torch.Generator(device=device).manual_seed(0)
    peaks: dict[tuple[str, str], int] = {}
    rates: dict[str, float] = {}
    busy_rates: set[str] = set()  # cases whose mm rate was measured on a busy machine
    for spec in specs:
        label = spec.label
        why_not_liger = liger_applies(spec)
        if why_not_liger and device.type == "cuda" and spec.case == "linear":
            log(f"{label}: no liger row: {why_not_liger}")
        case_backends = backends
        if spec.case == "topk":  # the backends with a top-k row kernel (every one since 24a1758)
            from flashdistill.kernels.kd import topk as topk_op

            case_backends = [b for b in backends if b in topk_op.IMPLEMENTED]
            if dropped := [b for b in backends if b not in case_backends]:
                log(f"{label}: no flashdistill:{', flashdistill:'.join(dropped)} row: a top-k teacher has no such "
                    "row kernel")
        impls = make_impls(spec, fd, reference, case_backends, compile=cfg.compile, liger=why_not_liger is None)
        base = make_inputs(spec, gen)
        copy_bytes = spec.nbytes + (spec.shape[0] * 8 if spec.labels else 0)  # inputs + gradients of one run
        inputs = bench.make_inputs(functools.partial(clone_inputs, base), copy_bytes)
        del base
        extra = f", {spec.flops / 1e9:.0f} GFLOP" if spec.flops else ""
        log(f"{label} {spec.dtype}: bytes model {spec.nbytes / MB:.0f} MB{extra}; {inputs.plan.why}")

        notes: dict[str, list[str]] = {name: [] for name in impls}
        first = inputs.first()
        if note := bench.first_call(label, impls, lambda fn: make_step(fn)(*first),
                                    reset=lambda: reset_grads(*first)):
            notes["compile"].append(note)
        if a.check:
            for name in check(bench, spec, impls, inputs.first()):
                del impls[name]

        if not a.no_memory:
            for name, fn in impls.items():
                try:
                    if device.type == "cuda":
                        peak, second = peak_cuda(make_step(fn), inputs.first(), device), True
                    else:
                        peak, second = peak_cpu(spec, name)
                except Exception as e:  # noqa: BLE001
                    bench.fail(label, name, e, "memory")
                    continue
                peaks[(label, name)] = peak
                first = " (first step, an upper bound: the peak RSS could not be reset)"
                notes[name].append(f"peak {peak / MB:.0f} MB beyond inputs" + ("" if second else first))
                log(f"{label}: {name:<20} {notes[name][-1]}")
        if spec.flops:
            rates[label], other = mm_rate(spec)
            log(f"{label}: torch.mm {rates[label] / 1e9:.0f} GFLOP/s")
            if other > harness.BUSY_WARN:
                log(f"warning: other processes used {other:.0%} of the CPUs while measuring the mm rate; "
                    "the % of mm rate is not reliable")
                busy_rates.add(label)

        # Bench.time takes its warm-up count from the config only
        linear_default = spec.case in GEMM_CASES and a.warmup is None
        bench.cfg = dataclasses.replace(cfg, warmup=LINEAR_WARMUP) if linear_default else cfg
        for name, fn in impls.items():
            rows = bench.time(case=label, dtype=spec.torch_dtype, impl=name, fn=make_step(fn), inputs=inputs,
                              nbytes=spec.nbytes, setup=reset_grads, note="; ".join(notes[name]))  # fmt: skip
            for r in rows:
                if spec.flops:  # known only now; the row is written at finish()
                    r.note = "; ".join([*notes[name], f"{spec.flops / (r.median_ms * 1e-3) / 1e9:.0f} GFLOP/s"])
        del inputs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    bench.finish()
    print(memory_table(bench.results, peaks, rates, busy_rates, {s.label: s for s in specs}), flush=True)
    return bench.exit_code()


if __name__ == "__main__":
    sys.exit(main())
