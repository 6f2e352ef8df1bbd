// Host entry points of the CUDA backend (flashdistill._C_cuda), in plain C++ types: module.cpp is
// compiled by g++ and includes no CUDA header. The ABI and the math are in csrc/README.md.
//
// Adding an op: declare its launcher here, define it in cuda/<op>.cu, add one m.def in module.cpp.
#pragma once

#include <cstdint>
#include <string>

// cudaStream_t is `CUstream_st*`; the forward declaration lets this header name it without
// <cuda_runtime.h>. A stream handle from Python (torch.cuda.current_stream().cuda_stream) converts
// with reinterpret_cast; 0 is the legacy default stream.
struct CUstream_st;

namespace flashdistill {
namespace gpu {

// ---- runtime (runtime.cu) -----------------------------------------------------------------------

// Number of visible CUDA devices; 0, never an exception, when there is no driver or no device.
int device_count() noexcept;

// Why CUDA is unusable, for `flashdistill info`: "" when at least one device is usable, else the
// CUDA runtime's error name and text (e.g. "cudaErrorInsufficientDriver: CUDA driver version is
// insufficient for CUDA runtime version") with the driver's and this build's CUDA versions.
std::string runtime_error_string();

// CUDA version the installed driver supports (e.g. 12040 for 12.4), 0 when no driver is found.
int driver_version() noexcept;

// How this module was built (module.cpp turns it into a dict, like the CPU module's build_info).
struct BuildInfo {
  std::string nvcc;       // nvcc version, e.g. "13.0.88"
  int cuda_runtime;       // CUDART_VERSION linked (statically), e.g. 13000; needs a driver for it
  std::string archs;      // GPU architectures compiled: FD_CUDA_ARCHS, else nvcc's list, e.g. "800,900"
};
BuildInfo build_info();

// ---- the score-loss skeletons (csrc/README.md, "The score-loss skeletons") ----------------------
// Pointers are device pointers (null = absent), strides in elements, per-sample arrays of the compute
// type. Every function enqueues its kernels on `stream` and returns without synchronizing or
// allocating. They throw std::invalid_argument for arguments they can check (dtype, sizes, null
// pointers, a workspace that is too small or misaligned) and std::runtime_error naming the kernel
// when a launch fails (including "no driver / no device").
//
// The *_workspace_bytes functions depend only on (dtype, B, D) (no device query), so Python can
// size the workspace before the call; they throw std::invalid_argument for an unknown dtype or
// negative sizes.

// K1 (score_diff.cu): g [B, D] and the loss (one value of the compute type). Three kernels (two
// without the normaliser); workspace: two arrays of B * n_chunks partial sums.
int64_t score_diff_workspace_bytes(int64_t dtype, int64_t B, int64_t D);
void score_diff_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                             const void* x, int64_t x_bs,
                             const void* a, int64_t a_bs, const void* a_u, int64_t a_u_bs,
                             const void* wa_ptr, double wa,
                             const void* b, int64_t b_bs, const void* b_u, int64_t b_u_bs,
                             const void* wb_ptr, double wb,
                             const void* xt, int64_t xt_bs, const void* coef,
                             const void* scale, int64_t norm, double eps, double clip, double loss_factor,
                             void* g, void* loss,
                             void* workspace, int64_t workspace_bytes,
                             CUstream_st* stream);

// K2 (score_identity.cu): per-sample sums [B, 3]; the backward writes up to five gradients (each
// output null = not wanted). Workspace: 3 * B * n_chunks partials, 0 when a row is one chunk.
int64_t score_identity_workspace_bytes(int64_t dtype, int64_t B, int64_t D);
void score_identity_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                                 const void* x, int64_t x_bs,
                                 const void* r, int64_t r_bs, const void* r_u, int64_t r_u_bs,
                                 const void* wr_ptr, double wr,
                                 const void* f, int64_t f_bs, const void* f_u, int64_t f_u_bs,
                                 const void* wf_ptr, double wf,
                                 void* sums, void* workspace, int64_t workspace_bytes,
                                 CUstream_st* stream);
void score_identity_backward_cuda(int64_t dtype, int64_t B, int64_t D,
                                  const void* x, int64_t x_bs,
                                  const void* r, int64_t r_bs, const void* r_u, int64_t r_u_bs,
                                  const void* wr_ptr, double wr,
                                  const void* f, int64_t f_bs, const void* f_u, int64_t f_u_bs,
                                  const void* wf_ptr, double wf,
                                  const void* coef, void* gx, void* gr, void* gr_u, void* gf, void* gf_u,
                                  CUstream_st* stream);

// K3/K5 (regression.cu): per-sample sums [B]; the backward writes d loss / d pred from k [B].
// Workspace: B * n_chunks partials, 0 when a row is one chunk.
int64_t regression_workspace_bytes(int64_t dtype, int64_t B, int64_t D);
void regression_forward_cuda(int64_t dtype, int64_t B, int64_t D,
                             const void* pred, int64_t pred_bs, const void* t1, int64_t t1_bs,
                             const void* t2, int64_t t2_bs, const void* coef, int64_t kind, double c,
                             void* sums, void* workspace, int64_t workspace_bytes, CUstream_st* stream);
void regression_backward_cuda(int64_t dtype, int64_t B, int64_t D,
                              const void* pred, int64_t pred_bs, const void* t1, int64_t t1_bs,
                              const void* t2, int64_t t2_bs, const void* coef, int64_t kind, double c,
                              const void* k, void* gpred, CUstream_st* stream);

// ---- grad_scale (grad_scale.cu) ------------------------------------------------------------------

// dst[i] = src[i] * (scale[0] * factor) in the compute type, rounded once (the CUDA twin of
// csrc/cpu/grad_scale.cpp); scale points to one value of the compute type, on the device.
void grad_scale_cuda(int64_t dtype, int64_t n, const void* src, void* dst, const void* scale, double factor,
                     CUstream_st* stream);

// ---- logit distillation (kd.cu) -------------------------------------------------------------------
// kd_loss's row kernel, the CPU kd_forward's contract (csrc/cpu/ops.h) plus lam_ptr: TAID's lam read
// from device memory when not null (else `lam`). One block per row; no workspace.
void kd_forward_cuda(int64_t dtype, int64_t N, int64_t V, const void* student, int64_t s_stride, int64_t s_width,
                     const void* teacher, int64_t t_stride, int64_t t_width, int64_t kind, double temperature,
                     double beta, double alpha, double lam, const void* lam_ptr, const void* row_weight,
                     const void* labels, const void* hard_weight, void* grad, void* soft_rows, void* hard_rows,
                     CUstream_st* stream);

// topk_kd_loss's row kernel, the CPU topk_kd_forward's contract (ids distinct and in range: the caller
// checks). One block per row with a V-bit shared-memory bitmap of the ids (more than 48 KiB, i.e.
// V > 393216, raises the kernel's dynamic shared-memory limit).
void topk_kd_forward_cuda(int64_t dtype, int64_t N, int64_t V, const void* student, int64_t s_stride, int64_t K,
                          const void* ids, const void* logprobs, int64_t mode, double temperature, double ratio,
                          const void* row_weight, const void* labels, const void* hard_weight, void* grad,
                          void* soft_rows, void* hard_rows, CUstream_st* stream);

// ---- noise (rng.cu) --------------------------------------------------------------------------------
// The Philox stream, the CPU philox_fill's contract (csrc/cpu/ops.h); offset points to one int64 on
// the device.
void philox_fill_cuda(int64_t dtype, int64_t n, uint64_t seed, const void* offset, uint64_t start, int64_t kind,
                      void* out, CUstream_st* stream);

// ---- sampler steps and noising (sampling.cu) ----------------------------------------------------
// affine_step, the CPU affine_step's contract (csrc/cpu/ops.h, csrc/cpu/sampling.cpp).
void affine_step_cuda(int64_t dtype, int64_t B, int64_t D, const void* x, int64_t x_bs, const void* p, int64_t p_bs,
                      const void* pu, int64_t pu_bs, const void* h, int64_t h_bs, const void* w_ptr, double w, const void* coef,
                      const void* noise, int64_t noise_bs, bool draw, uint64_t seed, const void* offset,
                      uint64_t start, void* out, void* x0_out, void* noise_out, CUstream_st* stream);

// ---- attention (attention.cu; csrc/README.md, "Attention (issue #6)") -------------------------------
// Tensors [B, H, L, D]: an input is its pointer and (batch, head, row) strides in elements, the head dim
// contiguous; outputs contiguous; lse / kl / g / Delta of the compute type. causal: 0 / 1 (top-left).
// float16 / bfloat16 run tensor-core kernels (sm_80+) for D in {32, 64, 96, 128}; every other case
// (float32, float64, 16-bit at another D) the generic FMA kernels; D > 256 throws
// std::invalid_argument("attention: head dim D=... not supported by the cuda backend (1..256)"). The KD
// kernels likewise: tensor cores for 16-bit with both Ds, Dt in that set, else generic (Ds, Dt <= 256).
// Deterministic (no atomics). Enqueued on `stream`, no sync.
void attention_forward_cuda(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                            const void* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                            const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                            const void* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                            int64_t causal, double scale, void* out, void* lse, CUstream_st* stream);
// Workspace: Delta [B, Hq, Lq] of the compute type (rounded up to 256 bytes).
int64_t attention_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk,
                                           int64_t D);
void attention_backward_cuda(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                             const void* q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                             const void* k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                             const void* v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                             const void* out, const void* dout, const void* lse, int64_t causal, double scale,
                             void* dq, void* dk, void* dv, void* workspace, int64_t workspace_bytes,
                             CUstream_st* stream);
void attention_kd_forward_cuda(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                               int64_t Ds, int64_t Dt,
                               const void* qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                               const void* ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                               const void* qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                               const void* kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                               int64_t causal, double scale_s, double scale_t,
                               void* kl, void* lse_s, void* lse_t, CUstream_st* stream);
// Workspace: none (0); the argument is accepted for the ABI.
int64_t attention_kd_backward_workspace_bytes(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt,
                                              int64_t Lq, int64_t Lk, int64_t Ds, int64_t Dt);
void attention_kd_backward_cuda(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                                int64_t Ds, int64_t Dt,
                                const void* qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                                const void* ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                                const void* qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                                const void* kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                                const void* lse_s, const void* lse_t, const void* g,
                                int64_t causal, double scale_s, double scale_t,
                                void* dqs, void* dks, void* workspace, int64_t workspace_bytes, CUstream_st* stream);

}  // namespace gpu
}  // namespace flashdistill
