"""The op layer: every op is a ``torch.library.custom_op`` named ``flashdistill::<op>``.

Each op lives in its own package with a fixed layout: ``__init__.py`` (public function, contract,
validation, backend dispatch and torch.library registration), ``reference.py`` (plain PyTorch, the
spec, with the paper it comes from), ``triton_kernel.py``; its C++ kernels are in
``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu`` with the per-element math shared in
``csrc/include/flashdistill/<op>.h``. Importing this package registers every op.
"""

from flashdistill.kernels.backends import BACKENDS, available_backends, backend_status, use_backend
from flashdistill.kernels import grad_scale  # noqa: F401  (registers flashdistill::grad_scale)
from flashdistill.kernels.score_diff import dmd_loss

__all__ = ["BACKENDS", "available_backends", "backend_status", "dmd_loss", "use_backend"]
