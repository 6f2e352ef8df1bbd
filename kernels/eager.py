"""Custom ops with an eager fast path.

Every fused op is a ``torch.library`` custom op, so torch.compile, AOT autograd, FakeTensor, vmap and
export see one opaque node with a fake (meta) implementation. The price is paid in eager mode: a call
through the dispatcher (the autograd wrapper, a redispatch below it, the op's Python body) costs
~20 us on this project's CPU, per op and again per backward op, which is more than the kernel itself
below ~50 k elements and what made small fused calls slower than eager PyTorch (NOTES, "eager fast
path").

``@custom_op(name)`` registers the decorated ``body`` as the custom op ``name`` (schema from its annotations, no
mutated arguments) and returns an ``Op``: callable like the custom op, with ``register_fake`` and
``register_autograd`` forwarding to it. A call runs ``body`` directly, or through a
``torch.autograd.Function`` built from the same ``setup_context`` and ``backward`` when autograd must
record it, *only* when nothing could observe the difference:

- not under torch.compile / dynamo tracing, the JIT tracer, a TorchDispatchMode (FakeTensorMode,
  make_fx's proxy mode, user modes such as FlopCounterMode), a TorchFunctionMode (e.g. ``with
  torch.device(...)``), or a functorch transform (vmap, grad, jvp);
- every tensor argument is a plain ``torch.Tensor`` or ``nn.Parameter`` (no subclass: DTensor,
  FakeTensor, a user's ``__torch_function__`` tensor);
- when autograd would record the call (grad mode on and an input requiring grad), the op has a
  registered backward (else the dispatcher's own error for a missing autograd formula stands).

Anything else goes through the dispatcher, as does every call with ``FLASHDISTILL_FAST_PATH=0`` in
the environment (or after ``set_fast_path(False)``). Both paths run the same body and the
same backward, so their results are bit-identical (tests/test_eager_fast_path.py holds them to it).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (
    lambda *args: any(isinstance(a, Tensor) and a.requires_grad for a in args))


def fast_path_allowed(args) -> bool:
    """True when calling the op's body directly is indistinguishable from dispatching it (see module
    docstring); ``args`` are the op's positional arguments."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    for a in args:
        if isinstance(a, Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


_enabled = os.environ.get("FLASHDISTILL_FAST_PATH", "1") != "0"


def set_fast_path(enabled: bool) -> bool:
    """Turn the eager fast path on or off (for A/B measurements and tests); returns the old setting."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


class Op:
    """A custom op and its eager fast path; see the module docstring."""

    def __init__(self, name: str, body: Callable):
        self.name = name
        self.body = body
        self.custom = torch.library.custom_op(name, body, mutates_args=())
        self._function: Optional[type] = None

    def register_fake(self, fn: Callable) -> Callable:
        self.custom.register_fake(fn)
        return fn

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)
        body = self.body

        def forward(ctx, *args):  # the old-style form: apply() binds a new-style signature per call (~40 us)
            out = body(*args)
            setup_context(ctx, args, out)
            return out

        self._function = type(f"{self.name.split('::')[-1]}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not (_enabled and fast_path_allowed(args)):
            return self.custom(*args)
        if torch.is_grad_enabled() and _any_requires_grad(*args):
            if self._function is None:
                return self.custom(*args)
            return self._function.apply(*args)
        return self.body(*args)


def cpu_one_pass(op: str, backend: str, x: Tensor, args) -> bool:
    """True when an eager call of ``op`` may take a CPU one-pass path (a forward that also writes d loss
    / d x, handed over by ``upstream_is_one``): it will be differentiated (grad mode on, ``x`` requires
    grad), the fast path applies to ``args``, and ``backend`` resolves to the C++ CPU backend."""
    return (torch.is_grad_enabled() and x.requires_grad and _enabled and fast_path_allowed(args)
            and backends.resolve(op, backend, x.device) == "cpu")


def upstream_is_one(grad) -> bool:
    """True when a backward's upstream gradient is exactly 1 and can be read without a device sync: a
    plain CPU tensor of one element that does not require grad (not a tracer's fake or proxy tensor,
    not under create_graph). A backward whose forward already wrote d loss / d input at upstream 1 can
    then hand that tensor over instead of scaling it (one read and one write of it saved)."""
    return (type(grad) is Tensor and grad.device.type == "cpu" and grad.numel() == 1 and not grad.requires_grad
            and not torch.compiler.is_compiling() and grad.item() == 1.0)


def custom_op(name: str) -> Callable[[Callable], Op]:
    """Decorator: register the function as the custom op ``name`` (no mutated arguments, schema from
    its annotations) and return it as an ``Op`` (module docstring)."""
    return lambda body: Op(name, body)
