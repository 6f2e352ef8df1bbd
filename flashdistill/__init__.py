"""flashdistill: fused kernels for distillation, behind a thin engine.

Public API (every op takes ``backend=``; see ``flashdistill.kernels.backends``):

    flashdistill.dmd_loss            DMD / DMD2 distribution-matching generator loss

Backends: ``reference`` (plain PyTorch, the spec), ``cpu`` (C++/OpenMP), ``triton``, ``cuda`` (C++).
``flashdistill.use_backend(name)`` and ``FLASHDISTILL_BACKEND`` set the default; ``auto`` picks the
fastest available for the tensors' device.
"""

__version__ = "0.1.0"

from flashdistill.kernels import (  # noqa: E402  (ops register with torch.library on this import)
    BACKENDS,
    available_backends,
    backend_status,
    dmd_loss,
    use_backend,
)

__all__ = ["BACKENDS", "available_backends", "backend_status", "dmd_loss", "use_backend", "__version__"]
