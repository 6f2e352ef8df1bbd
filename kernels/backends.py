"""Backend registry and selection, shared by every op.

Four backends: ``reference`` (plain PyTorch, the spec), ``cpu`` (C++/OpenMP in ``flashdistill._C``),
``triton`` and ``cuda`` (C++ in ``flashdistill._C_cuda``). An op call resolves its backend from, in
order: the ``backend=`` argument, the innermost ``use_backend(...)`` block, ``FLASHDISTILL_BACKEND``,
and finally ``"auto"``, which picks the fastest usable backend for the tensors' device and says once
(on the ``flashdistill`` logger) what it chose. An explicit request that cannot be met raises an error
naming what is missing; nothing falls back silently.

Resolution depends only on names and the device type, never on tensor values, so it runs at trace
time under ``torch.compile`` and costs nothing inside a captured graph.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

import torch

from flashdistill.kernels import native

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Order in which "auto" tries backends, per device type (fastest first). The reference closes every
# list so that auto always finds something; falling back to it is announced with a warning.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_log = logging.getLogger("flashdistill")


def _initial_default() -> str:
    name = os.environ.get("FLASHDISTILL_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"FLASHDISTILL_BACKEND={name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return name


_default_stack = [_initial_default()]


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops called without ``backend=`` use ``name`` (``"auto"`` or a backend)."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"use_backend: {name!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    _default_stack.append(name)
    try:
        yield
    finally:
        _default_stack.pop()


def default_backend() -> str:
    return _default_stack[-1]


def requested(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The backend argument a public op passes to its custom op: the default when None, checked here
    so that an unknown or unusable backend is reported under the user's op name (the custom op
    resolves "auto" itself, inside the graph)."""
    backend = default_backend() if backend is None else backend
    if backend != "auto" and not torch.compiler.is_compiling():  # under compile the op resolves at run time
        resolve(op, backend, device, implemented)
    return backend


_status_cache: dict[tuple[str, str], tuple[bool, str]] = {}


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(usable, why) for backend ``name`` on tensors of ``device``; ``why`` says how to fix a no."""
    dev = torch.device(device).type
    key = (name, dev)
    if key not in _status_cache:
        _status_cache[key] = _probe(name, dev)
    return _status_cache[key]


def _probe(name: str, dev: str) -> tuple[bool, str]:
    if name == "reference":
        return True, "plain PyTorch (the spec)"
    if name == "cpu":
        mod, err = native.cpu_module()
        if mod is None:
            return False, f"not built or not importable ({err}); reinstall with `pip install -e .`"
        if dev != "cpu":
            return False, f"runs on CPU tensors only (got {dev} tensors)"
        return True, f"C++ / OpenMP, {mod.omp_max_threads()} threads"
    if name == "cuda":
        mod, err = native.cuda_module()
        if mod is None:
            return False, f"not built ({err}); reinstall with FLASHDISTILL_CUDA=1 pip install -e ."
        if dev != "cuda":
            return False, f"runs on CUDA tensors only (got {dev} tensors)"
        if mod.device_count() == 0:
            return False, f"built, but no usable CUDA device: {mod.runtime_error_string()}"
        return True, "C++ CUDA kernels"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return False, f"triton is not installed ({e}); pip install 'flashdistill[triton]'"
        if dev == "cuda":
            return (True, "compiled Triton kernels") if torch.cuda.is_available() else (False, "no CUDA device")
        if dev == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
            return False, "Triton compiles for GPUs; on CPU tensors it runs only under TRITON_INTERPRET=1 (tests)"
        return False, f"no Triton support for {dev} tensors"
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable on tensors of ``device``, in the fixed order of ``BACKENDS``."""
    return [name for name in BACKENDS if backend_status(name, device)[0]]


_announced: set[tuple[str, str, str]] = set()


def resolve(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...] = BACKENDS) -> str:
    """The concrete backend for one call of ``op`` on ``device`` tensors (see module docstring)."""
    requested = backend if backend is not None else default_backend()
    if requested == "auto":
        order = _AUTO_ORDER.get(device.type, ("reference",))
        chosen = next(name for name in order if name in implemented and backend_status(name, device)[0])
        _announce(op, device.type, chosen)
        return chosen
    if requested not in BACKENDS:
        raise ValueError(f"{op}: backend={requested!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    if requested not in implemented:
        raise RuntimeError(f"{op}: backend {requested!r} is not implemented for this op yet "
                           f"(implemented: {', '.join(implemented)})")
    usable, why = backend_status(requested, device)
    if not usable:
        raise RuntimeError(f"{op}: backend {requested!r} cannot run on {device.type} tensors: {why}")
    return requested


def _announce(op: str, dev: str, chosen: str) -> None:
    key = (op, dev, chosen)
    if key in _announced or torch.compiler.is_compiling():
        return
    _announced.add(key)
    _log.info("%s: backend 'auto' chose %r for %s tensors", op, chosen, dev)
    if chosen == "reference":
        missing = {n: backend_status(n, dev)[1] for n in _AUTO_ORDER.get(dev, ()) if n != "reference"}
        detail = "; ".join(f"{n}: {why}" for n, why in missing.items()) or "no fused backend for this device"
        warnings.warn(f"flashdistill {op}: no fused backend usable for {dev} tensors, running the "
                      f"PyTorch reference ({detail})", RuntimeWarning, stacklevel=3)
