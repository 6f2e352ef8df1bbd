// flashdistill._C_cuda: the CUDA backend's Python module. Compiled by g++ (not nvcc): it includes
// only pybind11 and ops.h, never a CUDA or torch header (csrc/README.md). Every entry point takes
// plain integers and floats and releases the GIL. Adding an op: one wrapper and one m.def below.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "ops.h"

namespace py = pybind11;
namespace gpu = flashdistill::gpu;

namespace {

template <typename P> P* ptr(uintptr_t v) { return reinterpret_cast<P*>(v); }

// The skeletons: the same names and argument order as the CPU module (csrc/cpu/module.cpp), pointers
// as integers, the stream last.
void score_diff_forward(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs,
                        uintptr_t a, int64_t a_bs, uintptr_t a_u, int64_t a_u_bs, uintptr_t wa_ptr, double wa,
                        uintptr_t b, int64_t b_bs, uintptr_t b_u, int64_t b_u_bs, uintptr_t wb_ptr, double wb,
                        uintptr_t xt, int64_t xt_bs, uintptr_t coef, uintptr_t scale, int64_t norm, double eps,
                        double clip, double loss_factor, uintptr_t g, uintptr_t loss,
                        uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  gpu::score_diff_forward_cuda(dtype, B, D, ptr<const void>(x), x_bs,
                               ptr<const void>(a), a_bs, ptr<const void>(a_u), a_u_bs, ptr<const void>(wa_ptr), wa,
                               ptr<const void>(b), b_bs, ptr<const void>(b_u), b_u_bs, ptr<const void>(wb_ptr), wb,
                               ptr<const void>(xt), xt_bs, ptr<const void>(coef), ptr<const void>(scale), norm, eps,
                               clip, loss_factor, ptr<void>(g), ptr<void>(loss), ptr<void>(workspace),
                               workspace_bytes, ptr<CUstream_st>(stream));
}

void score_identity_forward(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs,
                            uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                            uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                            uintptr_t sums, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  gpu::score_identity_forward_cuda(dtype, B, D, ptr<const void>(x), x_bs,
                                   ptr<const void>(r), r_bs, ptr<const void>(r_u), r_u_bs, ptr<const void>(wr_ptr), wr,
                                   ptr<const void>(f), f_bs, ptr<const void>(f_u), f_u_bs, ptr<const void>(wf_ptr), wf,
                                   ptr<void>(sums), ptr<void>(workspace), workspace_bytes, ptr<CUstream_st>(stream));
}

void score_identity_backward(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs,
                             uintptr_t r, int64_t r_bs, uintptr_t r_u, int64_t r_u_bs, uintptr_t wr_ptr, double wr,
                             uintptr_t f, int64_t f_bs, uintptr_t f_u, int64_t f_u_bs, uintptr_t wf_ptr, double wf,
                             uintptr_t coef, uintptr_t gx, uintptr_t gr, uintptr_t gr_u, uintptr_t gf, uintptr_t gf_u,
                             uintptr_t stream) {
  gpu::score_identity_backward_cuda(dtype, B, D, ptr<const void>(x), x_bs,
                                    ptr<const void>(r), r_bs, ptr<const void>(r_u), r_u_bs, ptr<const void>(wr_ptr), wr,
                                    ptr<const void>(f), f_bs, ptr<const void>(f_u), f_u_bs, ptr<const void>(wf_ptr), wf,
                                    ptr<const void>(coef), ptr<void>(gx), ptr<void>(gr), ptr<void>(gr_u),
                                    ptr<void>(gf), ptr<void>(gf_u), ptr<CUstream_st>(stream));
}

void regression_forward(int64_t dtype, int64_t B, int64_t D, uintptr_t pred, int64_t pred_bs,
                        uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs, uintptr_t coef, int64_t kind,
                        double c, uintptr_t sums, uintptr_t workspace, int64_t workspace_bytes, uintptr_t stream) {
  gpu::regression_forward_cuda(dtype, B, D, ptr<const void>(pred), pred_bs, ptr<const void>(t1), t1_bs,
                               ptr<const void>(t2), t2_bs, ptr<const void>(coef), kind, c, ptr<void>(sums),
                               ptr<void>(workspace), workspace_bytes, ptr<CUstream_st>(stream));
}

void regression_backward(int64_t dtype, int64_t B, int64_t D, uintptr_t pred, int64_t pred_bs,
                         uintptr_t t1, int64_t t1_bs, uintptr_t t2, int64_t t2_bs, uintptr_t coef, int64_t kind,
                         double c, uintptr_t k, uintptr_t gpred, uintptr_t stream) {
  gpu::regression_backward_cuda(dtype, B, D, ptr<const void>(pred), pred_bs, ptr<const void>(t1), t1_bs,
                                ptr<const void>(t2), t2_bs, ptr<const void>(coef), kind, c, ptr<const void>(k),
                                ptr<void>(gpred), ptr<CUstream_st>(stream));
}

void grad_scale(int64_t dtype, int64_t n, uintptr_t src, uintptr_t dst, uintptr_t scale, double factor,
                uintptr_t stream) {
  gpu::grad_scale_cuda(dtype, n, ptr<const void>(src), ptr<void>(dst), ptr<const void>(scale), factor,
                       ptr<CUstream_st>(stream));
}

void kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t s_width,
                uintptr_t teacher, int64_t t_stride, int64_t t_width, int64_t kind, double temperature, double beta,
                double alpha, double lam, uintptr_t lam_ptr, uintptr_t row_weight, uintptr_t labels,
                uintptr_t hard_weight, uintptr_t grad, uintptr_t soft_rows, uintptr_t hard_rows, uintptr_t stream) {
  gpu::kd_forward_cuda(dtype, N, V, ptr<const void>(student), s_stride, s_width, ptr<const void>(teacher), t_stride,
                       t_width, kind, temperature, beta, alpha, lam, ptr<const void>(lam_ptr),
                       ptr<const void>(row_weight), ptr<const void>(labels), ptr<const void>(hard_weight),
                       ptr<void>(grad), ptr<void>(soft_rows), ptr<void>(hard_rows), ptr<CUstream_st>(stream));
}

void topk_kd_forward(int64_t dtype, int64_t N, int64_t V, uintptr_t student, int64_t s_stride, int64_t K,
                     uintptr_t ids, uintptr_t logprobs, int64_t mode, double temperature, double ratio,
                     uintptr_t row_weight, uintptr_t labels, uintptr_t hard_weight, uintptr_t grad,
                     uintptr_t soft_rows, uintptr_t hard_rows, uintptr_t stream) {
  gpu::topk_kd_forward_cuda(dtype, N, V, ptr<const void>(student), s_stride, K, ptr<const void>(ids),
                            ptr<const void>(logprobs), mode, temperature, ratio, ptr<const void>(row_weight),
                            ptr<const void>(labels), ptr<const void>(hard_weight), ptr<void>(grad),
                            ptr<void>(soft_rows), ptr<void>(hard_rows), ptr<CUstream_st>(stream));
}

void philox_fill(int64_t dtype, int64_t n, uint64_t seed, uintptr_t offset, uint64_t start, int64_t kind,
                 uintptr_t out, uintptr_t stream) {
  gpu::philox_fill_cuda(dtype, n, seed, ptr<const void>(offset), start, kind, ptr<void>(out),
                        ptr<CUstream_st>(stream));
}

void affine_step(int64_t dtype, int64_t B, int64_t D, uintptr_t x, int64_t x_bs, uintptr_t p, int64_t p_bs,
                 uintptr_t pu, int64_t pu_bs, uintptr_t h, int64_t h_bs, uintptr_t w_ptr, double w, uintptr_t coef, uintptr_t noise,
                 int64_t noise_bs, bool draw, uint64_t seed, uintptr_t offset, uint64_t start, uintptr_t out,
                 uintptr_t x0_out, uintptr_t noise_out, uintptr_t stream) {
  gpu::affine_step_cuda(dtype, B, D, ptr<const void>(x), x_bs, ptr<const void>(p), p_bs, ptr<const void>(pu), pu_bs,
                        ptr<const void>(h), h_bs, ptr<const void>(w_ptr), w, ptr<const void>(coef), ptr<const void>(noise), noise_bs, draw, seed,
                        ptr<const void>(offset), start, ptr<void>(out), ptr<void>(x0_out), ptr<void>(noise_out),
                        ptr<CUstream_st>(stream));
}

// Attention (csrc/README.md, "Attention (issue #6)"): every input as (pointer, batch, head, row strides).
void attention_forward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                       uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                       uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                       uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                       int64_t causal, double scale, uintptr_t out, uintptr_t lse, uintptr_t stream) {
  gpu::attention_forward_cuda(dtype, B, Hq, Hk, Lq, Lk, D, ptr<const void>(q), q_sb, q_sh, q_sl,
                              ptr<const void>(k), k_sb, k_sh, k_sl, ptr<const void>(v), v_sb, v_sh, v_sl, causal, scale,
                              ptr<void>(out), ptr<void>(lse), ptr<CUstream_st>(stream));
}

void attention_backward(int64_t dtype, int64_t B, int64_t Hq, int64_t Hk, int64_t Lq, int64_t Lk, int64_t D,
                        uintptr_t q, int64_t q_sb, int64_t q_sh, int64_t q_sl,
                        uintptr_t k, int64_t k_sb, int64_t k_sh, int64_t k_sl,
                        uintptr_t v, int64_t v_sb, int64_t v_sh, int64_t v_sl,
                        uintptr_t out, uintptr_t dout, uintptr_t lse, int64_t causal, double scale,
                        uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t workspace, int64_t workspace_bytes,
                        uintptr_t stream) {
  gpu::attention_backward_cuda(dtype, B, Hq, Hk, Lq, Lk, D, ptr<const void>(q), q_sb, q_sh, q_sl,
                               ptr<const void>(k), k_sb, k_sh, k_sl, ptr<const void>(v), v_sb, v_sh, v_sl,
                               ptr<const void>(out), ptr<const void>(dout), ptr<const void>(lse), causal, scale,
                               ptr<void>(dq), ptr<void>(dk), ptr<void>(dv), ptr<void>(workspace), workspace_bytes,
                               ptr<CUstream_st>(stream));
}

void attention_kd_forward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                          int64_t Ds, int64_t Dt,
                          uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                          uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                          uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                          uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                          int64_t causal, double scale_s, double scale_t,
                          uintptr_t kl, uintptr_t lse_s, uintptr_t lse_t, uintptr_t stream) {
  gpu::attention_kd_forward_cuda(dtype, B, H, Hks, Hkt, Lq, Lk, Ds, Dt, ptr<const void>(qs), qs_sb, qs_sh, qs_sl,
                                 ptr<const void>(ks), ks_sb, ks_sh, ks_sl, ptr<const void>(qt), qt_sb, qt_sh, qt_sl,
                                 ptr<const void>(kt), kt_sb, kt_sh, kt_sl, causal, scale_s, scale_t, ptr<void>(kl),
                                 ptr<void>(lse_s), ptr<void>(lse_t), ptr<CUstream_st>(stream));
}

void attention_kd_backward(int64_t dtype, int64_t B, int64_t H, int64_t Hks, int64_t Hkt, int64_t Lq, int64_t Lk,
                           int64_t Ds, int64_t Dt,
                           uintptr_t qs, int64_t qs_sb, int64_t qs_sh, int64_t qs_sl,
                           uintptr_t ks, int64_t ks_sb, int64_t ks_sh, int64_t ks_sl,
                           uintptr_t qt, int64_t qt_sb, int64_t qt_sh, int64_t qt_sl,
                           uintptr_t kt, int64_t kt_sb, int64_t kt_sh, int64_t kt_sl,
                           uintptr_t lse_s, uintptr_t lse_t, uintptr_t g, int64_t causal, double scale_s,
                           double scale_t, uintptr_t dqs, uintptr_t dks, uintptr_t workspace, int64_t workspace_bytes,
                           uintptr_t stream) {
  gpu::attention_kd_backward_cuda(dtype, B, H, Hks, Hkt, Lq, Lk, Ds, Dt, ptr<const void>(qs), qs_sb, qs_sh, qs_sl,
                                  ptr<const void>(ks), ks_sb, ks_sh, ks_sl, ptr<const void>(qt), qt_sb, qt_sh, qt_sl,
                                  ptr<const void>(kt), kt_sb, kt_sh, kt_sl, ptr<const void>(lse_s),
                                  ptr<const void>(lse_t), ptr<const void>(g), causal, scale_s, scale_t,
                                  ptr<void>(dqs), ptr<void>(dks), ptr<void>(workspace), workspace_bytes,
                                  ptr<CUstream_st>(stream));
}

py::dict build_info() {
  const gpu::BuildInfo b = gpu::build_info();
  py::dict d;
  d["nvcc"] = b.nvcc;
  d["cuda_runtime"] = b.cuda_runtime;
  d["cudart"] = "static";
  d["archs"] = b.archs;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "flashdistill CUDA kernels (ABI: csrc/README.md). Pointers, sizes and strides in, no torch types.";
  using release = py::call_guard<py::gil_scoped_release>;

  // ---- runtime ----
  m.def("device_count", &gpu::device_count, release(),
        "Visible CUDA devices; 0 (no exception) without a driver or device.");
  m.def("runtime_error_string", &gpu::runtime_error_string, release(),
        "Why CUDA is unusable ('' when a device is usable).");
  m.def("driver_version", &gpu::driver_version, release(),
        "CUDA version the driver supports (e.g. 12040), 0 without a driver.");
  m.def("build_info", &build_info, "How this module was compiled: nvcc, CUDA runtime, GPU architectures.");

  // ---- ops ----
  m.def("kd_forward", &kd_forward, release(),
        "kd_loss row kernel (csrc/cuda/kd.cu): per-row divergence, hard CE and dL/dz.",
        py::arg("dtype"), py::arg("N"), py::arg("V"), py::arg("student"), py::arg("s_stride"), py::arg("s_width"),
        py::arg("teacher"), py::arg("t_stride"), py::arg("t_width"), py::arg("kind"), py::arg("temperature"),
        py::arg("beta"), py::arg("alpha"), py::arg("lam"), py::arg("lam_ptr"), py::arg("row_weight"),
        py::arg("labels"), py::arg("hard_weight"), py::arg("grad"), py::arg("soft_rows"), py::arg("hard_rows"),
        py::arg("stream"));
  m.def("topk_kd_forward", &topk_kd_forward, release(),
        "topk_kd_loss row kernel (csrc/cuda/kd.cu): forward KL to stored top-k teacher log-probs.",
        py::arg("dtype"), py::arg("N"), py::arg("V"), py::arg("student"), py::arg("s_stride"), py::arg("K"),
        py::arg("ids"), py::arg("logprobs"), py::arg("mode"), py::arg("temperature"), py::arg("ratio"),
        py::arg("row_weight"), py::arg("labels"), py::arg("hard_weight"), py::arg("grad"), py::arg("soft_rows"),
        py::arg("hard_rows"), py::arg("stream"));
  m.def("philox_fill", &philox_fill, release(), "Philox4x32-10 stream: bits, uniforms or normals (csrc/cuda/rng.cu).",
        py::arg("dtype"), py::arg("n"), py::arg("seed"), py::arg("offset_ptr"), py::arg("start"), py::arg("kind"),
        py::arg("out"), py::arg("stream"));
  m.def("affine_step", &affine_step, release(),
        "The affine sampler step / noising kernel (csrc/cuda/sampling.cu).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"), py::arg("p"), py::arg("p_bs"),
        py::arg("pu"), py::arg("pu_bs"), py::arg("h"), py::arg("h_bs"), py::arg("w_ptr"), py::arg("w"),
        py::arg("coef"), py::arg("noise"), py::arg("noise_bs"), py::arg("draw"), py::arg("seed"),
        py::arg("offset_ptr"), py::arg("start"), py::arg("out"), py::arg("x0_out"), py::arg("noise_out"),
        py::arg("stream"));
  m.def("score_diff_forward", &score_diff_forward,
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("a"), py::arg("a_bs"), py::arg("a_u"), py::arg("a_u_bs"), py::arg("wa_ptr"), py::arg("wa"),
        py::arg("b"), py::arg("b_bs"), py::arg("b_u"), py::arg("b_u_bs"), py::arg("wb_ptr"), py::arg("wb"),
        py::arg("xt"), py::arg("xt_bs"), py::arg("coef"), py::arg("scale"), py::arg("norm"), py::arg("eps"),
        py::arg("clip"), py::arg("loss_factor"), py::arg("g"), py::arg("loss"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), release(),
        "K1 forward: g [B, D] (dtype) and the loss (compute type); enqueued on stream.");
  m.def("score_diff_workspace_bytes", &gpu::score_diff_workspace_bytes, py::arg("dtype"), py::arg("B"),
        py::arg("D"), release(), "Scratch bytes score_diff_forward needs for (dtype, B, D).");
  m.def("score_identity_forward", &score_identity_forward,
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("r"), py::arg("r_bs"), py::arg("r_u"), py::arg("r_u_bs"), py::arg("wr_ptr"), py::arg("wr"),
        py::arg("f"), py::arg("f_bs"), py::arg("f_u"), py::arg("f_u_bs"), py::arg("wf_ptr"), py::arg("wf"),
        py::arg("sums"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), release(),
        "K2 forward: per-sample sums [B, 3] (compute type); enqueued on stream.");
  m.def("score_identity_workspace_bytes", &gpu::score_identity_workspace_bytes, py::arg("dtype"), py::arg("B"),
        py::arg("D"), release(), "Scratch bytes score_identity_forward needs for (dtype, B, D).");
  m.def("score_identity_backward", &score_identity_backward,
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("r"), py::arg("r_bs"), py::arg("r_u"), py::arg("r_u_bs"), py::arg("wr_ptr"), py::arg("wr"),
        py::arg("f"), py::arg("f_bs"), py::arg("f_u"), py::arg("f_u_bs"), py::arg("wf_ptr"), py::arg("wf"),
        py::arg("coef"), py::arg("gx"), py::arg("gr"), py::arg("gr_u"), py::arg("gf"), py::arg("gf_u"),
        py::arg("stream"), release(),
        "K2 backward: up to five gradients [B, D] (dtype) from the per-sample (P, Q); enqueued on stream.");
  m.def("regression_forward", &regression_forward,
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("pred"), py::arg("pred_bs"),
        py::arg("t1"), py::arg("t1_bs"), py::arg("t2"), py::arg("t2_bs"), py::arg("coef"), py::arg("kind"),
        py::arg("c"), py::arg("sums"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
        release(), "K3/K5 forward: per-sample sums [B] (compute type); enqueued on stream.");
  m.def("regression_workspace_bytes", &gpu::regression_workspace_bytes, py::arg("dtype"), py::arg("B"),
        py::arg("D"), release(), "Scratch bytes regression_forward needs for (dtype, B, D).");
  m.def("regression_backward", &regression_backward,
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("pred"), py::arg("pred_bs"),
        py::arg("t1"), py::arg("t1_bs"), py::arg("t2"), py::arg("t2_bs"), py::arg("coef"), py::arg("kind"),
        py::arg("c"), py::arg("k"), py::arg("gpred"), py::arg("stream"), release(),
        "K3/K5 backward: d loss / d pred [B, D] (dtype) from the per-sample factor k; enqueued on stream.");
  m.def("grad_scale", &grad_scale, py::arg("dtype"), py::arg("n"), py::arg("src"), py::arg("dst"),
        py::arg("scale"), py::arg("factor"), py::arg("stream"), release(),
        "dst = src * (scale[0] * factor) in the compute type, rounded once; enqueued on stream.");

  // ---- attention (issue #6; csrc/cuda/attention.cu) ----
  m.def("attention_forward", &attention_forward, release(),
        "Attention forward (FlashAttention-2): out [B, Hq, Lq, D] (dtype) and lse [B, Hq, Lq] (compute type).",
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
        py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("q_sl"),
        py::arg("k"), py::arg("k_sb"), py::arg("k_sh"), py::arg("k_sl"),
        py::arg("v"), py::arg("v_sb"), py::arg("v_sh"), py::arg("v_sl"),
        py::arg("causal"), py::arg("scale"), py::arg("out"), py::arg("lse"), py::arg("stream"));
  m.def("attention_backward", &attention_backward, release(),
        "Attention backward: dq [B, Hq, Lq, D], dk, dv [B, Hk, Lk, D] (dtype), P recomputed from lse.",
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
        py::arg("q"), py::arg("q_sb"), py::arg("q_sh"), py::arg("q_sl"),
        py::arg("k"), py::arg("k_sb"), py::arg("k_sh"), py::arg("k_sl"),
        py::arg("v"), py::arg("v_sb"), py::arg("v_sh"), py::arg("v_sl"),
        py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("causal"), py::arg("scale"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("stream"));
  m.def("attention_backward_workspace_bytes", &gpu::attention_backward_workspace_bytes, release(),
        "Scratch bytes attention_backward needs (Delta [B, Hq, Lq] of the compute type).",
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"));
  m.def("attention_kd_forward", &attention_kd_forward, release(),
        "Streaming attention-map KL(teacher || student) per query row, with both lse (compute type).",
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"),
        py::arg("Ds"), py::arg("Dt"),
        py::arg("qs"), py::arg("qs_sb"), py::arg("qs_sh"), py::arg("qs_sl"),
        py::arg("ks"), py::arg("ks_sb"), py::arg("ks_sh"), py::arg("ks_sl"),
        py::arg("qt"), py::arg("qt_sb"), py::arg("qt_sh"), py::arg("qt_sl"),
        py::arg("kt"), py::arg("kt_sb"), py::arg("kt_sh"), py::arg("kt_sl"),
        py::arg("causal"), py::arg("scale_s"), py::arg("scale_t"),
        py::arg("kl"), py::arg("lse_s"), py::arg("lse_t"), py::arg("stream"));
  m.def("attention_kd_backward", &attention_kd_backward, release(),
        "Attention-map KL backward: dqs [B, H, Lq, Ds], dks [B, Hks, Lk, Ds] (dtype) from g [B, H, Lq].",
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"),
        py::arg("Ds"), py::arg("Dt"),
        py::arg("qs"), py::arg("qs_sb"), py::arg("qs_sh"), py::arg("qs_sl"),
        py::arg("ks"), py::arg("ks_sb"), py::arg("ks_sh"), py::arg("ks_sl"),
        py::arg("qt"), py::arg("qt_sb"), py::arg("qt_sh"), py::arg("qt_sl"),
        py::arg("kt"), py::arg("kt_sb"), py::arg("kt_sh"), py::arg("kt_sl"),
        py::arg("lse_s"), py::arg("lse_t"), py::arg("g"), py::arg("causal"), py::arg("scale_s"), py::arg("scale_t"),
        py::arg("dqs"), py::arg("dks"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("attention_kd_backward_workspace_bytes", &gpu::attention_kd_backward_workspace_bytes, release(),
        "Scratch bytes attention_kd_backward needs (0).",
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"),
        py::arg("Ds"), py::arg("Dt"));
}
