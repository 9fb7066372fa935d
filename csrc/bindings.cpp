// pybind11 bindings of the torch-free CUDA entry points (module lpo_kernels._cuda).
// Pointers and the stream arrive as Python ints (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); lpo_kernels/cuda.py validates the tensors.
// A failed launch raises RuntimeError carrying the CUDA error message.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lpo_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) { return reinterpret_cast<T*>(address); }

cudaStream_t stream_of(std::uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }

void check(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("lpo_kernels._cuda.") + what + " failed: CUDA error " +
                             std::to_string(code) + ": " + lpo::error_string(code));
  }
}

lpo::TokenLayout layout(std::uintptr_t logp, std::uintptr_t old_logp, std::uintptr_t mask, int dtype, int mask_kind,
                        std::uintptr_t cu_seqlens, int64_t n_seqs, int64_t seq_len, int64_t total_tokens) {
  return lpo::TokenLayout{ptr<const void>(logp), ptr<const void>(old_logp), ptr<const void>(mask), dtype, mask_kind,
                          ptr<const int64_t>(cu_seqlens), n_seqs, seq_len, total_tokens};
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "CUDA kernels of lpo_kernels (raw pointers; use lpo_kernels.cuda instead)";
  m.attr("DTYPES") = py::make_tuple("float32", "bfloat16", "float16");

  m.def("sequence_sums",
        [](std::uintptr_t logp, std::uintptr_t old_logp, std::uintptr_t mask, int dtype, int mask_kind,
           std::uintptr_t cu_seqlens, int64_t n_seqs, int64_t seq_len, int64_t total_tokens, std::uintptr_t sum_delta,
           std::uintptr_t n_tokens, std::uintptr_t stream) {
          check(lpo::sequence_sums(layout(logp, old_logp, mask, dtype, mask_kind, cu_seqlens, n_seqs, seq_len, total_tokens),
                                   ptr<float>(sum_delta), ptr<float>(n_tokens), stream_of(stream)),
                "sequence_sums");
        });

  m.def("group_step",
        [](std::uintptr_t sum_delta, std::uintptr_t n_tokens, std::uintptr_t values, std::uintptr_t order,
           std::uintptr_t offsets, int64_t group_size, int64_t n_slots, int target, int divergence, double alpha,
           float tau, float eps, bool seq_reduce_mean, std::uintptr_t coef, std::uintptr_t seq_scale,
           std::uintptr_t divergence_out, std::uintptr_t entropy_p, std::uintptr_t entropy_w,
           std::uintptr_t abs_coef, std::uintptr_t members, std::uintptr_t stream) {
          lpo::GroupParams params{target, divergence, alpha, tau, eps, seq_reduce_mean ? 1 : 0};
          check(lpo::group_step(ptr<const float>(sum_delta), ptr<const float>(n_tokens), ptr<const float>(values),
                                ptr<const int64_t>(order), ptr<const int64_t>(offsets), group_size, n_slots, params,
                                ptr<float>(coef), ptr<float>(seq_scale), ptr<float>(divergence_out),
                                ptr<float>(entropy_p), ptr<float>(entropy_w), ptr<float>(abs_coef),
                                ptr<float>(members), stream_of(stream)),
                "group_step");
        });

  m.def("finalize_groups",
        [](std::uintptr_t divergence, std::uintptr_t entropy_p, std::uintptr_t entropy_w, std::uintptr_t abs_coef,
           std::uintptr_t members, int64_t n_slots, bool reduction_mean, std::uintptr_t float_out,
           std::uintptr_t int_out, std::uintptr_t stream) {
          check(lpo::finalize_groups(ptr<const float>(divergence), ptr<const float>(entropy_p),
                                     ptr<const float>(entropy_w), ptr<const float>(abs_coef),
                                     ptr<const float>(members), n_slots, reduction_mean ? 1 : 0,
                                     ptr<float>(float_out), ptr<int64_t>(int_out), stream_of(stream)),
                "finalize_groups");
        });

  m.def("token_grad",
        [](std::uintptr_t logp, std::uintptr_t old_logp, std::uintptr_t mask, int dtype, int mask_kind,
           std::uintptr_t cu_seqlens, int64_t n_seqs, int64_t seq_len, int64_t total_tokens, std::uintptr_t seq_scale,
           std::uintptr_t coef, std::uintptr_t n_groups, int clip_mode, float log_low, float log_high,
           std::uintptr_t token_grad, std::uintptr_t counters, std::uintptr_t stream) {
          check(lpo::token_grad(layout(logp, old_logp, mask, dtype, mask_kind, cu_seqlens, n_seqs, seq_len, total_tokens),
                                ptr<const float>(seq_scale), ptr<const float>(coef), ptr<const int64_t>(n_groups),
                                clip_mode, log_low, log_high, ptr<float>(token_grad),
                                ptr<unsigned long long>(counters), stream_of(stream)),
                "token_grad");
        });

  m.def("logits_row_stats",
        [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, std::uintptr_t targets,
           float inv_temperature, std::uintptr_t lse, std::uintptr_t logp, std::uintptr_t entropy,
           std::uintptr_t stream) {
          check(lpo::logits_row_stats(ptr<const void>(logits), dtype, rows, vocab, row_stride,
                                      ptr<const int64_t>(targets), inv_temperature, ptr<float>(lse), ptr<float>(logp),
                                      ptr<float>(entropy), stream_of(stream)),
                "logits_row_stats");
        });

  m.def("logits_grad_inplace",
        [](std::uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride, std::uintptr_t targets,
           std::uintptr_t lse, std::uintptr_t grad_logp, float inv_temperature, std::uintptr_t stream) {
          check(lpo::logits_grad_inplace(ptr<void>(logits), dtype, rows, vocab, row_stride,
                                         ptr<const int64_t>(targets), ptr<const float>(lse),
                                         ptr<const float>(grad_logp), inv_temperature, stream_of(stream)),
                "logits_grad_inplace");
        });
}
