// flashdistill._C: the CPU ops (declared in ops.h) behind the plain-integer ABI of csrc/README.md.
// Each op is one m.def below; all of them release the GIL while they run.
#include <pybind11/pybind11.h>

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ops.h"

// Written by setup.py into the build directory: -march, and whether/why the CUDA module was built.
#if __has_include("fd_build_config.h")
#include "fd_build_config.h"
#endif

namespace py = pybind11;
namespace fd = flashdistill::cpu;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef __VERSION__
  d["compiler"] = std::string(__VERSION__);
#else
  d["compiler"] = py::none();
#endif
#ifdef _OPENMP
  d["openmp"] = int64_t(_OPENMP);
#else
  d["openmp"] = py::none();
#endif
  auto flag = [](bool on) { return py::bool_(on); };
#ifdef __AVX2__
  d["avx2"] = flag(true);
#else
  d["avx2"] = flag(false);
#endif
#ifdef __F16C__
  d["f16c"] = flag(true);
#else
  d["f16c"] = flag(false);
#endif
#ifdef __FMA__
  d["fma"] = flag(true);
#else
  d["fma"] = flag(false);
#endif
#ifdef __AVX512F__
  d["avx512f"] = flag(true);
#else
  d["avx512f"] = flag(false);
#endif
#ifdef FD_CPU_ARCH
  d["cpu_arch"] = std::string(FD_CPU_ARCH);
  d["cuda_built"] = py::bool_(FD_CUDA_BUILT != 0);
  d["cuda_reason"] = std::string(FD_CUDA_REASON);
#endif
  return d;
}

int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashdistill CPU kernels (plain-integer ABI, see csrc/README.md)";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("grad_scale", &fd::grad_scale, release(),
        "dst = src * (scale[0] * factor) in the compute type, rounded once.",
        py::arg("dtype"), py::arg("n"), py::arg("src"), py::arg("dst"), py::arg("scale"), py::arg("factor"));


  // ---- score-loss skeletons (csrc/README.md) ----
  m.def("score_diff_forward", &fd::score_diff_forward, release(),
        "K1 forward: g [B, D] and the loss (csrc/README.md).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("a"), py::arg("a_bs"), py::arg("a_u"), py::arg("a_u_bs"), py::arg("wa_ptr"), py::arg("wa"),
        py::arg("b"), py::arg("b_bs"), py::arg("b_u"), py::arg("b_u_bs"), py::arg("wb_ptr"), py::arg("wb"),
        py::arg("xt"), py::arg("xt_bs"), py::arg("coef"), py::arg("scale"), py::arg("norm"), py::arg("eps"),
        py::arg("clip"), py::arg("loss_factor"), py::arg("g"), py::arg("loss"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"), py::arg("g_scale") = 1.0);
  m.def("score_diff_workspace_bytes", &fd::score_diff_workspace_bytes, release(),
        "Scratch bytes score_diff_forward needs (0 on the CPU).", py::arg("dtype"), py::arg("B"), py::arg("D"));
  m.def("score_identity_forward", &fd::score_identity_forward, release(),
        "K2 forward: per-sample sums [B, 3] (csrc/README.md).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("r"), py::arg("r_bs"), py::arg("r_u"), py::arg("r_u_bs"), py::arg("wr_ptr"), py::arg("wr"),
        py::arg("f"), py::arg("f_bs"), py::arg("f_u"), py::arg("f_u_bs"), py::arg("wf_ptr"), py::arg("wf"),
        py::arg("sums"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("score_identity_workspace_bytes", &fd::score_identity_workspace_bytes, release(),
        "Scratch bytes score_identity_forward needs (0 on the CPU).", py::arg("dtype"), py::arg("B"), py::arg("D"));
  m.def("score_identity_backward", &fd::score_identity_backward, release(),
        "K2 backward: up to five gradients from the per-sample (P, Q) (csrc/README.md).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"),
        py::arg("r"), py::arg("r_bs"), py::arg("r_u"), py::arg("r_u_bs"), py::arg("wr_ptr"), py::arg("wr"),
        py::arg("f"), py::arg("f_bs"), py::arg("f_u"), py::arg("f_u_bs"), py::arg("wf_ptr"), py::arg("wf"),
        py::arg("coef"), py::arg("gx"), py::arg("gr"), py::arg("gr_u"), py::arg("gf"), py::arg("gf_u"),
        py::arg("stream"));
  m.def("regression_forward", &fd::regression_forward, release(),
        "K3/K5 forward: per-sample sums [B] (csrc/README.md).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("pred"), py::arg("pred_bs"),
        py::arg("t1"), py::arg("t1_bs"), py::arg("t2"), py::arg("t2_bs"), py::arg("coef"), py::arg("kind"),
        py::arg("c"), py::arg("sums"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("regression_workspace_bytes", &fd::regression_workspace_bytes, release(),
        "Scratch bytes regression_forward needs (0 on the CPU).", py::arg("dtype"), py::arg("B"), py::arg("D"));
  m.def("regression_backward", &fd::regression_backward, release(),
        "K3/K5 backward: d loss / d pred from the per-sample factor k (csrc/README.md).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("pred"), py::arg("pred_bs"),
        py::arg("t1"), py::arg("t1_bs"), py::arg("t2"), py::arg("t2_bs"), py::arg("coef"), py::arg("kind"),
        py::arg("c"), py::arg("k"), py::arg("gpred"), py::arg("stream"));

  m.def("regression_forward_grad", &fd::regression_forward_grad, release(),
        "K3/K5 kinds 0, 1: the per-sample sums and d loss / d pred = k_b phi'(d) in one pass.",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("pred"), py::arg("pred_bs"),
        py::arg("t1"), py::arg("t1_bs"), py::arg("t2"), py::arg("t2_bs"), py::arg("coef"), py::arg("kind"),
        py::arg("c"), py::arg("k"), py::arg("sums"), py::arg("gpred"));

  m.def("kd_forward", &fd::kd_forward, release(),
        "kd_loss row kernel: per-row divergence, hard CE and dL/dz (csrc/cpu/kd.cpp).",
        py::arg("dtype"), py::arg("N"), py::arg("V"), py::arg("student"), py::arg("s_stride"),
        py::arg("s_width"), py::arg("teacher"), py::arg("t_stride"), py::arg("t_width"), py::arg("kind"), py::arg("temperature"), py::arg("beta"),
        py::arg("alpha"), py::arg("lam"), py::arg("row_weight"), py::arg("labels"), py::arg("hard_weight"),
        py::arg("grad"), py::arg("soft_rows"), py::arg("hard_rows"));
  m.def("topk_kd_forward", &fd::topk_kd_forward, release(),
        "topk_kd_loss row kernel: forward KL against stored top-k teacher log-probs (csrc/cpu/kd.cpp).",
        py::arg("dtype"), py::arg("N"), py::arg("V"), py::arg("student"), py::arg("s_stride"), py::arg("K"),
        py::arg("ids"), py::arg("logprobs"), py::arg("mode"), py::arg("temperature"), py::arg("ratio"),
        py::arg("row_weight"), py::arg("labels"), py::arg("hard_weight"), py::arg("grad"), py::arg("soft_rows"),
        py::arg("hard_rows"));

  m.def("philox_fill", &fd::philox_fill, release(),
        "Philox4x32-10 stream: bits, uniforms or normals (csrc/cpu/rng.cpp).",
        py::arg("dtype"), py::arg("n"), py::arg("seed"), py::arg("offset_ptr"), py::arg("start"), py::arg("kind"),
        py::arg("out"));

  m.def("affine_step", &fd::affine_step, release(),
        "The affine sampler step / noising kernel (csrc/cpu/sampling.cpp).",
        py::arg("dtype"), py::arg("B"), py::arg("D"), py::arg("x"), py::arg("x_bs"), py::arg("p"), py::arg("p_bs"),
        py::arg("pu"), py::arg("pu_bs"), py::arg("h"), py::arg("h_bs"), py::arg("w_ptr"), py::arg("w"),
        py::arg("coef"), py::arg("noise"), py::arg("noise_bs"), py::arg("draw"), py::arg("seed"),
        py::arg("offset_ptr"), py::arg("start"), py::arg("out"), py::arg("x0_out"), py::arg("noise_out"));

  // ---- attention (csrc/README.md "Attention (issue #6)") ----
#define FD_QKV(x) py::arg(#x), py::arg(#x "_sb"), py::arg(#x "_sh"), py::arg(#x "_sl")
  m.def("attention_forward", &fd::attention_forward, release(),
        "Flash attention forward: out [B, Hq, Lq, D] and lse [B, Hq, Lq] (csrc/cpu/attention.cpp).",
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
        FD_QKV(q), FD_QKV(k), FD_QKV(v), py::arg("causal"), py::arg("scale"), py::arg("out"), py::arg("lse"),
        py::arg("stream"));
  m.def("attention_backward", &fd::attention_backward, release(),
        "Flash attention backward: dq, dk, dv from out, dout and lse (csrc/cpu/attention.cpp).",
        py::arg("dtype"), py::arg("B"), py::arg("Hq"), py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
        FD_QKV(q), FD_QKV(k), FD_QKV(v), py::arg("out"), py::arg("dout"), py::arg("lse"), py::arg("causal"),
        py::arg("scale"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("stream"));
  m.def("attention_backward_workspace_bytes", &fd::attention_backward_workspace_bytes, release(),
        "Scratch bytes attention_backward needs (0 on the CPU).", py::arg("dtype"), py::arg("B"), py::arg("Hq"),
        py::arg("Hk"), py::arg("Lq"), py::arg("Lk"), py::arg("D"));
  m.def("attention_kd_forward", &fd::attention_kd_forward, release(),
        "Streaming attention-map KL(teacher || student) per row, lse_s, lse_t (csrc/cpu/attention.cpp).",
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"),
        py::arg("Ds"), py::arg("Dt"), FD_QKV(qs), FD_QKV(ks), FD_QKV(qt), FD_QKV(kt), py::arg("causal"),
        py::arg("scale_s"), py::arg("scale_t"), py::arg("kl"), py::arg("lse_s"), py::arg("lse_t"), py::arg("stream"));
  m.def("attention_kd_backward", &fd::attention_kd_backward, release(),
        "Attention-map KL backward: dqs, dks for upstream g per row (csrc/cpu/attention.cpp).",
        py::arg("dtype"), py::arg("B"), py::arg("H"), py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"),
        py::arg("Ds"), py::arg("Dt"), FD_QKV(qs), FD_QKV(ks), FD_QKV(qt), FD_QKV(kt), py::arg("lse_s"),
        py::arg("lse_t"), py::arg("g"), py::arg("causal"), py::arg("scale_s"), py::arg("scale_t"), py::arg("dqs"),
        py::arg("dks"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def("attention_kd_backward_workspace_bytes", &fd::attention_kd_backward_workspace_bytes, release(),
        "Scratch bytes attention_kd_backward needs (0 on the CPU).", py::arg("dtype"), py::arg("B"), py::arg("H"),
        py::arg("Hks"), py::arg("Hkt"), py::arg("Lq"), py::arg("Lk"), py::arg("Ds"), py::arg("Dt"));
#undef FD_QKV

  m.def("build_info", &build_info, "How this module was compiled: compiler, OpenMP, ISA extensions.");
  m.def("omp_max_threads", &omp_max_threads, "omp_get_max_threads() (1 without OpenMP).");
}
