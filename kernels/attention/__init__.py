"""Attention (issue #6): flash-style forward and backward, and a streaming attention-map KL loss.

    attention(q, k, v, *, causal=False, scale=None, return_lse=False, backend=None)
    attention_kd_loss(q_s, k_s, q_t, k_t, *, causal=False, scale_s=None, scale_t=None,
                      reduction="mean", backend=None)
    sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    use_flashdistill_attention(backend=None)   context manager: F.scaled_dot_product_attention -> sdpa

Layout as ``torch.nn.functional.scaled_dot_product_attention``: q [B, Hq, Lq, D], k and v
[B, Hk, Lk, D], Hq a multiple of Hk (grouped-query; multi-query with Hk = 1). ``causal``: key j is
visible to query i iff j <= i, aligned to the top left as SDPA's ``is_causal`` (so with Lq > Lk the
last Lq - Lk rows see every key, with Lq < Lk row i sees keys 0..i). Head dims up to 256 (the CUDA
backend's tensor-core path takes 32, 64, 96, 128 in fp16 / bf16; its generic kernels the rest). The
inputs' head dim must be contiguous
for the kernels; other strides (e.g. a [B, L, H, D] projection viewed with .transpose(1, 2)) are read
in place.

Only the log-sum-exp per query row (natural log, float32; float64 for float64 inputs) is saved for the
backward; no backend forms an [Lq, Lk] matrix except the reference. ``return_lse=True`` also returns
it, detached (a statistic, e.g. for ``attention_kd_loss``-style consumers; no gradient flows through it).

``attention_kd_loss``: KL(teacher || student) between the two models' attention distributions per
query row, averaged over B, H and the rows (MiniLM's attention transfer; with q = k = X of one model,
MiniLMv2's Q-Q / K-K / V-V relations, whose gradient autograd sums over both uses of X). Student and
teacher share B, H, Lq, Lk and the mask; their head dims and kv-head counts may differ. The teacher
is a constant (no gradient). Computed streaming: two log-sum-exps and the KL sum per row, O(rows)
memory (research notes attn_sampler.md Sec. 3.2); the math and sources are in ``reference.py``.

Cost (per (b, h) and query-key pair, non-causal; halve for causal): forward 4 D flops (2 GEMMs) and one
exp; backward 10 D flops (5 GEMMs; 7 in the deterministic two-kernel form) and one exp; KD forward
2 (Ds + Dt) flops and 2 exps, KD backward 2 (Dt + 3 Ds) flops and 2 exps. Bytes: the inputs and outputs
once per query block (K and V re-read Lq / BLOCK_M times, from cache on the CPU).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from flashdistill.kernels import backends, checks, eager, native
from flashdistill.kernels.attention import reference

OP = "attention"
KD_OP = "attention_kd_loss"
MAX_HEAD_DIM = 256
IMPLEMENTED = ("reference", "cpu", "triton", "cuda")
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["attention", "attention_kd_loss", "sdpa", "use_flashdistill_attention"]


# ----------------------------------------------------------------------------------------------------
# public ops

def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              return_lse: bool = False, backend: Optional[str] = None):
    """softmax(scale q k^T [+ causal mask]) v, differentiable in q, k and v (see the module docstring).

    Returns out [B, Hq, Lq, D] in q's dtype, or (out, lse) with ``return_lse``."""
    scale = _check_attention(OP, q, k, v, causal, scale)
    backend = backends.requested(OP, backend, q.device, IMPLEMENTED)
    out, lse = _fwd_op(_last_dim_unit(q), _last_dim_unit(k), _last_dim_unit(v), causal, scale, backend)
    return (out, lse.detach()) if return_lse else out


def attention_kd_loss(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, *, causal: bool = False,
                      scale_s: Optional[float] = None, scale_t: Optional[float] = None, reduction: str = "mean",
                      backend: Optional[str] = None) -> Tensor:
    """KL(teacher || student) of the attention distributions per query row: the mean over every
    (b, h, row) (``reduction="mean"``, MiniLM's normalization), their sum, or the [B, H, Lq] rows
    ("none"); float32 (float64 for float64 inputs). Gradient to q_s and k_s only."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{KD_OP}: reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
    scale_s, scale_t = _check_kd(KD_OP, q_s, k_s, q_t, k_t, causal, scale_s, scale_t)
    backend = backends.requested(KD_OP, backend, q_s.device, IMPLEMENTED)
    kl, _, _ = _kd_fwd_op(
        _last_dim_unit(q_s), _last_dim_unit(k_s), _last_dim_unit(q_t.detach()), _last_dim_unit(k_t.detach()),
        causal, scale_s, scale_t, backend)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.mean()


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False, *,
         backend: Optional[str] = None) -> Tensor:
    """A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on [B, H, L, D] (or [B, L, D])
    inputs, running ``attention``. What it does not support (an attention mask, dropout) is an error,
    never ignored; grouped kv heads need ``enable_gqa=True`` as in SDPA."""
    op = "sdpa"
    if attn_mask is not None:
        raise NotImplementedError(f"{op}: attn_mask is not supported by flashdistill attention (only is_causal); "
                                  f"call torch's scaled_dot_product_attention for masked attention")
    if dropout_p != 0.0:
        raise NotImplementedError(f"{op}: dropout_p={dropout_p} is not supported by flashdistill attention")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() not in (3, 4):
            raise ValueError(f"{op}: '{name}' must be a [B, H, L, D] or [B, L, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(f"{op}: query, key and value must have the same rank, got {query.dim()}, {key.dim()}, "
                         f"{value.dim()}")
    three = query.dim() == 3
    if three:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"{op}: query has {query.shape[1]} heads and key {key.shape[1]}; pass enable_gqa=True "
                         f"for grouped-query attention (as SDPA)")
    out = attention(query, key, value, causal=is_causal, scale=scale, backend=backend)
    return out.squeeze(1) if three else out


@contextlib.contextmanager
def use_flashdistill_attention(backend: Optional[str] = None):
    """Within the block, ``torch.nn.functional.scaled_dot_product_attention`` is ``sdpa`` (models that
    call SDPA through the functional module, as most DiT and LLM code does, run our kernels)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def patched(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# ----------------------------------------------------------------------------------------------------
# validation

def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_scale(op: str, name: str, scale, d: int) -> float:
    if scale is None:
        return reference.default_scale(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: {name} must be a finite float or None, got {scale!r}")
    return float(scale)


def _qkv(op: str, names, q: Tensor, k: Tensor, v: Optional[Tensor]):
    """q [B, Hq, Lq, D], k (and v) [B, Hk, Lk, D] of q's dtype and device, Hq % Hk == 0."""
    qn, kn, vn = names
    for name, t in ((qn, q), (kn, k)) + (((vn, v),) if v is not None else ()):
        checks.tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"{op}: '{name}' must be [batch, heads, seqlen, headdim], got {_desc(t)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: '{name}' must have the dtype and device of '{qn}' (no casting): "
                             f"'{name}' has {_desc(t)}, '{qn}' has {_desc(q)}")
    B, hq, _, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"{op}: '{kn}' must be [{B}, Hk, Lk, {d}] to match '{qn}' ({_desc(q)}), got {_desc(k)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{op}: '{vn}' must have the shape of '{kn}' {tuple(k.shape)}, got {_desc(v)}")
    if hq % k.shape[1]:
        raise ValueError(f"{op}: the query heads ({hq}) must be a multiple of the key/value heads ({k.shape[1]}) "
                         f"for grouped-query attention; '{qn}' {_desc(q)}, '{kn}' {_desc(k)}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim {d} is larger than supported ({MAX_HEAD_DIM}); '{qn}' {_desc(q)}")


def _check_attention(op, q, k, v, causal, scale) -> float:
    _qkv(op, ("q", "k", "v"), q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    return _check_scale(op, "scale", scale, q.shape[-1])


def _check_kd(op, q_s, k_s, q_t, k_t, causal, scale_s, scale_t):
    _qkv(op, ("q_s", "k_s", None), q_s, k_s, None)
    _qkv(op, ("q_t", "k_t", None), q_t, k_t, None)
    if q_t.dtype != q_s.dtype or q_t.device != q_s.device:
        raise ValueError(f"{op}: the teacher must have the student's dtype and device (no casting): "
                         f"'q_t' {_desc(q_t)}, 'q_s' {_desc(q_s)}")
    if q_t.shape[:3] != q_s.shape[:3] or k_t.shape[2] != k_s.shape[2]:
        raise ValueError(f"{op}: student and teacher must share batch, heads and sequence lengths: 'q_s' "
                         f"{_desc(q_s)}, 'k_s' {_desc(k_s)}, 'q_t' {_desc(q_t)}, 'k_t' {_desc(k_t)}")
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {type(causal).__name__}")
    return _check_scale(op, "scale_s", scale_s, q_s.shape[-1]), _check_scale(op, "scale_t", scale_t, q_t.shape[-1])


def _last_dim_unit(t: Tensor) -> Tensor:
    """The kernels read rows with a unit-stride head dim; anything else is copied (values unchanged)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------
# backends (the C++ modules share one ABI: csrc/README.md, "Attention")

def _arg(t: Tensor):
    return (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _native_fwd(mod, q, k, v, causal, scale):
    B, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    out = native.empty((B, hq, lq, d), q.dtype, q.device)
    lse = native.empty((B, hq, lq), checks.compute_dtype(q.dtype), q.device)
    mod.attention_forward(native.DTYPE_CODES[q.dtype], B, hq, hk, lq, lk, d, *_arg(q), *_arg(k), *_arg(v),
                          causal, scale, out.data_ptr(), lse.data_ptr(), native.stream_of(q))
    return out, lse


def _native_bwd(mod, q, k, v, out, dout, lse, causal, scale):
    B, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    code = native.DTYPE_CODES[q.dtype]
    out, dout, lse = out.contiguous(), dout.contiguous(), lse.contiguous()
    dq = native.empty(q.shape, q.dtype, q.device)
    dk = native.empty(k.shape, k.dtype, k.device)
    dv = native.empty(v.shape, v.dtype, v.device)
    nbytes = mod.attention_backward_workspace_bytes(code, B, hq, hk, lq, lk, d)
    ws = native.workspace(nbytes, q.device)
    mod.attention_backward(code, B, hq, hk, lq, lk, d, *_arg(q), *_arg(k), *_arg(v), out.data_ptr(),
                           dout.data_ptr(), lse.data_ptr(), causal, scale, dq.data_ptr(), dk.data_ptr(),
                           dv.data_ptr(), native.ptr(ws), nbytes, native.stream_of(q))
    return dq, dk, dv


def _kd_dims(qs, ks, qt, kt):
    B, H, lq, ds = qs.shape
    return B, H, ks.shape[1], kt.shape[1], lq, ks.shape[2], ds, qt.shape[3]


def _native_kd_fwd(mod, qs, ks, qt, kt, causal, scale_s, scale_t):
    dims = _kd_dims(qs, ks, qt, kt)
    rows = dims[:2] + (dims[4],)
    cd = checks.compute_dtype(qs.dtype)
    kl, lse_s, lse_t = (native.empty(rows, cd, qs.device) for _ in range(3))
    mod.attention_kd_forward(native.DTYPE_CODES[qs.dtype], *dims, *_arg(qs), *_arg(ks), *_arg(qt), *_arg(kt),
                             causal, scale_s, scale_t, kl.data_ptr(), lse_s.data_ptr(), lse_t.data_ptr(),
                             native.stream_of(qs))
    return kl, lse_s, lse_t


def _native_kd_bwd(mod, qs, ks, qt, kt, lse_s, lse_t, g, causal, scale_s, scale_t):
    dims = _kd_dims(qs, ks, qt, kt)
    code = native.DTYPE_CODES[qs.dtype]
    lse_s, lse_t, g = lse_s.contiguous(), lse_t.contiguous(), g.contiguous()
    dqs = native.empty(qs.shape, qs.dtype, qs.device)
    dks = native.empty(ks.shape, ks.dtype, ks.device)
    nbytes = mod.attention_kd_backward_workspace_bytes(code, *dims)
    ws = native.workspace(nbytes, qs.device)
    mod.attention_kd_backward(code, *dims, *_arg(qs), *_arg(ks), *_arg(qt), *_arg(kt), lse_s.data_ptr(),
                              lse_t.data_ptr(), g.data_ptr(), causal, scale_s, scale_t, dqs.data_ptr(),
                              dks.data_ptr(), native.ptr(ws), nbytes, native.stream_of(qs))
    return dqs, dks


def _triton(name):
    def run(*args):
        from flashdistill.kernels.attention import triton_kernel

        return getattr(triton_kernel, name)(*args)
    return run


def _ref_fwd(q, k, v, causal, scale):
    return reference.attention(q, k, v, causal=causal, scale=scale)


def _ref_bwd(q, k, v, out, dout, lse, causal, scale):
    return reference.attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale)


def _ref_kd_fwd(qs, ks, qt, kt, causal, scale_s, scale_t):
    with torch.no_grad():
        return reference.attention_kd(qs, ks, qt, kt, causal=causal, scale_s=scale_s, scale_t=scale_t)


def _ref_kd_bwd(qs, ks, qt, kt, lse_s, lse_t, g, causal, scale_s, scale_t):
    return reference.attention_kd_backward(qs, ks, qt, kt, lse_s, lse_t, g, causal=causal, scale_s=scale_s,
                                           scale_t=scale_t)


_FWD = {"reference": _ref_fwd, "cpu": native.on_cpu_module(_native_fwd),
        "cuda": native.on_cuda_module(_native_fwd), "triton": _triton("forward")}
_BWD = {"reference": _ref_bwd, "cpu": native.on_cpu_module(_native_bwd),
        "cuda": native.on_cuda_module(_native_bwd), "triton": _triton("backward")}
_KD_FWD = {"reference": _ref_kd_fwd, "cpu": native.on_cpu_module(_native_kd_fwd),
           "cuda": native.on_cuda_module(_native_kd_fwd), "triton": _triton("kd_forward")}
_KD_BWD = {"reference": _ref_kd_bwd, "cpu": native.on_cpu_module(_native_kd_bwd),
           "cuda": native.on_cuda_module(_native_kd_bwd), "triton": _triton("kd_backward")}


# ----------------------------------------------------------------------------------------------------
# torch.library registration

@eager.custom_op("flashdistill::attention_fwd")
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    _qkv(OP, ("q", "k", "v"), q, k, v)
    return _FWD[backends.resolve(OP, backend, q.device, IMPLEMENTED)](q, k, v, causal, scale)


@_fwd_op.register_fake
def _(q, k, v, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=checks.compute_dtype(q.dtype))


@eager.custom_op("flashdistill::attention_bwd")
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, causal: bool, scale: float,
            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _BWD[backends.resolve(OP, backend, q.device, IMPLEMENTED)](q, k, v, out, dout, lse, causal, scale)


@_bwd_op.register_fake
def _(q, k, v, out, dout, lse, causal, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:  # only lse was used; it carries no gradient (the public op detaches it)
        return None, None, None, None, None, None
    dq, dk, dv = _bwd_op(q, k, v, out, dout, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@eager.custom_op("flashdistill::attention_kd_fwd")
def _kd_fwd_op(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, causal: bool, scale_s: float, scale_t: float,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_kd(KD_OP, q_s, k_s, q_t, k_t, causal, scale_s, scale_t)
    return _KD_FWD[backends.resolve(KD_OP, backend, q_s.device, IMPLEMENTED)](q_s, k_s, q_t, k_t, causal, scale_s,
                                                                             scale_t)


@_kd_fwd_op.register_fake
def _(q_s, k_s, q_t, k_t, causal, scale_s, scale_t, backend):
    cd = checks.compute_dtype(q_s.dtype)
    return tuple(q_s.new_empty(q_s.shape[:3], dtype=cd) for _ in range(3))


@eager.custom_op("flashdistill::attention_kd_bwd")
def _kd_bwd_op(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, lse_s: Tensor, lse_t: Tensor, g: Tensor,
               causal: bool, scale_s: float, scale_t: float, backend: str) -> tuple[Tensor, Tensor]:
    return _KD_BWD[backends.resolve(KD_OP, backend, q_s.device, IMPLEMENTED)](q_s, k_s, q_t, k_t, lse_s, lse_t, g,
                                                                             causal, scale_s, scale_t)


@_kd_bwd_op.register_fake
def _(q_s, k_s, q_t, k_t, lse_s, lse_t, g, causal, scale_s, scale_t, backend):
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def _kd_setup(ctx, inputs, output):
    q_s, k_s, q_t, k_t, causal, scale_s, scale_t, backend = inputs
    _, lse_s, lse_t = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, lse_s, lse_t)
    ctx.args = (causal, scale_s, scale_t, backend)
    ctx.set_materialize_grads(False)


def _kd_backward(ctx, g, _g_lse_s, _g_lse_t):
    if g is None:
        return (None,) * 8
    q_s, k_s, q_t, k_t, lse_s, lse_t = ctx.saved_tensors
    dq, dk = _kd_bwd_op(q_s, k_s, q_t, k_t, lse_s, lse_t, g.contiguous(), *ctx.args)
    return dq, dk, None, None, None, None, None, None


_kd_fwd_op.register_autograd(_kd_backward, setup_context=_kd_setup)
