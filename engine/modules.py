"""Every public loss of flashdistill as a ``torch.nn.Module``, to drop into any training loop.

The convention is that of ``torch.nn.KLDivLoss`` and ``torch.nn.CrossEntropyLoss``:

* The constructor takes the functional op's configuration: its keyword options that are plain values
  (scales, strings, flags, ``backend``), keyword-only, with the op's names and defaults, stored as
  attributes of the same names. ``forward`` takes the per-call data, the tensors of one batch
  (predictions, logits, labels, per-sample weights, x_t and the schedule's alpha and sigma), with the
  op's names and positions: ``DMDLoss(guidance=4.5)(x, real, fake, real_uncond=u)`` is
  ``dmd_loss(x, real, fake, real_uncond=u, guidance=4.5)``.
* forward calls the functional op and computes nothing itself, so a module gives the op's values and
  gradients bit for bit (same kernels) and traces into the same graph under ``torch.compile``.
* A loss module holds no state: no parameters, no buffers (its ``state_dict`` is empty) and no
  tensors (a tensor given to a constructor is an error, as it would follow neither ``.to()`` nor
  ``state_dict``). ``FusedLinearKDLoss`` does not own the LM head: forward takes its weight and bias,
  so the head stays the model's own ``nn.Linear`` (``loss(h, head.weight, student_bias=head.bias, ...)``).
* An option that is a constant in most runs but may change per sample or per step (the guidance
  scales, SIM's ``a`` and ``c``, the KD ``lam``) is configured as a float and can be overridden for
  one call by the forward keyword of the same name (a float, or the per-sample / scheduled tensor);
  left at None, the configured value is used. A float is baked into a compiled graph: pass a tensor
  per call when the value changes every step.
* The constructor validates what it can without tensors, with the op's own lists and checks, under
  the class name (``KDLoss: divergence='foo' is not one of forward_kl, ...``): every string option,
  the backend name, and the numeric options whose check the op exposes (the KD family's). The rest
  (ranges that the op checks inline, everything that depends on the inputs) is checked by the op at
  the first call, under the op's name.
* ``extra_repr`` lists every option; ``options()`` returns them as the keyword arguments the op gets.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from flashdistill.kernels import kd, params, regression, score_diff, score_identity
from flashdistill.kernels.attention import REDUCTIONS as ATTENTION_REDUCTIONS, attention_kd_loss
from flashdistill.kernels.backends import BACKENDS
from flashdistill.kernels.kd import topk

__all__ = ["DMDLoss", "SDSLoss", "VSDLoss", "SiDLoss", "SIMLoss", "SFDLoss", "ConsistencyLoss", "DSMLoss", "KDLoss",
           "FusedLinearKDLoss", "TopKKDLoss", "AttentionKDLoss"]


class _LossModule(nn.Module):
    """The configuration of one functional op (``_fn``), and the call that passes it (module docstring).

    Subclasses declare ``_fn`` and ``_PER_CALL`` (the options forward may override), pass their options
    to ``__init__`` in the op's order, and call ``_call`` from an explicit forward.
    """

    _PER_CALL: tuple[str, ...] = ()

    def __init__(self, **options):
        """Stores the configuration (keyword-only, the op's names and defaults) as attributes and checks it."""
        super().__init__()
        name = type(self).__name__
        for key, value in options.items():
            if isinstance(value, Tensor):
                hint = f"; pass the tensor per call, forward(..., {key}=...)" if key in self._PER_CALL else ""
                raise TypeError(f"{name}: {key} must be a plain value in the constructor, got a tensor (a loss module "
                                f"holds no tensors){hint}")
            setattr(self, key, value)
        self._option_names = tuple(options)
        backend = options["backend"]
        if backend is not None and backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"{name}: backend={backend!r} is not a backend; choose one of None, auto, "
                             f"{', '.join(BACKENDS)}")

    def _check_choice(self, key: str, choices) -> None:
        value = getattr(self, key)
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{type(self).__name__}: {key}={value!r} is not one of {', '.join(choices)}")

    def options(self) -> dict:
        """The configuration, as the keyword arguments the functional op gets."""
        return {key: getattr(self, key) for key in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options().items())

    def forward(self, *args, **kwargs):
        """The functional op on this batch with the module's configuration (the class docstring names the op)."""
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def _call(self, *args, **per_call):
        """The op on ``args`` with the configuration; a per-call option left at None keeps its configured value."""
        kwargs = self.options()
        for key, value in per_call.items():
            if value is not None or key not in kwargs:
                kwargs[key] = value
        return self._fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# score distillation, gradient to the generator output x only (flashdistill.kernels.score_diff)

class DMDLoss(_LossModule):
    """Module form of ``flashdistill.dmd_loss``: the DMD / DMD2 generator loss (gradient to x only).

    forward(x, real, fake, *, real_uncond=None, guidance=None, weight=None, x_t=None, alpha=None,
            sigma=None) -> 0-d loss

    ``guidance`` in forward (a float or a per-sample [B] tensor) overrides the configured scale for one
    call. Per batch: ``weight`` (f-distill: ``fdiv_weight(logits)``), and with ``space`` != "x0" the
    noisy input ``x_t`` and the schedule's ``alpha``, ``sigma``. The math and every argument:
    ``help(flashdistill.dmd_loss)``.
    """

    _fn = staticmethod(score_diff.dmd_loss)
    _PER_CALL = ("guidance",)

    def __init__(self, *, guidance: Optional[float] = None, cfg: str = "ho", eps: float = 0.0, space: str = "x0",
                 sigma_data: float = 0.5, clip: Optional[float] = None, backend: Optional[str] = None):
        super().__init__(guidance=guidance, cfg=cfg, eps=eps, space=space, sigma_data=sigma_data, clip=clip,
                         backend=backend)
        self._check_choice("cfg", params.CFG_CONVENTIONS)
        self._check_choice("space", params.SPACES)

    def forward(self, x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None, guidance=None,
                weight=None, x_t: Optional[Tensor] = None, alpha=None, sigma=None) -> Tensor:
        return self._call(x, real, fake, real_uncond=real_uncond, guidance=guidance, weight=weight, x_t=x_t,
                          alpha=alpha, sigma=sigma)


class SDSLoss(_LossModule):
    """Module form of ``flashdistill.sds_loss``: DreamFusion's score distillation sampling.

    forward(x, pred, noise, *, pred_uncond=None, guidance=None, weight=None) -> 0-d loss

    ``guidance`` in forward overrides the configured scale for one call; ``weight`` is w(t) per sample.
    The math and every argument: ``help(flashdistill.sds_loss)``.
    """

    _fn = staticmethod(score_diff.sds_loss)
    _PER_CALL = ("guidance",)

    def __init__(self, *, guidance: Optional[float] = None, cfg: str = "ho", clip: Optional[float] = None,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(guidance=guidance, cfg=cfg, clip=clip, reduction=reduction, backend=backend)
        self._check_choice("cfg", params.CFG_CONVENTIONS)
        self._check_choice("reduction", score_diff.REDUCTIONS)

    def forward(self, x: Tensor, pred: Tensor, noise: Tensor, *, pred_uncond: Optional[Tensor] = None, guidance=None,
                weight=None) -> Tensor:
        return self._call(x, pred, noise, pred_uncond=pred_uncond, guidance=guidance, weight=weight)


class VSDLoss(_LossModule):
    """Module form of ``flashdistill.vsd_loss``: ProlificDreamer VSD / SwiftBrush.

    forward(x, real, fake, *, real_uncond=None, fake_uncond=None, guidance=None, fake_guidance=None,
            weight=None) -> 0-d loss

    ``guidance`` / ``fake_guidance`` in forward override the configured scales for one call.
    The math and every argument: ``help(flashdistill.vsd_loss)``.
    """

    _fn = staticmethod(score_diff.vsd_loss)
    _PER_CALL = ("guidance", "fake_guidance")

    def __init__(self, *, guidance: Optional[float] = None, fake_guidance: Optional[float] = None, cfg: str = "ho",
                 space: str = "eps", clip: Optional[float] = None, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__(guidance=guidance, fake_guidance=fake_guidance, cfg=cfg, space=space, clip=clip,
                         reduction=reduction, backend=backend)
        self._check_choice("cfg", params.CFG_CONVENTIONS)
        self._check_choice("space", params.SPACES)
        self._check_choice("reduction", score_diff.REDUCTIONS)

    def forward(self, x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
                fake_uncond: Optional[Tensor] = None, guidance=None, fake_guidance=None, weight=None) -> Tensor:
        return self._call(x, real, fake, real_uncond=real_uncond, fake_uncond=fake_uncond, guidance=guidance,
                          fake_guidance=fake_guidance, weight=weight)


# ----------------------------------------------------------------------------------------------------
# score identity, gradient to x and through both predictions (flashdistill.kernels.score_identity)

class SiDLoss(_LossModule):
    """Module form of ``flashdistill.sid_loss``: Score identity Distillation (SiD, SiD-LSG guidance).

    forward(x, real, fake, *, real_uncond=None, fake_uncond=None, guidance=None, fake_guidance=None)
        -> 0-d loss

    real and fake are x0 predictions computed with autograd (the loss differentiates through them).
    ``guidance`` / ``fake_guidance`` in forward override the configured scales for one call.
    The math and every argument: ``help(flashdistill.sid_loss)``.
    """

    _fn = staticmethod(score_identity.sid_loss)
    _PER_CALL = ("guidance", "fake_guidance")

    def __init__(self, *, guidance: Optional[float] = None, fake_guidance: Optional[float] = None, cfg: str = "ho",
                 alpha: float = 1.2, eps: float = 1e-5, scale: Optional[float] = None, nan_policy: str = "propagate",
                 backend: Optional[str] = None):
        super().__init__(guidance=guidance, fake_guidance=fake_guidance, cfg=cfg, alpha=alpha, eps=eps, scale=scale,
                         nan_policy=nan_policy, backend=backend)
        self._check_choice("cfg", params.CFG_CONVENTIONS)
        self._check_choice("nan_policy", score_identity.NAN_POLICIES)

    def forward(self, x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
                fake_uncond: Optional[Tensor] = None, guidance=None, fake_guidance=None) -> Tensor:
        return self._call(x, real, fake, real_uncond=real_uncond, fake_uncond=fake_uncond, guidance=guidance,
                          fake_guidance=fake_guidance)


class SIMLoss(_LossModule):
    """Module form of ``flashdistill.sim_loss``: Score Implicit Matching's pseudo-Huber surrogate.

    forward(x, real, fake, *, real_uncond=None, fake_uncond=None, guidance=None, fake_guidance=None,
            a=None, c=None) -> 0-d loss

    ``a`` (the x0-to-score factor, e.g. alpha_t^2 / sigma_t^4: usually a per-sample [B] tensor),
    ``c`` and the guidance scales in forward override the configured values for one call.
    The math and every argument: ``help(flashdistill.sim_loss)``.
    """

    _fn = staticmethod(score_identity.sim_loss)
    _PER_CALL = ("guidance", "fake_guidance", "a", "c")

    def __init__(self, *, guidance: Optional[float] = None, fake_guidance: Optional[float] = None, cfg: str = "ho",
                 a: float = 1.0, c: float = 1.0, scale: Optional[float] = None, nan_policy: str = "propagate",
                 backend: Optional[str] = None):
        super().__init__(guidance=guidance, fake_guidance=fake_guidance, cfg=cfg, a=a, c=c, scale=scale,
                         nan_policy=nan_policy, backend=backend)
        self._check_choice("cfg", params.CFG_CONVENTIONS)
        self._check_choice("nan_policy", score_identity.NAN_POLICIES)

    def forward(self, x: Tensor, real: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
                fake_uncond: Optional[Tensor] = None, guidance=None, fake_guidance=None, a=None, c=None) -> Tensor:
        return self._call(x, real, fake, real_uncond=real_uncond, fake_uncond=fake_uncond, guidance=guidance,
                          fake_guidance=fake_guidance, a=a, c=c)


class SFDLoss(SiDLoss):
    """Module form of ``flashdistill.sfd_loss``: Score Forgetting Distillation's forget term (SiD's loss
    with the teacher queried at the remapped safe class); SiDLoss's options.

    forward(x, real_safe, fake, *, real_uncond=None, fake_uncond=None, guidance=None, fake_guidance=None)
        -> 0-d loss

    The math and every argument: ``help(flashdistill.sfd_loss)`` and ``help(flashdistill.sid_loss)``.
    """

    _fn = staticmethod(score_identity.sfd_loss)

    def forward(self, x: Tensor, real_safe: Tensor, fake: Tensor, *, real_uncond: Optional[Tensor] = None,
                fake_uncond: Optional[Tensor] = None, guidance=None, fake_guidance=None) -> Tensor:
        return self._call(x, real_safe, fake, real_uncond=real_uncond, fake_uncond=fake_uncond, guidance=guidance,
                          fake_guidance=fake_guidance)


# ----------------------------------------------------------------------------------------------------
# regression, gradient to the prediction (flashdistill.kernels.regression)

class ConsistencyLoss(_LossModule):
    """Module form of ``flashdistill.consistency_loss``: consistency distillation (LCM / CD, iCT / ECT).

    forward(pred, target, *, weight=None) -> 0-d loss

    ``weight``: lambda_b per sample (a float or a [B] tensor, e.g. 1 / (t - r)). ``c=None`` takes the
    kind's default. The math and every argument: ``help(flashdistill.consistency_loss)``.
    """

    _fn = staticmethod(regression.consistency_loss)

    def __init__(self, *, kind: str = "l2", c: Optional[float] = None, backend: Optional[str] = None):
        super().__init__(kind=kind, c=c, backend=backend)
        self._check_choice("kind", regression.KINDS)

    def forward(self, pred: Tensor, target: Tensor, *, weight=None) -> Tensor:
        return self._call(pred, target, weight=weight)


class DSMLoss(_LossModule):
    """Module form of ``flashdistill.dsm_loss``: denoising score matching, the fake-score (critic) loss.

    forward(pred, x0, noise=None, *, alpha=None, sigma=None, weight=None) -> 0-d loss

    ``alpha``, ``sigma`` (target="v") and ``weight`` are per batch (floats or [B] tensors).
    The math and every argument: ``help(flashdistill.dsm_loss)``.
    """

    _fn = staticmethod(regression.dsm_loss)

    def __init__(self, *, target: str = "eps", reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(target=target, reduction=reduction, backend=backend)
        self._check_choice("target", regression.TARGETS)
        self._check_choice("reduction", regression.REDUCTIONS)

    def forward(self, pred: Tensor, x0: Tensor, noise: Optional[Tensor] = None, *, alpha=None, sigma=None,
                weight=None) -> Tensor:
        return self._call(pred, x0, noise, alpha=alpha, sigma=sigma, weight=weight)


# ----------------------------------------------------------------------------------------------------
# language-model logit distillation (flashdistill.kernels.kd)

class KDLoss(_LossModule):
    """Module form of ``flashdistill.kd_loss``: distillation between student and teacher logits.

    forward(student_logits, teacher_logits, *, labels=None, normalizer=None, lam=None)
        -> 0-d loss, or (loss, soft, hard) with return_parts=True

    ``labels`` (int64, for the hard-label term and masking with ``ignore_index``) and ``normalizer``
    (e.g. the global token count under gradient accumulation) are per batch; ``lam`` in forward
    overrides the configured one (TAID's scheduled lam: a one-element tensor).
    The math and every argument: ``help(flashdistill.kd_loss)``.
    """

    _fn = staticmethod(kd.kd_loss)
    _PER_CALL = ("lam",)

    def __init__(self, *, divergence: str = "forward_kl", temperature: float = 1.0, t_squared: bool = False,
                 beta: float = 0.5, alpha: float = 0.1, lam: float = 0.5, ignore_index: int = -100,
                 hard_weight: float = 0.0, soft_weight: float = 1.0, vocab: str = "exact", process_group=None,
                 return_parts: bool = False, backend: Optional[str] = None):
        super().__init__(divergence=divergence, temperature=temperature, t_squared=t_squared, beta=beta, alpha=alpha,
                         lam=lam, ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                         vocab=vocab, process_group=process_group, return_parts=return_parts, backend=backend)
        kd.check_options(type(self).__name__, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
        self._check_choice("vocab", kd.VOCAB_MODES)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, *, labels: Optional[Tensor] = None,
                normalizer=None, lam=None):
        return self._call(student_logits, teacher_logits, labels=labels, normalizer=normalizer, lam=lam)


class FusedLinearKDLoss(_LossModule):
    """Module form of ``flashdistill.fused_linear_kd_loss``: the LM head and the distillation loss in
    one chunked op (no [tokens x V] logits).

    forward(student_hidden, student_weight, *, student_bias=None, teacher_logits=None,
            teacher_hidden=None, teacher_weight=None, teacher_bias=None, teacher_ids=None,
            teacher_logprobs=None, labels=None, normalizer=None, lam=None)
        -> 0-d loss, or (loss, soft, hard) with return_parts=True

    The module does not own the LM head: pass its weight (and bias) per call, e.g.
    ``loss(h, model.lm_head.weight, student_bias=model.lm_head.bias, teacher_logits=t)``, so the head
    stays a parameter of the model (tied embeddings, FSDP and the optimizer see it as before) and
    gets its gradient there. The teacher comes as one of teacher_logits, teacher_hidden +
    teacher_weight (+ teacher_bias), or teacher_ids + teacher_logprobs. ``lam`` in forward overrides
    the configured one (TAID). The math and every argument: ``help(flashdistill.fused_linear_kd_loss)``.
    """

    _fn = staticmethod(kd.fused_linear_kd_loss)
    _PER_CALL = ("lam",)

    def __init__(self, *, topk_mode: str = "tail_bucket", gen_temperature: Optional[float] = None, vocab: str = "exact",
                 divergence: str = "forward_kl", temperature: float = 1.0, t_squared: bool = False, beta: float = 0.5,
                 alpha: float = 0.1, lam: float = 0.5, ignore_index: int = -100, hard_weight: float = 0.0,
                 soft_weight: float = 1.0, softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 chunk_size: Optional[int] = None, pack_valid: Optional[bool] = None, process_group=None,
                 return_parts: bool = False, backend: Optional[str] = None):
        super().__init__(topk_mode=topk_mode, gen_temperature=gen_temperature, vocab=vocab, divergence=divergence,
                         temperature=temperature, t_squared=t_squared, beta=beta, alpha=alpha, lam=lam,
                         ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight, softcap=softcap,
                         teacher_softcap=teacher_softcap, chunk_size=chunk_size, pack_valid=pack_valid,
                         process_group=process_group, return_parts=return_parts, backend=backend)
        name = type(self).__name__
        kd.check_options(name, divergence, temperature, beta, alpha, lam, hard_weight, soft_weight)
        self._check_choice("vocab", kd.VOCAB_MODES)
        topk.topk_options(name, topk_mode, temperature, gen_temperature, 1, 2, "topk_mode")  # K < V: checks only

    def forward(self, student_hidden: Tensor, student_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                teacher_logits: Optional[Tensor] = None, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                teacher_ids: Optional[Tensor] = None, teacher_logprobs: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, normalizer=None, lam=None):
        return self._call(student_hidden, student_weight, student_bias=student_bias, teacher_logits=teacher_logits,
                          teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                          teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs, labels=labels,
                          normalizer=normalizer, lam=lam)


class TopKKDLoss(_LossModule):
    """Module form of ``flashdistill.topk_kd_loss``: forward KL to a stored top-k teacher.

    forward(student_logits, teacher_ids, teacher_logprobs, *, labels=None, normalizer=None)
        -> 0-d loss, or (loss, soft, hard) with return_parts=True

    The math and every argument: ``help(flashdistill.topk_kd_loss)``.
    """

    _fn = staticmethod(kd.topk_kd_loss)

    def __init__(self, *, mode: str = "tail_bucket", temperature: float = 1.0, gen_temperature: Optional[float] = None,
                 t_squared: bool = False, ignore_index: int = -100, hard_weight: float = 0.0, soft_weight: float = 1.0,
                 return_parts: bool = False, backend: Optional[str] = None):
        super().__init__(mode=mode, temperature=temperature, gen_temperature=gen_temperature, t_squared=t_squared,
                         ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight,
                         return_parts=return_parts, backend=backend)
        topk.topk_options(type(self).__name__, mode, temperature, gen_temperature, 1, 2)  # K < V: checks only

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                labels: Optional[Tensor] = None, normalizer=None):
        return self._call(student_logits, teacher_ids, teacher_logprobs, labels=labels, normalizer=normalizer)


# ----------------------------------------------------------------------------------------------------
# attention (flashdistill.kernels.attention)

class AttentionKDLoss(_LossModule):
    """Module form of ``flashdistill.attention_kd_loss``: KL(teacher || student) of the attention maps
    per query row (MiniLM), computed streaming; gradient to q_s and k_s.

    forward(q_s, k_s, q_t, k_t) -> 0-d loss, or the [B, H, Lq] rows with reduction="none"

    The math and every argument: ``help(flashdistill.attention_kd_loss)``.
    """

    _fn = staticmethod(attention_kd_loss)

    def __init__(self, *, causal: bool = False, scale_s: Optional[float] = None, scale_t: Optional[float] = None,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(causal=causal, scale_s=scale_s, scale_t=scale_t, reduction=reduction, backend=backend)
        self._check_choice("reduction", ATTENTION_REDUCTIONS)

    def forward(self, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor) -> Tensor:
        return self._call(q_s, k_s, q_t, k_t)
