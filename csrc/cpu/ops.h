// Entry points of the CPU extension module flashdistill._C, one per op; module.cpp binds each with
// one m.def. Arguments follow the ABI in csrc/README.md: data pointers as integers, sizes and
// strides in elements, a dtype code (common.h::DType). The functions trust their arguments (the
// Python side validates them) and throw std::invalid_argument only for an unknown dtype code.
#pragma once

#include <cstdint>

namespace flashdistill {
namespace cpu {

// dst[i] = src[i] * (scale[0] * factor) in the compute type, rounded once (grad_scale.cpp): the
// backward of losses that save dloss/dx up to the upstream scalar. scale points to one value of the
// compute type.
void grad_scale(int64_t dtype, int64_t n, uintptr_t src, uintptr_t dst, uintptr_t scale, double factor);


// ---- the score-loss skeletons (csrc/README.md, "The score-loss skeletons") --------------------
// Pointers of absent inputs are 0; per-sample arrays are of the compute type C.

// K1 (score_diff.cpp): g [B, D] and the loss; the backward is grad_scale.
void score_diff_forward(int64_t dtype, int64_t B, int64_t D,
                        uintptr_t x, int64_t x_bs,
                        uintptr_t a, int64_t a_bs, uintptr_t a_u, int64_t a_u_bs, uintptr_t wa_ptr, double wa,
                        uintptr_t b, int64_t b_bs, uintptr_t b_u, int64_t b_u_bs, uintptr_t wb_ptr, double wb,
                        uintptr_t xt, int64_t xt_bs, uintptr_t coef,
                        uintptr_t scale, int64_t norm, double eps, double clip, double loss_factor,
                        uintptr_t g, uintptr_t loss,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream,
                        double g_scale);  // g is stored times g_scale (1: the ABI's g; the loss sums g)
int64_t score_diff_workspace_bytes(int64_t dtype, int64_t B, int64_t D);

// K2 (score_identity.cpp): per-sample sums [B, 3]; backward writes up to five gradients.
void score_identity_forward(int64_t dtype, int64_t B, int64_t D,
                            uintptr_t x, int64_t x_bs,
                            uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                            uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                            uintptr_t sums, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t score_identity_workspace_bytes(int64_t dtype, int64_t B, int64_t D);
void score_identity_backward(int64_t dtype, int64_t B, int64_t D,
                             uintptr_t x, int64_t x_bs,
                             uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                             uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                             uintptr_t coef, uintptr_t gx, uintptr_t gr, uintptr_t gr_u, uintptr_t gf, uintptr_t gf_u,
                             uintptr_t stream);

// K3/K5 (regression.cpp): per-sample sums [B]; backward writes d loss / d pred.
void regression_forward(int64_t dtype, int64_t B, int64_t D,
                        uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs,
                        uintptr_t coef, int64_t kind, double c,
                        uintptr_t sums, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t regression_workspace_bytes(int64_t dtype, int64_t B, int64_t D);
void regression_backward(int64_t dtype, int64_t B, int64_t D,
                         uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs,
                         uintptr_t coef, int64_t kind, double c, uintptr_t k, uintptr_t gpred, uintptr_t stream);
// Kinds 0 and 1: the sums and gpred = k_b phi'(d) in one pass (kind 2 throws).
void regression_forward_grad(int64_t dtype, int64_t B, int64_t D,
                             uintptr_t pred, int64_t pred_bs, uintptr_t t1, int64_t t1_bs, uintptr_t t2,
                             int64_t t2_bs, uintptr_t coef, int64_t kind, double c, uintptr_t k, uintptr_t sums,
                             uintptr_t gpred);

// kd.cpp: the row kernel of kd_loss on logits (csrc/cpu/kd.cpp top comment; kernels/kd/reference.py):
// per row the tempered divergence D (soft_rows), the hard CE (hard_rows, may be 0) and grad [N, V] =
// row_weight * dD/dz + hard_weight * (softmax(z) - onehot(label)). kind: include/flashdistill/kd.h.
// The divergence is over V columns; a student or teacher row of another width (s_width, t_width) is
// padded with -inf or truncated to V; grad is [N, s_width].
void kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t s_width,
                uintptr_t teacher, int64_t t_stride, int64_t t_width, int64_t kind, double temperature, double beta, double alpha, double lam,
                uintptr_t row_weight, uintptr_t labels, uintptr_t hard_weight, uintptr_t grad, uintptr_t soft_rows,
                uintptr_t hard_rows);
// The same for a stored top-k teacher (topk_kd_loss): ids [N, K] int64 and log-probs [N, K] of the
// compute dtype, contiguous; mode 0 renorm_teacher, 1 renorm_both, 2 tail_bucket; ratio = T_gen / T.
// Throws std::invalid_argument naming the first row with an id out of range or repeated.
void topk_kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t K,
                     uintptr_t ids, uintptr_t logprobs, int64_t mode, double temperature, double ratio,
                     uintptr_t row_weight, uintptr_t labels, uintptr_t hard_weight, uintptr_t grad,
                     uintptr_t soft_rows, uintptr_t hard_rows);

// rng.cpp: n elements of the Philox4x32-10 stream (seed, *offset_ptr) from element `start` on
// (include/flashdistill/philox.h): kind 0 the raw 32-bit words into int64 `out`, 1 uniforms in [0, 1),
// 2 normals, both in `dtype`. offset_ptr points to one int64 (the generator's device-side offset).
void philox_fill(int64_t dtype, int64_t n, uint64_t seed, uintptr_t offset_ptr, uint64_t start, int64_t kind,
                 uintptr_t out);

// sampling.cpp: the affine sampler step out = kx x + k0 (ax x + ap cfg(p, p_u, w)) + kh h + kz z over
// [B, D] rows (the file's top comment); coef [B, 8] of the compute type; h an optional history; z given (noise) or drawn (draw) from
// the Philox stream (seed, *offset_ptr) at element start + b * D + d; x0_out (o2 = qx x + q0 x0) and
// noise_out optional.
void affine_step(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs, uintptr_t p, int64_t p_bs,
                 uintptr_t pu, int64_t pu_bs, uintptr_t h, int64_t h_bs, uintptr_t w_ptr, double w, uintptr_t coef,
                 uintptr_t noise, int64_t noise_bs, bool draw, uint64_t seed, uintptr_t offset_ptr, uint64_t start, uintptr_t out,
                 uintptr_t x0_out, uintptr_t noise_out);

// attention.cpp: flash-style attention forward / backward and the streaming attention-map KL
// (csrc/README.md "Attention (issue #6)"; kernels/attention/reference.py). Inputs are 4-d [B, H, L, D]
// given as pointer and (batch, head, row) strides in elements, head dim contiguous; outputs
// contiguous; lse, kl, g of the compute type. The workspace functions return 0 (the CPU kernels
// allocate their own scratch) and the workspace arguments are ignored.
void attention_forward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                       uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                       uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                       bool causal, double scale, uintptr_t out, uintptr_t lse, uintptr_t stream);
void attention_backward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                        uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                        uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                        uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                        uintptr_t out, uintptr_t dout, uintptr_t lse, bool causal, double scale,
                        uintptr_t dq, uintptr_t dk, uintptr_t dv,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t attention_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk,
                                           int64_t D);
void attention_kd_forward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                          int64_t Ds, int64_t Dt,
                          uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                          uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                          uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                          uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                          bool causal, double scale_s, double scale_t,
                          uintptr_t kl, uintptr_t lse_s, uintptr_t lse_t, uintptr_t stream);
void attention_kd_backward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                           int64_t Ds, int64_t Dt,
                           uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                           uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                           uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                           uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                           uintptr_t lse_s, uintptr_t lse_t, uintptr_t g, bool causal, double scale_s,
                           double scale_t, uintptr_t dqs, uintptr_t dks,
                           uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream);
int64_t attention_kd_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt,
                                              int64_t Lq, int64_t Lk, int64_t Ds, int64_t Dt);

}  // namespace cpu
}  // namespace flashdistill
