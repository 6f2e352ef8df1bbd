"""The op layer: every op is a ``torch.library.custom_op`` named ``flashdistill::<op>``.

Each op family lives in its own package with a fixed layout: ``__init__.py`` (public functions,
contract, validation, backend dispatch and torch.library registration), ``reference.py`` (plain
PyTorch, the spec, with the paper it comes from), ``triton_kernel.py``; its C++ kernels are in
``csrc/cpu/<family>.cpp`` and ``csrc/cuda/<family>.cu``. Importing this package registers every op.

Score-distillation families (one kernel skeleton each, csrc/README.md):
    score_diff       K1, gradient to x only: dmd_loss, sds_loss, vsd_loss (+ fdiv_weight)
    score_identity   K2, gradient to x and both predictions: sid_loss, sim_loss, sfd_loss
    regression       K3/K5, gradient to the prediction: consistency_loss, dsm_loss
    attention        flash attention forward/backward, attention_kd_loss, sdpa (drop-in)
    params           prediction parameterizations (to_x0, convert) and guidance conventions
"""

from flashdistill.kernels.attention import attention, attention_kd_loss, sdpa, use_flashdistill_attention
from flashdistill.kernels.backends import BACKENDS, available_backends, backend_status, use_backend
from flashdistill.kernels import grad_scale  # noqa: F401  (registers flashdistill::grad_scale)
from flashdistill.kernels.params import convert, to_x0
from flashdistill.kernels.kd import fused_linear_kd_loss, kd_loss, topk_kd_loss
from flashdistill.kernels.regression import consistency_loss, dsm_loss
from flashdistill.kernels.rng import NoiseSource, philox_bits, rand, randn
from flashdistill.kernels.sampling import (EDMSchedule, FlowSchedule, TrigFlowSchedule, VPSchedule, ddim_step,
                                          ddpm_step, dpmpp_2m_step, euler_step, flow_euler_step, heun_step, lcm_step,
                                          logit_normal_times, lognormal_sigmas, q_sample, sample, uniform_timesteps)
from flashdistill.kernels.score_diff import dmd_loss, fdiv_weight, sds_loss, vsd_loss
from flashdistill.kernels.score_identity import sfd_loss, sid_loss, sim_loss

__all__ = ["attention", "attention_kd_loss", "sdpa", "use_flashdistill_attention", "NoiseSource", "philox_bits", "rand", "randn", "q_sample", "sample", "ddim_step", "ddpm_step",
           "dpmpp_2m_step", "lcm_step", "heun_step",
           "euler_step",
           "flow_euler_step",
           "VPSchedule", "EDMSchedule", "FlowSchedule",
           "TrigFlowSchedule", "uniform_timesteps", "lognormal_sigmas", "logit_normal_times", "BACKENDS", "available_backends", "backend_status", "consistency_loss", "convert", "dmd_loss",
           "dsm_loss", "fdiv_weight", "fused_linear_kd_loss", "kd_loss", "sds_loss", "sfd_loss", "sid_loss",
           "sim_loss", "to_x0", "topk_kd_loss", "use_backend", "vsd_loss"]
