"""Capture a whole training step once and replay it: ``step = capture(fn, *example_batch, optimizers=...)``.

A distillation step (generator forward, noising, teacher and fake-score forwards with guidance, fused
losses, backward, optimizer steps) is hundreds of kernel launches; at the sizes people iterate on, the
host cost of issuing them is more than the math. On a GPU the engine records the step once as a CUDA
graph and afterwards launches the whole graph with one call. The returned ``CapturedStep`` has the
signature of ``fn``.

CUDA (``mode="graph"``; what happens at the first call with a new input structure, "a bucket"):

1. The bucket key is the pytree structure of the arguments, every tensor's shape, dtype, device and
   requires_grad, and every non-tensor argument's value (a float guidance scale is baked into the graph,
   so each value gets its own graph). Static copies of the tensor arguments are made.
2. ``warmup`` eager iterations (3; 11 when torch.distributed is initialized, as DDP needs) run on the
   engine's side stream: Triton JIT, cuBLAS handles and the optimizers' state are created there. The last
   one runs under ``torch.cuda.set_sync_debug_mode("error")``: a hidden host synchronization (``.item()``,
   ``.cpu()``, ``print(tensor)``, boolean-mask indexing, ``if tensor:``) fails here with a Python
   traceback, not as an invalidated capture.
3. With ``restore=True`` (default) the warm-up is rolled back: parameters, optimizer state (state created
   by the warm-up is zeroed in place, which is a fresh state for Adam, AdamW and SGD without dampening;
   the tensors must survive because the graph will read them), ``sources`` (NoiseSource offsets,
   generators), ``state`` modules and tensors, and the default CUDA generator. So the first call trains
   on its batch once, like an eager step, and captured training equals eager training from the same seed.
4. Gradients are set to None, the ``sources`` that are ``torch.Generator`` objects are registered with
   the graph, and ``fn`` is captured on the side stream into the engine's memory pool, which all graphs of
   one ``Engine`` share (a DMD2 generator step and fake-score step: the pool holds their temporaries once;
   each graph's outputs and gradients stay referenced by their ``CapturedStep``, so sequential replays in
   any order never hand one graph's live memory to another).
5. Every call copies the arguments into the static inputs and replays the graph. It returns the graph's
   output tensors without a host sync; they are overwritten by the next call of the same bucket (pass
   ``clone_outputs=True`` for fresh tensors).

What ``fn`` must do to be capturable (research notes, infra.md §1.3, §1.10): tensors on one CUDA device;
no host synchronization; optimizers with ``capturable=True`` (or ``fused=True``) and a tensor learning
rate if a scheduler changes it (``lr=torch.tensor(1e-4, device="cuda")``; torch's schedulers update a
tensor lr in place); randomness from the default generator, a registered ``torch.Generator`` or a
``flashdistill.NoiseSource`` (its seed offset lives on the device); counters and schedules as device
tensors (Python state is not replayed); fixed shapes per bucket.

CPU (no graphs exist): ``mode="eager"`` calls ``fn`` (the default) and ``mode="compile"`` calls
``torch.compile(fn, **compile_options)``, compiled at capture by one warm-up call that is rolled back like
the GPU warm-up. Either says once what it did, and notes optimizers that are not ``fused=True`` (AdamW's
fused CPU step is about a third faster; infra.md §1.11).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from flashdistill.engine.step import Step
from flashdistill.kernels.rng import NoiseSource

__all__ = ["Engine", "CapturedStep", "capture", "MODES"]

MODES = ("auto", "graph", "compile", "eager")


def capture(step: Callable | Step, *example_args, optimizers=(), sources=(), state=(), mode: str = "auto",
            warmup: Optional[int] = None, restore: bool = True, sync_check: bool = True,
            clone_outputs: bool = False, compile_options: Optional[dict] = None, verbose: bool = True,
            name: Optional[str] = None, **example_kwargs) -> "CapturedStep":
    """Captures ``step`` on a new ``Engine`` (its own memory pool); see the module docstring.

    step           a function ``fn(*batch) -> tensors`` that runs one whole update, or a ``Step`` (whose
                   optimizers, sources and state are then used)
    example_args   a batch like the ones the step will get: the first graph is captured for it
    optimizers     the optimizers ``fn`` steps; sources: NoiseSource / torch.Generator objects it draws
                   from; state: other modules or tensors it changes (rolled back after the warm-up)
    mode           "auto" (graph for CUDA tensors, eager for CPU), "graph", "compile", "eager"
    """
    engine = Engine(mode=mode, warmup=warmup, restore=restore, sync_check=sync_check, clone_outputs=clone_outputs,
                    compile_options=compile_options, verbose=verbose)
    return engine.capture(step, *example_args, optimizers=optimizers, sources=sources, state=state, name=name,
                          **example_kwargs)


class Engine:
    """Graphs that share one memory pool and one capture stream (all steps of one training run)."""

    def __init__(self, *, mode: str = "auto", warmup: Optional[int] = None, restore: bool = True,
                 sync_check: bool = True, clone_outputs: bool = False, compile_options: Optional[dict] = None,
                 verbose: bool = True):
        if mode not in MODES:
            raise ValueError(f"capture: mode={mode!r} is not one of {', '.join(MODES)}")
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
            raise ValueError(f"capture: warmup must be an int >= 0 or None, got {warmup!r}")
        if compile_options is not None and not isinstance(compile_options, dict):
            raise TypeError(f"capture: compile_options must be a dict of torch.compile keywords, "
                            f"got {type(compile_options).__name__}")
        self.mode = mode
        self.warmup = warmup
        self.restore = restore
        self.sync_check = sync_check
        self.clone_outputs = clone_outputs
        self.compile_options = dict(compile_options or {})
        self.verbose = verbose
        self._pool = None
        self._stream = None

    def capture(self, step: Callable | Step, *example_args, optimizers=(), sources=(), state=(),
                name: Optional[str] = None, **example_kwargs) -> "CapturedStep":
        """A ``CapturedStep`` of ``step`` in this engine's pool, its first bucket captured for the example."""
        if isinstance(step, Step):
            if optimizers or sources or state:
                raise ValueError("capture: a Step carries its own optimizers, sources and state; do not pass them "
                                 "again")
            fn, optimizers, sources, state = step.fn, step.optimizers, step.sources, step.state
        elif callable(step):
            fn = step
        else:
            raise TypeError(f"capture: step must be a function or a flashdistill.engine.Step, got {type(step).__name__}")
        captured = CapturedStep(self, fn, tuple(optimizers), tuple(sources), tuple(state),
                                name or getattr(fn, "__name__", "step"))
        captured._prepare(example_args, example_kwargs)
        return captured

    # -- CUDA resources shared by every graph of the engine --------------------------------------------

    def _cuda_resources(self, device: torch.device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
            self._pool = torch.cuda.graph_pool_handle()
        return self._stream, self._pool


class CapturedStep:
    """A step with the signature of ``fn``: graph replays on CUDA, eager or compiled calls on the CPU.

    ``mode`` says which; ``num_graphs`` counts the captured buckets.
    """

    def __init__(self, engine: Engine, fn: Callable, optimizers: tuple, sources: tuple, state: tuple, name: str):
        for opt in optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"capture({name}): optimizers must be torch.optim.Optimizer objects, "
                                f"got {type(opt).__name__}")
        for src in sources:
            if not isinstance(src, (NoiseSource, torch.Generator)):
                raise TypeError(f"capture({name}): sources must be flashdistill.NoiseSource or torch.Generator "
                                f"objects, got {type(src).__name__}")
        for s in state:
            if not isinstance(s, (nn.Module, Tensor)):
                raise TypeError(f"capture({name}): state holds modules or tensors, got {type(s).__name__}")
        self.engine = engine
        self.fn = fn
        self.optimizers = optimizers
        self.sources = sources
        self.state = state
        self.name = name
        self.mode: Optional[str] = None
        self._graphs: dict = {}
        self._compiled = None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def __repr__(self) -> str:
        return f"CapturedStep({self.name}, mode={self.mode}, graphs={self.num_graphs})"

    # -- set-up ----------------------------------------------------------------------------------------

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        device = self._device(args, kwargs)
        mode = self.engine.mode
        if mode == "auto":
            mode = "graph" if device.type == "cuda" else "eager"
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"capture({self.name}): mode='graph' records a CUDA graph, but the step's tensors are on "
                             f"{device}; on the CPU use mode='eager' or mode='compile'")
        self.mode = mode
        if mode == "graph":
            self._check_capturable_optimizers()
            self._capture(args, kwargs)
            self._say(f"CUDA graph on {device} (warm-up {self._warmup()}"
                      f"{', rolled back' if self.engine.restore else ', kept as training steps'}); every call "
                      f"copies its inputs and replays")
            return
        if mode == "compile":
            self._compiled = torch.compile(self.fn, **self.engine.compile_options)
            warm = self._warmup()
            if warm:
                with self._rolled_back():
                    for _ in range(warm):
                        self._compiled(*args, **kwargs)
            self._say(f"torch.compile on {device} ({'no graphs on the CPU; ' if device.type == 'cpu' else ''}"
                      f"compiled at capture{', warm-up rolled back' if warm and self.engine.restore else ''})"
                      f"{self._fused_note()}")
        else:
            self._say(f"eager on {device}{' (no CUDA graphs on the CPU)' if device.type == 'cpu' else ''}"
                      f"{self._fused_note()}")

    def _warmup(self) -> int:
        if self.engine.warmup is not None:
            return self.engine.warmup
        if self.mode == "graph":
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            return 11 if distributed else 3  # DDP needs 11 eager iterations before capture (PyTorch CUDA notes)
        return 1 if self.mode == "compile" else 0

    def _say(self, what: str) -> None:
        if self.engine.verbose:
            print(f"flashdistill.capture({self.name}): {what}", file=sys.stderr)

    def _fused_note(self) -> str:
        slow = [type(opt).__name__ for opt in self.optimizers
                if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
                and not all(group.get("fused") for group in opt.param_groups)]
        if not slow:
            return ""
        return f"; note: {', '.join(slow)} not fused=True (the fused CPU step is faster)"

    def _device(self, args: tuple, kwargs: dict) -> torch.device:
        devices = {leaf.device for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Tensor)}
        for opt in self.optimizers:
            devices |= {p.device for group in opt.param_groups for p in group["params"]}
        types = {d.type for d in devices}
        if len(types) > 1 or len({d for d in devices if d.type == "cuda"}) > 1:
            raise ValueError(f"capture({self.name}): the batch and the optimizers' parameters must be on one device, "
                             f"got {sorted(str(d) for d in devices)}")
        return next(iter(devices)) if devices else torch.device("cpu")

    def _check_capturable_optimizers(self) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                if "capturable" in group and not (group.get("capturable") or group.get("fused")):
                    raise ValueError(
                        f"capture({self.name}): {type(opt).__name__} has capturable=False and fused=False; its step "
                        f"reads a host-side step count. Build it with capturable=True (or fused=True) and a tensor "
                        f"lr, e.g. torch.optim.AdamW(params, lr=torch.tensor(1e-4, device='cuda'), capturable=True)")
                if not isinstance(group.get("lr"), Tensor):
                    self._say(f"note: {type(opt).__name__} lr is a float, baked into the graph; an LR scheduler needs "
                              f"lr=torch.tensor(..., device='cuda')")

    # -- warm-up roll-back -----------------------------------------------------------------------------

    def _tracked_tensors(self) -> list:
        """Parameters of the optimizers and the tensors of ``state``, each once."""
        seen, out = set(), []
        tensors = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        for s in self.state:
            tensors += list(s.parameters()) + list(s.buffers()) if isinstance(s, nn.Module) else [s]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        return out

    @contextlib.contextmanager
    def _rolled_back(self):
        """Runs the body, then puts parameters, optimizer state, noise streams and ``state`` back."""
        if not self.engine.restore:
            yield
            return
        tensors = self._tracked_tensors()
        saved = [t.detach().clone() for t in tensors]
        opt_saved = [{p: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
                      for p, st in opt.state.items()} for opt in self.optimizers]
        src_saved = [src.offset.clone() if isinstance(src, NoiseSource) else src.get_state() for src in self.sources]
        cuda_devices = {t.device for t in tensors if t.is_cuda}
        rng_saved = {d: torch.cuda.get_rng_state(d) for d in cuda_devices}
        cpu_rng = torch.get_rng_state()
        yield
        with torch.no_grad():
            for t, v in zip(tensors, saved):
                t.copy_(v)
            for opt, before in zip(self.optimizers, opt_saved):
                for p, st in opt.state.items():
                    old = before.get(p, {})
                    for k, v in st.items():
                        if isinstance(v, Tensor):
                            v.copy_(old[k]) if k in old else v.zero_()
                        else:
                            st[k] = old.get(k, type(v)(0) if isinstance(v, (int, float)) else v)
            for src, v in zip(self.sources, src_saved):
                src.offset.copy_(v) if isinstance(src, NoiseSource) else src.set_state(v)
        for d, v in rng_saved.items():
            torch.cuda.set_rng_state(v, d)
        torch.set_rng_state(cpu_rng)

    # -- CUDA graphs -----------------------------------------------------------------------------------

    def _key(self, args: tuple, kwargs: dict):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        parts = []
        for i, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    raise TypeError(f"capture({self.name}): argument leaf {i} is a {type(leaf).__name__}, which is "
                                    f"neither a tensor nor hashable; a graph bakes non-tensor arguments in, so they "
                                    f"must be hashable values") from None
                parts.append(("value", type(leaf), leaf))
        return (spec, tuple(parts)), leaves, spec

    def _capture(self, args: tuple, kwargs: dict) -> None:
        key, leaves, spec = self._key(args, kwargs)
        device = self._device(args, kwargs)  # the one CUDA device of the batch and the parameters
        stream, pool = self.engine._cuda_resources(device)
        static = [leaf.detach().clone().requires_grad_(leaf.requires_grad) if isinstance(leaf, Tensor) else leaf
                  for leaf in leaves]
        s_args, s_kwargs = pytree.tree_unflatten(static, spec)

        with self._rolled_back():  # its snapshot is queued on the current stream, so the side stream waits after it
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                warm = self._warmup()
                for i in range(warm):
                    check = self.engine.sync_check and i == warm - 1
                    with _sync_debug_error(self.name) if check else contextlib.nullcontext():
                        self.fn(*s_args, **s_kwargs)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
        # static inputs hold this call's batch again (the warm-up may have changed them in place)
        _copy_into([x for x in static if isinstance(x, Tensor)], [x for x in leaves if isinstance(x, Tensor)])
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        for src in self.sources:
            if isinstance(src, torch.Generator) and src.device.type == "cuda":
                if not hasattr(graph, "register_generator_state"):
                    raise RuntimeError(f"capture({self.name}): this torch ({torch.__version__}) cannot register a "
                                       f"torch.Generator with a CUDA graph; draw from the default generator or a "
                                       f"flashdistill.NoiseSource")
                graph.register_generator_state(src)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = self.fn(*s_args, **s_kwargs)
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, Tensor):
                raise TypeError(f"capture({self.name}): the step returned a {type(leaf).__name__}; a graph replays only "
                                f"device work, so a step returns tensors (loss.detach(), not loss.item())")
        self._graphs[key] = (graph, [x for x in static if isinstance(x, Tensor)], out)

    # -- the call --------------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if self.mode == "eager":
            return self.fn(*args, **kwargs)
        if self.mode == "compile":
            return self._compiled(*args, **kwargs)
        key, leaves, _ = self._key(args, kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            self._capture(args, kwargs)  # a new bucket: warm-up (rolled back), capture; then replayed below
            entry = self._graphs[key]
            self._say(f"captured a graph for a new input structure ({self.num_graphs} now)")
        else:
            _copy_into(entry[1], [x for x in leaves if isinstance(x, Tensor)])
        graph, _, out = entry
        graph.replay()
        if self.engine.clone_outputs:
            return pytree.tree_map(lambda t: t.clone(), out)
        return out


def _copy_into(static: list, new: list) -> None:
    """The batch into the graph's static inputs, one fused copy (none for a step without tensor inputs:
    an unconditional recipe step takes only cond=None)."""
    if static:
        torch._foreach_copy_(static, new, non_blocking=True)


@contextlib.contextmanager
def _sync_debug_error(name: str):
    """Turns a host synchronization inside the body into an error that says what to change."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        raise RuntimeError(
            f"capture({name}): the step synchronizes with the host (found in the last warm-up iteration, run "
            f"under torch.cuda.set_sync_debug_mode('error')): {err}. A graph cannot contain it: keep values on the "
            f"device (no .item(), .cpu(), print(tensor), `if tensor:`, boolean-mask indexing or nonzero); use "
            f"torch.where for data-dependent choices") from err
    finally:
        torch.cuda.set_sync_debug_mode(previous)
