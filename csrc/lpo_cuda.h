// Torch-free entry points of the lpo_kernels CUDA backend.
//
// Every function takes raw device pointers, sizes and a cudaStream_t, launches on that
// stream without synchronising, and returns the cudaError_t of the launch (cudaSuccess = 0)
// so the pybind11 layer (bindings.cpp) can raise a Python exception with its message.
// Token and logits dtypes: kF32, kBF16, kF16; all math is fp32.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lpo {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum MaskKind : int { kMaskNone = 0, kMaskU8 = 1, kMaskF32 = 2 };
enum Target : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kMaxrl = 3, kSoftmax = 4, kAdvantages = 5 };
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kAlpha = 2, kJS = 3 };
enum ClipMode : int { kClipClamp = 0, kClipPPO = 1, kClipNone = 2 };

// Token layout shared by the two per-token passes: padded [n_seqs, seq_len] (cu_seqlens
// == nullptr, rows contiguous) or packed [N] with int64 offsets cu_seqlens[n_seqs + 1].
struct TokenLayout {
  const void* logp;          // dtype
  const void* old_logp;      // dtype, or nullptr (on-policy: delta = 0)
  const void* mask;          // uint8 / fp32 / nullptr per mask_kind
  int dtype;
  int mask_kind;
  const int64_t* cu_seqlens; // packed offsets or nullptr (padded)
  int64_t n_seqs;
  int64_t seq_len;           // padded row length (ignored when packed)
  int64_t total_tokens;      // logp.numel(): sizes the blocks; packed offsets are clamped to it
};

// Pass 1: per sequence, sum_t m*delta and N = sum_t m.
int sequence_sums(const TokenLayout& tokens, float* sum_delta, float* n_tokens, cudaStream_t stream);

struct GroupParams {
  int target;
  int divergence;
  double alpha;  // double: the kernel takes min(alpha, 1 - alpha) exactly (alpha near 1)
  float tau;
  float eps;
  int seq_reduce_mean;  // 1: s = sum/N, 0: s = sum
};

// Pass 2: one warp per group slot. Members of slot g are sequences
// order[offsets[g] .. offsets[g+1]) (general ids) or g*group_size + [0, group_size)
// (order == offsets == nullptr). Writes per sequence coef (c_k) and seq_scale (c_k / N_k),
// per slot divergence, entropies of P and w*, sum |c| and the number of non-empty members.
int group_step(const float* sum_delta, const float* n_tokens, const float* values,
               const int64_t* order, const int64_t* offsets, int64_t group_size, int64_t n_slots,
               GroupParams params, float* coef, float* seq_scale, float* divergence,
               float* entropy_p, float* entropy_w, float* abs_coef, float* members,
               cudaStream_t stream);

// Pass 3 (one block): float_out[5] = loss (mean or sum over groups), divergence,
// listwise entropy, target entropy (means over counted groups), mean |c|;
// int_out[6] = n_groups, non-empty sequences, then zeroes for the token pass's counters.
int finalize_groups(const float* divergence, const float* entropy_p, const float* entropy_w, const float* abs_coef,
                    const float* members, int64_t n_slots, int reduction_mean, float* float_out, int64_t* int_out,
                    cudaStream_t stream);

// Pass 4: token_grad = seq_scale * m * clipgate [/ max(*n_groups, 1) when n_groups != nullptr],
// fp32, same layout as logp; counters[0..3] += counted tokens, clipped low, clipped high,
// malformed cu_seqlens offsets. Packed offsets are clamped into [0, total_tokens] (no read
// or write outside the tokens) and tokens no sequence holds get token_grad = 0.
int token_grad(const TokenLayout& tokens, const float* seq_scale, const float* coef,
               const int64_t* n_groups, int clip_mode, float log_low, float log_high,
               float* token_grad, unsigned long long* counters, cudaStream_t stream);

// Loss head rows: z = logits * inv_temperature over [rows, vocab] (unit column stride).
// lse = logsumexp(z), logp = z[target] - lse (0 for a target outside [0, vocab)),
// entropy = lse - sum softmax(z) z (skipped when entropy == nullptr).
int logits_row_stats(const void* logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride,
                     const int64_t* targets, float inv_temperature, float* lse, float* logp,
                     float* entropy, cudaStream_t stream);

// Overwrites logits with grad_logp * (onehot(target) - softmax(z)) * inv_temperature.
int logits_grad_inplace(void* logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride,
                        const int64_t* targets, const float* lse, const float* grad_logp,
                        float inv_temperature, cudaStream_t stream);

const char* error_string(int code);

}  // namespace lpo
