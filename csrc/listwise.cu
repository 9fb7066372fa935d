// The listwise step of LPO (spec: shared/docs/lpo-math.md, contract:
// lpo_kernels/reference.py::listwise_forward) in four launches:
//   1. sequence_sums:   one block per sequence reduces sum_t m*delta and N = sum_t m;
//   2. group_step:      one warp per group: scores -> group softmax P, target w*,
//                       divergence D and coefficients c_k = dD/ds_k (written per sequence);
//   3. finalize_groups: one block sums the per-group values into the loss and stats and
//                       counts the groups G (read on the device by pass 4: no host sync);
//   4. token_grad:      one block per sequence spreads c_k / N_k [/ G] over its tokens with
//                       the clip gate and counts clipped tokens for the stats.
// Per-token passes are memory-bound; the group pass touches O(n_seqs) floats.
#include <math.h>

#include <type_traits>

#include "common.cuh"
#include "lpo_cuda.h"

namespace lpo {
namespace {

constexpr int kTokenThreads = 256;  // most threads per sequence block
constexpr int kGroupWarps = 4;  // groups per block in the group pass

template <int Kind>
__device__ __forceinline__ float load_mask(const void* mask, int64_t i) {
  if constexpr (Kind == kMaskNone) return 1.0f;
  else if constexpr (Kind == kMaskU8) return static_cast<const uint8_t*>(mask)[i] ? 1.0f : 0.0f;
  else return static_cast<const float*>(mask)[i];
}

// Packed sequence b is tokens [c_b, max(c_b, c_{b+1})) with c = cu_seqlens clamped into
// [0, N]: malformed offsets (validate=False) never reach outside the N tokens.
__device__ __forceinline__ void sequence_range(const int64_t* cu_seqlens, int64_t seq_len, int64_t n_tokens,
                                               int64_t b, int64_t& start, int64_t& end) {
  if (cu_seqlens != nullptr) {
    start = min(max(cu_seqlens[b], int64_t(0)), n_tokens);
    end = min(max(cu_seqlens[b + 1], start), n_tokens);
  } else {
    start = b * seq_len;
    end = start + seq_len;
  }
}

// Malformed offsets sequence b owns (offset b+1; sequence 0 also offset 0), counted as
// lpo_kernels/inputs.py::malformed_offsets counts them.
__device__ __forceinline__ unsigned long long bad_offsets(const int64_t* cu_seqlens, int64_t n_seqs,
                                                          int64_t n_tokens, int64_t b) {
  const int64_t first = cu_seqlens[b], last = cu_seqlens[b + 1];
  unsigned long long bad = (last < 0 || last > n_tokens || last < first || (b == n_seqs - 1 && last != n_tokens));
  if (b == 0 && first != 0) bad += 1;
  return bad;
}

// delta = logp - old_logp at counted tokens, 0 elsewhere (padding values never leak).
template <typename T, bool HasOld>
__device__ __forceinline__ float token_delta(const T* logp, const T* old, int64_t i, float m) {
  if (!HasOld || m == 0.0f) return 0.0f;
  return to_float(logp[i]) - to_float(old[i]);
}

template <typename T, int Mask, bool HasOld>
__global__ void __launch_bounds__(kTokenThreads)
sequence_sums_kernel(const T* __restrict__ logp, const T* __restrict__ old, const void* __restrict__ mask,
                     const int64_t* __restrict__ cu_seqlens, int64_t seq_len, int64_t total_tokens,
                     float* __restrict__ sum_delta, float* __restrict__ n_tokens) {
  const int64_t b = blockIdx.x;
  int64_t start, end;
  sequence_range(cu_seqlens, seq_len, total_tokens, b, start, end);
  float weighted = 0.0f, count = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float m = load_mask<Mask>(mask, i);
    weighted += m * token_delta<T, HasOld>(logp, old, i, m);
    count += m;
  }
  weighted = block_sum(weighted);
  count = block_sum(count);
  if (threadIdx.x == 0) {
    sum_delta[b] = weighted;
    n_tokens[b] = count;
  }
}

template <typename T, int Mask, bool HasOld>
__global__ void __launch_bounds__(kTokenThreads)
token_grad_kernel(const T* __restrict__ logp, const T* __restrict__ old, const void* __restrict__ mask,
                  const int64_t* __restrict__ cu_seqlens, int64_t seq_len, int64_t n_seqs, int64_t total_tokens,
                  const float* __restrict__ seq_scale, const float* __restrict__ coef,
                  const int64_t* __restrict__ n_groups, int clip_mode, float log_low, float log_high,
                  float* __restrict__ token_grad, unsigned long long* __restrict__ counters) {
  const int64_t b = blockIdx.x;
  int64_t start, end;
  sequence_range(cu_seqlens, seq_len, total_tokens, b, start, end);
  const float scale = seq_scale[b];
  const float c = coef[b];
  // reduction="mean": 1/G, G read on the device (no host sync).
  const float per_group = n_groups != nullptr ? 1.0f / static_cast<float>(max(*n_groups, int64_t(1))) : 1.0f;
  // ppo gates only the side the coefficient pushes towards (c > 0 lowers logp).
  const bool gate_low = clip_mode == kClipClamp || (clip_mode == kClipPPO && c > 0.0f);
  const bool gate_high = clip_mode == kClipClamp || (clip_mode == kClipPPO && c < 0.0f);
  unsigned long long counted = 0, low = 0, high = 0;
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
    const float m = load_mask<Mask>(mask, i);
    const float delta = token_delta<T, HasOld>(logp, old, i, m);
    const bool below = gate_low && delta < log_low;
    const bool above = gate_high && delta > log_high;
    const bool gated = below || above;
    token_grad[i] = gated ? 0.0f : (scale * m) * per_group;
    if (m != 0.0f) {
      counted += 1;
      low += below;
      high += above;
    }
  }
  counted = block_sum_u64(counted);
  low = block_sum_u64(low);
  high = block_sum_u64(high);
  if (threadIdx.x == 0 && counted > 0) {
    atomicAdd(counters + 0, counted);
    if (low) atomicAdd(counters + 1, low);
    if (high) atomicAdd(counters + 2, high);
  }
  if (cu_seqlens != nullptr) {
    if (threadIdx.x == 0) {
      const unsigned long long bad = bad_offsets(cu_seqlens, n_seqs, total_tokens, b);
      if (bad) atomicAdd(counters + 3, bad);
    }
    if (b == 0) {  // tokens before the first / from the last clamped offset: no sequence holds them
      const int64_t head = min(max(cu_seqlens[0], int64_t(0)), total_tokens);
      const int64_t tail = min(max(cu_seqlens[n_seqs], int64_t(0)), total_tokens);
      for (int64_t i = threadIdx.x; i < head; i += blockDim.x) token_grad[i] = 0.0f;
      for (int64_t i = tail + threadIdx.x; i < total_tokens; i += blockDim.x) token_grad[i] = 0.0f;
    }
  }
}

// ---------------------------------------------------------------------------- group pass
struct Member {
  bool valid;
  float score;  // s_k
  float value;  // reward or advantage
};

__device__ __forceinline__ Member load_member(const float* sum_delta, const float* n_tokens,
                                              const float* values, int64_t k, bool mean) {
  const float n = n_tokens[k];
  Member out;
  out.valid = n > 0.0f;
  out.score = mean ? sum_delta[k] / (out.valid ? n : 1.0f) : sum_delta[k];
  out.value = values[k];
  return out;
}

// Group statistics the target logits phi depend on. mean and the std inside
// denom_or_factor are of value / scale, scale a power of two near the largest |value|
// (reference.target_logits): no overflow (rewards ~3e38) or underflow (deviations ~1e-30).
struct TargetStats {
  float count, scale, mean, denom_or_factor;
  bool constant;
};

// reference.pow2_scale: the power of two <= absmax, at least FLT_MIN (dividing by it is exact).
__device__ __forceinline__ float pow2_scale(float absmax) {
  int exponent;
  frexpf(absmax, &exponent);
  return fmaxf(ldexpf(1.0f, exponent - 1), 1.17549435e-38f);
}

// reference.saturate_logits: an overflowed target logit becomes the largest finite one.
__device__ __forceinline__ float saturate_logit(float phi) {
  constexpr float kLimit = 3.40282347e38f;  // FLT_MAX
  return fminf(fmaxf(phi, -kLimit), kLimit);
}

// reference.log_prob_floor: shifted logits x - max held >= -FLT_MAX/4 (exp is 0 just the
// same; differences of two log-probabilities stay finite).
__device__ __forceinline__ float floor_shifted(float shifted) { return fmaxf(shifted, -3.40282347e38f / 4.0f); }

__device__ __forceinline__ float target_logit(const Member& m, const TargetStats& st, const GroupParams& p) {
  if (!m.valid || st.constant) return 0.0f;  // uniform target for an all-equal group
  const float centered = m.value / st.scale - st.mean;
  float phi;
  switch (p.target) {
    case kGrpo:
    case kMaxrl: phi = centered / st.denom_or_factor; break;
    case kDrGrpo: phi = centered * st.scale; break;
    case kRloo: phi = centered * st.scale * st.denom_or_factor; break;
    default: phi = m.value; break;  // softmax, advantages
  }
  return saturate_logit(phi / p.tau);
}

struct Probs { float lp, lw, p, w; };

// reference.alpha_parts: the alpha divergence in a form exact as alpha -> 0 or 1.
// e = base (1 + expm1(g d)) with base = P, g = a, d = lw - lp when a <= 1/2, else base = w,
// g = 1 - a, d = lp - lw; gap = e - base; D_k = ((other - base) - gap / g) / (1 - g).
struct AlphaForm {
  bool p_form;
  float a, g;  // g = min(a, 1 - a), taken in double (exact also for a within 1e-10 of 1)
};
struct AlphaParts { float base, gap, term; };

__device__ __forceinline__ AlphaForm alpha_form(double alpha) {
  const bool p_form = alpha <= 0.5;
  return AlphaForm{p_form, static_cast<float>(alpha), static_cast<float>(p_form ? alpha : 1.0 - alpha)};
}

__device__ __forceinline__ AlphaParts alpha_parts(const Probs& q, const AlphaForm& f) {
  const float base = f.p_form ? q.p : q.w, other = f.p_form ? q.w : q.p;
  const float log_base = f.p_form ? q.lp : q.lw, log_other = f.p_form ? q.lw : q.lp;
  const float x = f.g * (log_other - log_base);
  AlphaParts out;
  out.base = base;
  // |x| >= 1/4: e / base is > 22% from 1, e - base loses < 3 bits; e <= 1 never overflows
  out.gap = fabsf(x) < 0.25f ? base * expm1f(x) : expf((1.0f - f.g) * log_base + f.g * log_other) - base;
  out.term = ((other - base) - out.gap / f.g) / (1.0f - f.g);
  return out;
}

__device__ __forceinline__ float log_add_exp(float a, float b) {
  const float hi = fmaxf(a, b), lo = fminf(a, b);
  return hi + log1pf(expf(lo - hi));
}

__global__ void __launch_bounds__(kGroupWarps * 32)
group_step_kernel(const float* __restrict__ sum_delta, const float* __restrict__ n_tokens,
                  const float* __restrict__ values, const int64_t* __restrict__ order,
                  const int64_t* __restrict__ offsets, int64_t group_size, int64_t n_slots, GroupParams p,
                  float* __restrict__ coef, float* __restrict__ seq_scale, float* __restrict__ divergence,
                  float* __restrict__ entropy_p, float* __restrict__ entropy_w,
                  float* __restrict__ abs_coef, float* __restrict__ members) {
  const int lane = threadIdx.x & 31;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kGroupWarps + (threadIdx.x >> 5);
  if (g >= n_slots) return;  // whole warps exit together
  const int64_t begin = offsets != nullptr ? offsets[g] : g * group_size;
  const int64_t end = offsets != nullptr ? offsets[g + 1] : begin + group_size;
  const bool mean_reduce = p.seq_reduce_mean != 0;
  auto seq = [&](int64_t j) { return order != nullptr ? order[j] : j; };
  auto member = [&](int64_t j) { return load_member(sum_delta, n_tokens, values, seq(j), mean_reduce); };

  // (a) count, value min/max, score max.
  float count = 0.0f, value_max = -INFINITY, value_min = INFINITY, score_max = -INFINITY;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Member m = member(j);
    if (!m.valid) continue;
    count += 1.0f;
    value_max = fmaxf(value_max, m.value);
    value_min = fminf(value_min, m.value);
    score_max = fmaxf(score_max, m.score);
  }
  count = warp_sum(count);
  value_max = warp_max(value_max);
  value_min = warp_min(value_min);
  score_max = warp_max(score_max);

  TargetStats st;
  st.count = count;
  st.scale = pow2_scale(count > 0.0f ? fmaxf(fabsf(value_max), fabsf(value_min)) : 0.0f);
  st.constant = value_max == value_min;
  float value_sum = 0.0f;  // (a2) mean of value / scale
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Member m = member(j);
    if (m.valid) value_sum += m.value / st.scale;
  }
  st.mean = warp_sum(value_sum) / fmaxf(count, 1.0f);
  st.denom_or_factor = 1.0f;
  if (p.target == kGrpo) {  // (b) Bessel-corrected std (of value / scale: + eps / scale)
    float squares = 0.0f;
    for (int64_t j = begin + lane; j < end; j += 32) {
      const Member m = member(j);
      const float x = m.value / st.scale - st.mean;
      if (m.valid) squares += x * x;
    }
    const float denom = sqrtf(warp_sum(squares) / fmaxf(count - 1.0f, 1.0f)) + p.eps / st.scale;
    st.denom_or_factor = denom > 0.0f ? denom : 1.0f;
  } else if (p.target == kMaxrl) {
    const float denom = st.mean + p.eps / st.scale;
    st.denom_or_factor = denom > 0.0f ? denom : 1.0f;
  } else if (p.target == kRloo) {
    st.denom_or_factor = count / fmaxf(count - 1.0f, 1.0f);
  }

  // (c) max of phi, then (d) both softmax normalisers.
  float phi_max = -INFINITY;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Member m = member(j);
    if (m.valid) phi_max = fmaxf(phi_max, target_logit(m, st, p));
  }
  phi_max = warp_max(phi_max);
  float norm_p = 0.0f, norm_w = 0.0f;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Member m = member(j);
    if (!m.valid) continue;
    norm_p += expf(m.score - score_max);
    norm_w += expf(target_logit(m, st, p) - phi_max);
  }
  const float log_norm_p = logf(warp_sum(norm_p));
  const float log_norm_w = logf(warp_sum(norm_w));

  auto probs = [&](const Member& m) {
    Probs q;
    q.lp = floor_shifted(m.score - score_max) - log_norm_p;
    q.lw = floor_shifted(target_logit(m, st, p) - phi_max) - log_norm_w;
    q.p = expf(q.lp);
    q.w = expf(q.lw);
    return q;
  };
  const AlphaForm form = alpha_form(p.alpha);

  // (e) divergence, entropies, and the group sum each coefficient needs.
  float div = 0.0f, ent_p = 0.0f, ent_w = 0.0f, group_term = 0.0f;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const Member m = member(j);
    if (!m.valid) continue;
    const Probs q = probs(m);
    ent_p -= q.p * q.lp;
    ent_w -= q.w * q.lw;
    switch (p.divergence) {
      case kForwardKL: div += q.w * (q.lw - q.lp); break;
      case kReverseKL: {
        const float t = q.p * (q.lp - q.lw);
        div += t;
        group_term += t;
        break;
      }
      case kAlpha: {  // group_term = sum_j e_j - 1
        const AlphaParts ap = alpha_parts(q, form);
        div += ap.term;
        group_term += ap.gap;
        break;
      }
      default: {  // js
        const float log_m = log_add_exp(q.lp, q.lw) - 0.69314718055994531f;
        div += 0.5f * (q.p * (q.lp - log_m) + q.w * (q.lw - log_m));
        group_term += q.p * 0.5f * (q.lp - log_m);
        break;
      }
    }
  }
  div = warp_sum(div);
  ent_p = warp_sum(ent_p);
  ent_w = warp_sum(ent_w);
  group_term = warp_sum(group_term);

  // (f) coefficients per sequence.
  float abs_sum = 0.0f;
  for (int64_t j = begin + lane; j < end; j += 32) {
    const int64_t k = seq(j);
    const Member m = member(j);
    float c = 0.0f;
    if (m.valid) {
      const Probs q = probs(m);
      switch (p.divergence) {
        case kForwardKL: c = q.p - q.w; break;
        case kReverseKL: c = q.p * ((q.lp - q.lw) - group_term); break;
        case kAlpha: {
          const AlphaParts ap = alpha_parts(q, form);
          c = -((ap.base - q.p) + ap.gap - q.p * group_term) / form.a;
          break;
        }
        default: {
          const float log_m = log_add_exp(q.lp, q.lw) - 0.69314718055994531f;
          c = q.p * (0.5f * (q.lp - log_m) - group_term);
          break;
        }
      }
    }
    coef[k] = c;
    const float length = mean_reduce ? n_tokens[k] : 1.0f;
    seq_scale[k] = m.valid ? c / length : 0.0f;
    abs_sum += fabsf(c);
  }
  abs_sum = warp_sum(abs_sum);
  if (lane == 0) {
    divergence[g] = div;
    entropy_p[g] = ent_p;
    entropy_w[g] = ent_w;
    abs_coef[g] = abs_sum;
    members[g] = count;
  }
}

// One block: the per-slot arrays reduced to the loss and statistics, in a fixed order
// (deterministic). Also zeroes the token counters the token pass accumulates into.
constexpr int kFinalizeThreads = 256;

__global__ void __launch_bounds__(kFinalizeThreads)
finalize_groups_kernel(const float* __restrict__ divergence, const float* __restrict__ entropy_p,
                       const float* __restrict__ entropy_w, const float* __restrict__ abs_coef,
                       const float* __restrict__ members, int64_t n_slots, int reduction_mean,
                       float* __restrict__ float_out, int64_t* __restrict__ int_out) {
  float div = 0.0f, ent_p = 0.0f, ent_w = 0.0f, abs_sum = 0.0f;
  unsigned long long groups = 0, valid = 0;
  for (int64_t g = threadIdx.x; g < n_slots; g += blockDim.x) {
    div += divergence[g];
    ent_p += entropy_p[g];
    ent_w += entropy_w[g];
    abs_sum += abs_coef[g];
    const float count = members[g];
    groups += count > 0.0f;
    valid += static_cast<unsigned long long>(count);
  }
  div = block_sum(div);
  ent_p = block_sum(ent_p);
  ent_w = block_sum(ent_w);
  abs_sum = block_sum(abs_sum);
  groups = block_sum_u64(groups);
  valid = block_sum_u64(valid);
  if (threadIdx.x == 0) {
    const float per_group = 1.0f / static_cast<float>(groups > 0 ? groups : 1ull);
    float_out[0] = reduction_mean ? div * per_group : div;  // the loss (reduction mean / sum)
    float_out[1] = div * per_group;
    float_out[2] = ent_p * per_group;
    float_out[3] = ent_w * per_group;
    float_out[4] = abs_sum / static_cast<float>(valid > 0 ? valid : 1ull);
    int_out[0] = static_cast<int64_t>(groups);
    int_out[1] = static_cast<int64_t>(valid);
    // counted, clipped low, clipped high, malformed cu_seqlens offsets (the token pass adds them)
    int_out[2] = int_out[3] = int_out[4] = int_out[5] = 0;
  }
}

// Threads per sequence block: the mean sequence length rounded up to a power of two in
// [32, 256], so 32-token responses do not leave 7 of 8 warps idle.
unsigned token_threads(const TokenLayout& t) {
  const int64_t mean_len = t.n_seqs > 0 ? (t.total_tokens + t.n_seqs - 1) / t.n_seqs : 0;
  unsigned threads = 32;
  while (threads < kTokenThreads && threads < mean_len) threads *= 2;
  return threads;
}

// Picks the <dtype, mask kind, has old_logp> instantiation.
template <template <typename, int, bool> class Launch, typename... Args>
int dispatch_tokens(const TokenLayout& t, Args... args) {
  auto with_type = [&](auto type_tag) {
    using T = decltype(type_tag);
    auto with_mask = [&](auto mask_tag) {
      constexpr int M = decltype(mask_tag)::value;
      return t.old_logp != nullptr ? Launch<T, M, true>::run(t, args...) : Launch<T, M, false>::run(t, args...);
    };
    switch (t.mask_kind) {
      case kMaskNone: return with_mask(std::integral_constant<int, kMaskNone>());
      case kMaskU8: return with_mask(std::integral_constant<int, kMaskU8>());
      case kMaskF32: return with_mask(std::integral_constant<int, kMaskF32>());
      default: return static_cast<int>(cudaErrorInvalidValue);
    }
  };
  switch (t.dtype) {
    case kF32: return with_type(float());
    case kBF16: return with_type(__nv_bfloat16());
    case kF16: return with_type(__half());
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

template <typename T, int M, bool HasOld>
struct LaunchSums {
  static int run(const TokenLayout& t, float* sum_delta, float* n_tokens, cudaStream_t stream) {
    sequence_sums_kernel<T, M, HasOld><<<static_cast<unsigned>(t.n_seqs), token_threads(t), 0, stream>>>(
        static_cast<const T*>(t.logp), static_cast<const T*>(t.old_logp), t.mask, t.cu_seqlens, t.seq_len,
        t.total_tokens, sum_delta, n_tokens);
    return static_cast<int>(cudaGetLastError());
  }
};

template <typename T, int M, bool HasOld>
struct LaunchTokenGrad {
  static int run(const TokenLayout& t, const float* seq_scale, const float* coef, const int64_t* n_groups,
                 int clip_mode, float log_low, float log_high, float* out, unsigned long long* counters,
                 cudaStream_t stream) {
    token_grad_kernel<T, M, HasOld><<<static_cast<unsigned>(t.n_seqs), token_threads(t), 0, stream>>>(
        static_cast<const T*>(t.logp), static_cast<const T*>(t.old_logp), t.mask, t.cu_seqlens, t.seq_len,
        t.n_seqs, t.total_tokens, seq_scale, coef, n_groups, clip_mode, log_low, log_high, out, counters);
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace

int sequence_sums(const TokenLayout& tokens, float* sum_delta, float* n_tokens, cudaStream_t stream) {
  if (tokens.n_seqs <= 0) return 0;
  return dispatch_tokens<LaunchSums>(tokens, sum_delta, n_tokens, stream);
}

int group_step(const float* sum_delta, const float* n_tokens, const float* values, const int64_t* order,
               const int64_t* offsets, int64_t group_size, int64_t n_slots, GroupParams params, float* coef,
               float* seq_scale, float* divergence, float* entropy_p, float* entropy_w, float* abs_coef,
               float* members, cudaStream_t stream) {
  if (n_slots <= 0) return 0;
  const unsigned blocks = static_cast<unsigned>((n_slots + kGroupWarps - 1) / kGroupWarps);
  group_step_kernel<<<blocks, kGroupWarps * 32, 0, stream>>>(sum_delta, n_tokens, values, order, offsets,
                                                             group_size, n_slots, params, coef, seq_scale,
                                                             divergence, entropy_p, entropy_w, abs_coef, members);
  return static_cast<int>(cudaGetLastError());
}

int finalize_groups(const float* divergence, const float* entropy_p, const float* entropy_w, const float* abs_coef,
                    const float* members, int64_t n_slots, int reduction_mean, float* float_out, int64_t* int_out,
                    cudaStream_t stream) {
  finalize_groups_kernel<<<1, kFinalizeThreads, 0, stream>>>(divergence, entropy_p, entropy_w, abs_coef, members, n_slots,
                                                 reduction_mean, float_out, int_out);
  return static_cast<int>(cudaGetLastError());
}

int token_grad(const TokenLayout& tokens, const float* seq_scale, const float* coef, const int64_t* n_groups,
               int clip_mode, float log_low, float log_high, float* out, unsigned long long* counters,
               cudaStream_t stream) {
  if (tokens.n_seqs <= 0) return 0;
  return dispatch_tokens<LaunchTokenGrad>(tokens, seq_scale, coef, n_groups, clip_mode, log_low, log_high, out,
                                          counters, stream);
}

}  // namespace lpo
