"""The KD reference (kernels/kd/reference.py) against closed forms: values, the logit gradients of
../shared/research/llm_kd.md Sec. 1, the JSD endpoints, temperature and masking conventions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashdistill.kernels.kd import reference as kd


def logits(n=5, V=37, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, V, generator=g, dtype=torch.float64) * scale for _ in range(2))


def grad_u(kind, z, t, T=1.0, **kw):
    """dL/du (u = z / T) of the per-row divergence, by autograd."""
    z = z.clone().requires_grad_(True)
    kd.token_divergence(z, t, kind, temperature=T, **kw).sum().backward()
    return z.grad * T


def test_forward_kl_is_kl_div_teacher_student():
    z, t = logits()
    ref = F.kl_div(F.log_softmax(z, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd.token_divergence(z, t, "forward_kl"), ref)
    assert torch.all(kd.token_divergence(z, t, "reverse_kl") >= 0)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_gradients_match_the_closed_forms(T):
    z, t = logits(seed=1)
    q, p = F.softmax(z / T, -1), F.softmax(t / T, -1)
    lq, lp = q.log(), p.log()
    torch.testing.assert_close(grad_u("forward_kl", z, t, T), q - p)
    rkl = (q * (lq - lp)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad_u("reverse_kl", z, t, T), q * (lq - lp - rkl))
    beta = 0.3
    m = beta * p + (1 - beta) * q
    klqm = (q * (lq - m.log())).sum(-1, keepdim=True)
    torch.testing.assert_close(grad_u("jsd", z, t, T, beta=beta), (1 - beta) * q * (lq - m.log() - klqm))
    s = 0.5 * torch.sign(q - p)
    torch.testing.assert_close(grad_u("tvd", z, t, T), q * (s - (q * s).sum(-1, keepdim=True)))
    a = 0.1
    m = a * p + (1 - a) * q
    torch.testing.assert_close(grad_u("skew_forward_kl", z, t, T, alpha=a),
                               (1 - a) * q * ((q * p / m).sum(-1, keepdim=True) - p / m))
    lam = 0.25
    torch.testing.assert_close(grad_u("mixed", z, t, T, lam=lam),
                               lam * (q - p) + (1 - lam) * q * (lq - lp - rkl))


def test_taid_interpolates_teacher_and_detached_student():
    z, t = logits(seed=2)
    torch.testing.assert_close(kd.token_divergence(z, t, "taid", lam=1.0), kd.token_divergence(z, t, "forward_kl"))
    lam = torch.full((5,), 0.4, dtype=torch.float64)
    q = F.softmax(z, -1)
    p_lam = F.softmax(0.4 * t + 0.6 * z, -1)
    torch.testing.assert_close(grad_u("taid", z, t, lam=lam), q - p_lam)


def test_jsd_endpoints_and_normalized_continuity():
    z, t = logits(seed=3)
    fkl, rkl = kd.token_divergence(z, t, "forward_kl"), kd.token_divergence(z, t, "reverse_kl")
    torch.testing.assert_close(kd.token_divergence(z, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(kd.token_divergence(z, t, "jsd", beta=1.0), rkl)
    # JSD_beta -> 0 at both ends (the discontinuity every library special-cases) ...
    assert kd.token_divergence(z, t, "jsd", beta=1e-6).abs().max() < 1e-4
    # ... while the normalized form moves continuously from forward to reverse KL
    torch.testing.assert_close(kd.token_divergence(z, t, "jsd_normalized", beta=1e-7), fkl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.token_divergence(z, t, "jsd_normalized", beta=1 - 1e-7), rkl, rtol=1e-5, atol=1e-6)


def test_kd_loss_masking_temperature_and_hard_label():
    z, t = logits(n=6, seed=4)
    labels = torch.tensor([3, -100, 5, 0, -100, 36])
    T = 2.0
    loss, soft, hard = kd.kd_loss(z, t, kind="forward_kl", temperature=T, t_squared=True, labels=labels,
                                  hard_weight=0.5, soft_weight=1.0)
    keep = labels != -100
    d = kd.token_divergence(z[keep], t[keep], "forward_kl", temperature=T) * T**2
    torch.testing.assert_close(soft, d.mean())
    torch.testing.assert_close(hard, F.cross_entropy(z[keep], labels[keep]))  # untempered student logits
    torch.testing.assert_close(loss, soft + 0.5 * hard)
    # a global normalizer (gradient accumulation) replaces the local count
    loss_n, _, _ = kd.kd_loss(z, t, temperature=T, labels=labels, normalizer=torch.tensor(8.0))
    torch.testing.assert_close(loss_n, kd.token_divergence(z[keep], t[keep], "forward_kl", temperature=T).sum() / 8)


def test_kd_loss_all_masked_is_zero_with_zero_gradient():
    z, t = logits(n=3, seed=5)
    z = z.clone().requires_grad_(True)
    loss, _, _ = kd.kd_loss(z, t, labels=torch.full((3,), -100), hard_weight=1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_unknown_divergence():
    z, t = logits()
    with pytest.raises(ValueError, match="kind='kl' is not one of"):
        kd.token_divergence(z, t, "kl")


def _topk(t, k, T_gen=1.0):
    lp = F.log_softmax(t / T_gen, -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_modes_gradients(T):
    """The closed-form student gradients of the three top-k modes (llm_kd.md Sec. 1.1)."""
    z, t = logits(n=4, V=23, seed=6)
    ids, lp = _topk(t, 5)
    mask = torch.zeros_like(z, dtype=torch.bool).scatter(-1, ids, True)
    q = F.softmax(z / T, -1)
    p_S = torch.zeros_like(z).scatter(-1, ids, lp.exp())
    P_S = p_S.sum(-1, keepdim=True)
    Q_S = (q * mask).sum(-1, keepdim=True)
    expect = {
        "renorm_teacher": q - p_S / P_S,
        "renorm_both": torch.where(mask, q / Q_S - p_S / P_S, torch.zeros_like(q)),
        "tail_bucket": q - torch.where(mask, p_S, (1 - P_S) * q / (1 - Q_S)),
    }
    for mode, g in expect.items():
        zz = z.clone().requires_grad_(True)
        kd.topk_forward_kl(zz, ids, lp, mode=mode, temperature=T).sum().backward()
        torch.testing.assert_close(zz.grad * T, g, msg=mode)


def test_topk_with_every_token_is_full_forward_kl():
    z, t = logits(n=3, V=11, seed=7)
    ids, lp = _topk(t, 11)
    full = kd.token_divergence(z, t, "forward_kl")
    for mode in kd.TOPK_MODES:
        torch.testing.assert_close(kd.topk_forward_kl(z, ids, lp, mode=mode), full, atol=1e-12, rtol=1e-9)


def test_topk_generation_temperature_correction():
    """Log-probs stored at T_gen, distilled at T: equal to storing the teacher at T directly."""
    z, t = logits(n=3, V=13, seed=8)
    ids, lp_gen = _topk(t, 13, T_gen=0.7)
    direct = kd.token_divergence(z, t, "forward_kl", temperature=1.8)
    corrected = kd.topk_forward_kl(z, ids, lp_gen, mode="renorm_teacher", temperature=1.8, gen_temperature=0.7)
    torch.testing.assert_close(corrected, direct)
    with pytest.raises(ValueError, match="mode='drop' is not one of"):
        kd.topk_forward_kl(z, ids, lp_gen, mode="drop")


@pytest.mark.parametrize("kind", [k for k in kd.DIVERGENCES if k != "taid"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_token_grad_is_the_autograd_gradient(kind, beta):
    z, t = logits(seed=9)
    zz = z.clone().requires_grad_(True)
    kw = dict(temperature=1.7, beta=beta, alpha=0.2, lam=0.6)
    kd.token_divergence(zz, t, kind, **kw).sum().backward()
    torch.testing.assert_close(kd.token_grad(z, t, kind, **kw), zz.grad)
