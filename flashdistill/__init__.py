"""flashdistill: fused kernels for distillation, behind a thin engine.

Public API (every op takes ``backend=``; see ``flashdistill.kernels.backends``):

    score distillation, gradient to the generator output x only
        dmd_loss, sds_loss, vsd_loss, fdiv_weight (f-distill weights for dmd_loss)
    score identity, gradient to x and through the teacher and fake predictions
        sid_loss, sim_loss, sfd_loss
    regression: consistency distillation and the fake-score (critic) loss
        consistency_loss, dsm_loss
    parameterizations: to_x0, convert (eps / x0 / v / flow / trigflow)
    language-model logit distillation (forward/reverse KL, JSD, skew KL, TVD, mixed)
        kd_loss (logits), fused_linear_kd_loss (hidden states and LM head, chunked),
        topk_kd_loss (stored top-k teachers)
    noise and sampling: randn, rand, philox_bits, NoiseSource (one Philox stream on every backend);
        VPSchedule, EDMSchedule, FlowSchedule, TrigFlowSchedule, uniform_timesteps, lognormal_sigmas,
        logit_normal_times; q_sample, ddim_step, ddpm_step, dpmpp_2m_step, lcm_step, euler_step,
        heun_step, flow_euler_step (one fused kernel, guidance inside), sample (a whole few-step loop)
    attention: attention (flash forward/backward, GQA, causal), attention_kd_loss (streaming
        attention-map KL), sdpa and use_flashdistill_attention (drop-ins for SDPA)
    every loss as an nn.Module (DMDLoss, SDSLoss, ..., KDLoss, FusedLinearKDLoss, AttentionKDLoss):
        the op's options in the constructor, the tensors in forward (flashdistill.engine.modules)

Backends: ``reference`` (plain PyTorch, the spec), ``cpu`` (C++/OpenMP), ``triton``, ``cuda`` (C++).
``flashdistill.use_backend(name)`` and ``FLASHDISTILL_BACKEND`` set the default; ``auto`` picks the
fastest available for the tensors' device.
"""

__version__ = "0.1.0"

from flashdistill.kernels import *  # noqa: E402,F401,F403  (ops register with torch.library on import)
from flashdistill.kernels import __all__ as _ops  # noqa: E402
from flashdistill.engine.modules import *  # noqa: E402,F401,F403
from flashdistill.engine.modules import __all__ as _modules  # noqa: E402

__all__ = list(_ops) + list(_modules) + ["__version__"]
