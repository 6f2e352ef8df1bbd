"""Logit knowledge-distillation divergences in plain PyTorch: the spec of issue #4's kernels.

Per token (one row of V logits), student logits z, teacher logits t, temperature T > 0, u = z / T,
v = t / T, q = softmax(u) (student), p = softmax(v) (teacher). Argument order is always (student,
teacher); "forward" KL is KL(teacher || student) (Hinton et al. 2015; the convention of TRL, Liger
and Unsloth: jsd with beta = 0 is forward KL, beta = 1 reverse KL). Derivations and the survey of
existing implementations: ../shared/research/llm_kd.md Sec. 1.

    forward_kl      KL(p || q) = sum p (log p - log q)                                dL/du = q - p
    reverse_kl      KL(q || p) = sum q (log q - log p)                  dL/du = q (log q - log p - KL)
    jsd             beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q    (GKD, Agarwal
                    et al. 2024); beta = 0 and 1 are forward and reverse KL (the limits are 0, so every
                    library special-cases them; so does this one)
    jsd_normalized  jsd / (beta (1 - beta)): continuous in beta from forward KL (beta -> 0) to reverse
                    KL (beta -> 1)
    skew_forward_kl KL(p || alpha p + (1 - alpha) q)    (DistiLLM, Ko et al. 2024; alpha = 0.1 default)
    skew_reverse_kl KL(q || (1 - alpha) p + alpha q)
    tvd             0.5 sum |p - q|
    mixed           lam KL(p || q) + (1 - lam) KL(q || p)
    taid            KL(p_lam || q), p_lam = softmax(lam v + (1 - lam) sg(u))      (TAID, Shing et al.
                    2025; lam a tensor, scheduled by the caller)

Stored top-k teachers (``topk_forward_kl``): forward KL against k teacher log-probs per token, with the
missing mass handled by renormalising the teacher, both, or a (k + 1)-th "tail" bucket, and stored
log-probs re-tempered from the generation temperature.

Temperature: the divergence is taken between the tempered distributions; with ``t_squared`` the loss
is multiplied by T^2 (Hinton's convention: DistillKit, axolotl), without it not (Liger, TRL, Unsloth).
The hard-label cross-entropy uses the untempered student logits (every library checked does).
Everything is computed in float32 or better (float64 for float64 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "jsd_normalized", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "mixed", "taid")


def _kl(logp, logq):
    """KL(P || Q) per row from log-probabilities (0 log 0 = 0; where P = 0 both logs are replaced
    before the product, so that an infinite log there gives neither NaN nor a NaN gradient)."""
    P = logp.exp()
    has = P > 0
    zero = torch.zeros_like(P)
    return (P * (torch.where(has, logp, zero) - torch.where(has, logq, zero))).sum(-1)


def token_divergence(student, teacher, kind: str, *, temperature: float = 1.0, beta: float = 0.5,
                     alpha: float = 0.1, lam=0.5):
    """The divergence per row of [..., V] logits, in float32 (float64 for float64 input)."""
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    u, v = student.to(cd) / temperature, teacher.to(cd) / temperature
    logq, logp = F.log_softmax(u, -1), F.log_softmax(v, -1)
    if kind == "forward_kl":
        return _kl(logp, logq)
    if kind == "reverse_kl":
        return _kl(logq, logp)
    if kind in ("jsd", "jsd_normalized"):
        if beta == 0.0:  # the limits: forward KL (jsd / beta and jsd_normalized tend to it as beta -> 0)
            return _kl(logp, logq)
        if beta == 1.0:
            return _kl(logq, logp)
        logm = torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(beta, dtype=cd)),
                                            logq + torch.log(torch.tensor(1 - beta, dtype=cd))]), dim=0)
        d = beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
        return d / (beta * (1 - beta)) if kind == "jsd_normalized" else d
    if kind == "skew_forward_kl":
        logm = torch.log(alpha * logp.exp() + (1 - alpha) * logq.exp())
        return _kl(logp, logm)
    if kind == "skew_reverse_kl":
        logm = torch.log((1 - alpha) * logp.exp() + alpha * logq.exp())
        return _kl(logq, logm)
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    if kind == "mixed":
        return lam * _kl(logp, logq) + (1 - lam) * _kl(logq, logp)
    if kind == "taid":
        lam_t = lam.to(cd) if isinstance(lam, torch.Tensor) else torch.tensor(lam, dtype=cd, device=u.device)
        lam_t = lam_t.reshape(lam_t.shape + (1,) * (u.dim() - lam_t.dim())) if lam_t.dim() else lam_t
        ud = u.detach()
        mix = torch.where(lam_t == 1, v, torch.where(lam_t == 0, ud, lam_t * v + (1 - lam_t) * ud))  # exact ends
        logp_lam = F.log_softmax(mix, -1)
        return _kl(logp_lam, logq)
    raise ValueError(f"token_divergence: kind={kind!r} is not one of {', '.join(DIVERGENCES)}")


def kd_loss(student, teacher, *, kind: str = "forward_kl", temperature: float = 1.0, t_squared: bool = False,
            beta: float = 0.5, alpha: float = 0.1, lam=0.5, labels=None, ignore_index: int = -100,
            hard_weight: float = 0.0, soft_weight: float = 1.0, normalizer=None):
    """Mean over valid tokens of soft_weight * D (x T^2 with t_squared) + hard_weight * CE(z, label).

    student, teacher: [N, V] logits; labels [N] (tokens equal to ignore_index are masked out of both
    terms; without labels every token counts). normalizer: the divisor (e.g. a global valid-token
    count, a tensor); default the number of valid tokens, and a loss of 0 when none is valid.
    Returns (loss, soft, hard), each a 0-d tensor in the compute dtype.
    """
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    d = token_divergence(student, teacher, kind, temperature=temperature, beta=beta, alpha=alpha, lam=lam)
    if t_squared:
        d = d * temperature**2
    valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) if labels is None \
        else labels != ignore_index
    if labels is not None and hard_weight != 0.0:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        ce = F.cross_entropy(student.to(cd), safe, reduction="none")
    else:
        ce = torch.zeros_like(d)
    zero = torch.zeros((), dtype=cd, device=student.device)
    n = valid.sum().to(cd) if normalizer is None else torch.as_tensor(normalizer, dtype=cd, device=student.device)
    n = torch.where(n > 0, n, torch.ones_like(n))  # every token masked: a loss of 0, not 0 / 0
    soft = torch.where(valid, d, zero).sum() / n
    hard = torch.where(valid, ce, zero).sum() / n
    return soft_weight * soft + hard_weight * hard, soft, hard


TOPK_MODES = ("renorm_teacher", "renorm_both", "tail_bucket")


def topk_forward_kl(student, ids, logprobs, *, mode: str = "tail_bucket", temperature: float = 1.0,
                    gen_temperature: float | None = None):
    """Forward KL per row against a stored top-k teacher (ids [N, K], log-probs [N, K]).

    With P_S = sum_S exp(l), q the tempered student softmax and Q_S = sum_S q (llm_kd.md Sec. 1.1):
      renorm_teacher  p~ = exp(l) / P_S on S:          L = sum_S p~ (log p~ - log q)   (dense gradient)
      renorm_both     q~ = q / Q_S on S too:            L = sum_S p~ (log p~ - log q~)
      tail_bucket     (K + 1)-way: (p_S, 1 - P_S) vs (q_S, 1 - Q_S)
    gen_temperature: the log-probs were stored at T_gen; at distillation temperature T the teacher is
    p ∝ p_gen^(T_gen / T) (the tail mass raised to the same power in tail_bucket), renormalised.
    """
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    logq = F.log_softmax(student.to(cd) / temperature, -1)
    logq_S = logq.gather(-1, ids)
    lp = logprobs.to(cd)
    log_tail_p = torch.log1p(-lp.exp().sum(-1).clamp(max=1.0))
    if gen_temperature is not None:
        r = gen_temperature / temperature
        lp, log_tail_p = r * lp, r * log_tail_p
    if mode == "tail_bucket":
        z = torch.logsumexp(torch.cat([lp, log_tail_p.unsqueeze(-1)], -1), -1, keepdim=True)
        lp, log_tail_p = lp - z, log_tail_p - z.squeeze(-1)
        log_tail_q = torch.log1p(-logq_S.exp().sum(-1).clamp(max=1.0))
        tail = torch.where(log_tail_p > float("-inf"), log_tail_p.exp() * (log_tail_p - log_tail_q),
                           torch.zeros_like(log_tail_p))
        return (lp.exp() * (lp - logq_S)).sum(-1) + tail
    lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    if mode == "renorm_teacher":
        return (lp.exp() * (lp - logq_S)).sum(-1)
    if mode == "renorm_both":
        return (lp.exp() * (lp - (logq_S - torch.logsumexp(logq_S, -1, keepdim=True)))).sum(-1)
    raise ValueError(f"topk_forward_kl: mode={mode!r} is not one of {', '.join(TOPK_MODES)}")


def token_grad(student, teacher, kind: str, *, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
               lam=0.5):
    """d token_divergence / d student logits in closed form (llm_kd.md Sec. 1's table; tests check it
    against autograd of ``token_divergence``), in float32 (float64 for float64 input)."""
    cd = torch.float64 if student.dtype == torch.float64 else torch.float32
    T = temperature
    u, v = student.to(cd) / T, teacher.to(cd) / T
    logq, logp = F.log_softmax(u, -1), F.log_softmax(v, -1)
    q, p = logq.exp(), logp.exp()

    def softmax_jvp(a):  # d/du of sum f(q) with a = df/dq: q (a - sum q a); q a = 0 where q = 0
        a = torch.where(q > 0, a, torch.zeros_like(a))
        return q * (a - (q * a).sum(-1, keepdim=True))

    def rkl_grad():
        return softmax_jvp(logq - logp)

    if kind == "forward_kl" or (kind in ("jsd", "jsd_normalized") and beta == 0.0):
        g = q - p
    elif kind == "reverse_kl" or (kind in ("jsd", "jsd_normalized") and beta == 1.0):
        g = rkl_grad()
    elif kind in ("jsd", "jsd_normalized"):
        logm = torch.log(beta * p + (1 - beta) * q)
        g = (1 - beta) * softmax_jvp(logq - logm)
        if kind == "jsd_normalized":
            g = g / (beta * (1 - beta))
    elif kind == "tvd":
        g = softmax_jvp(0.5 * torch.sign(q - p))
    elif kind == "skew_forward_kl":
        m = alpha * p + (1 - alpha) * q
        g = (1 - alpha) * softmax_jvp(-p / m)
    elif kind == "skew_reverse_kl":
        m = (1 - alpha) * p + alpha * q
        g = softmax_jvp(logq - torch.log(m) - alpha * q / m)
    elif kind == "mixed":
        g = lam * (q - p) + (1 - lam) * rkl_grad()
    elif kind == "taid":  # forward KL to a target that depends on u only through sg(u): q - p_lam
        lam_t = torch.as_tensor(lam, dtype=cd, device=u.device)
        mix = torch.where(lam_t == 1, v, torch.where(lam_t == 0, u, lam_t * v + (1 - lam_t) * u))
        g = q - torch.softmax(mix, -1)
    else:
        raise ValueError(f"token_grad: kind={kind!r} is not one of {', '.join(DIVERGENCES)}")
    return g / T
