// Row kernels of the fused loss head over a chunk of logits [rows, vocab]:
//   logits_row_stats:    online log-sum-exp, target log-prob and optional entropy, one pass;
//   logits_grad_inplace: d loss / d logits = g * (onehot(target) - softmax(z)) / T, written
//                        over the logits in their own dtype.
// Memory-bound: one block per row, 16-byte vector loads (several in flight), fp32 math,
// warp-shuffle reductions. Rows whose base or stride is not 16-byte aligned take the
// scalar path.
#include <math.h>

#include "common.cuh"
#include "lpo_cuda.h"

namespace lpo {
namespace {

constexpr int kRowThreads = 512;
constexpr int kUnroll = 4;  // vector loads in flight per thread

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kSize];
  };
};

// Running (max m, sum e^(z-m), sum e^(z-m) z) of one thread.
struct OnlineLSE {
  float m = -INFINITY, s = 0.0f, t = 0.0f;

  __device__ __forceinline__ void rescale_to(float new_max) {
    if (new_max > m) {
      const float f = m == -INFINITY ? 0.0f : __expf(m - new_max);
      s *= f;
      t *= f;
      m = new_max;
    }
  }
  template <bool Entropy>
  __device__ __forceinline__ void add(float z) {  // z <= m
    const float e = z == -INFINITY ? 0.0f : __expf(z - m);  // -inf - -inf would be NaN
    s += e;
    if (Entropy) t += e > 0.0f ? e * z : 0.0f;  // e*z would be NaN at z = -inf
  }
  __device__ __forceinline__ void merge(const OnlineLSE& o) {
    const float nm = fmaxf(m, o.m);
    if (nm == -INFINITY) return;
    const float f1 = m == -INFINITY ? 0.0f : __expf(m - nm);
    const float f2 = o.m == -INFINITY ? 0.0f : __expf(o.m - nm);
    s = s * f1 + o.s * f2;
    t = t * f1 + o.t * f2;
    m = nm;
  }
};

__device__ __forceinline__ OnlineLSE shfl_lse(const OnlineLSE& x, int offset) {
  OnlineLSE o;
  o.m = __shfl_xor_sync(0xffffffffu, x.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, x.s, offset);
  o.t = __shfl_xor_sync(0xffffffffu, x.t, offset);
  return o;
}

template <typename T, bool Vectorized, bool Entropy>
__global__ void __launch_bounds__(kRowThreads)
row_stats_kernel(const T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                 const int64_t* __restrict__ targets, float inv_t, float* __restrict__ lse_out,
                 float* __restrict__ logp_out, float* __restrict__ entropy_out) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  OnlineLSE acc;
  int64_t scalar_from = 0;
  if constexpr (Vectorized) {
    constexpr int K = Vec<T>::kSize;
    const int64_t n_vec = vocab / K;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (int64_t base = threadIdx.x; base < n_vec; base += int64_t(kUnroll) * blockDim.x) {
      Vec<T> chunk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // issue every load before the first use
        const int64_t i = base + int64_t(u) * blockDim.x;
        chunk[u].raw = i < n_vec ? __ldg(xv + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + int64_t(u) * blockDim.x >= n_vec) break;
        float z[K];
        float zmax = -INFINITY;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          z[k] = to_float(chunk[u].v[k]) * inv_t;
          zmax = fmaxf(zmax, z[k]);
        }
        acc.rescale_to(zmax);
#pragma unroll
        for (int k = 0; k < K; ++k) acc.add<Entropy>(z[k]);
      }
    }
    scalar_from = n_vec * K;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < vocab; j += blockDim.x) {
    const float z = to_float(x[j]) * inv_t;
    acc.rescale_to(z);
    acc.add<Entropy>(z);
  }

  // Block merge: warps by shuffles, then the first warp over the warp results.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc.merge(shfl_lse(acc, offset));
  __shared__ float sm[32], ss[32], st[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = acc.m;
    ss[warp] = acc.s;
    st[warp] = acc.t;
  }
  __syncthreads();
  if (warp != 0) return;
  OnlineLSE total;
  if (lane < (blockDim.x >> 5)) {
    total.m = sm[lane];
    total.s = ss[lane];
    total.t = st[lane];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total.merge(shfl_lse(total, offset));
  if (lane == 0) {
    const float lse = total.m + logf(total.s);
    lse_out[row] = lse;
    const int64_t target = targets[row];
    logp_out[row] = (target >= 0 && target < vocab) ? to_float(x[target]) * inv_t - lse : 0.0f;
    if (Entropy) entropy_out[row] = lse - total.t / total.s;
  }
}

template <typename T, bool Vectorized>
__global__ void __launch_bounds__(kRowThreads)
grad_inplace_kernel(T* __restrict__ logits, int64_t vocab, int64_t row_stride,
                    const int64_t* __restrict__ targets, const float* __restrict__ lse_in,
                    const float* __restrict__ grad_logp, float inv_t) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * row_stride;
  const float g = grad_logp[row];
  const float lse = lse_in[row];
  const int64_t target = targets[row];
  // d logp / d z = onehot - softmax(z); times g, times dz/dlogits = 1/T.
  auto grad = [&](float logit, int64_t j) -> float {
    if (g == 0.0f) return 0.0f;  // masked rows: zeros without trusting the logits
    const float p = __expf(logit * inv_t - lse);
    return g * ((j == target ? 1.0f : 0.0f) - p) * inv_t;
  };
  int64_t scalar_from = 0;
  if constexpr (Vectorized) {
    constexpr int K = Vec<T>::kSize;
    const int64_t n_vec = vocab / K;
    uint4* xv = reinterpret_cast<uint4*>(x);
    for (int64_t base = threadIdx.x; base < n_vec; base += int64_t(kUnroll) * blockDim.x) {
      Vec<T> chunk[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (g != 0.0f && i < n_vec) chunk[u].raw = xv[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * blockDim.x;
        if (i >= n_vec) break;
        Vec<T> out;
#pragma unroll
        for (int k = 0; k < K; ++k) out.v[k] = from_float<T>(grad(to_float(chunk[u].v[k]), i * K + k));
        xv[i] = out.raw;
      }
    }
    scalar_from = n_vec * K;
  }
  for (int64_t j = scalar_from + threadIdx.x; j < vocab; j += blockDim.x) {
    x[j] = from_float<T>(grad(g == 0.0f ? 0.0f : to_float(x[j]), j));
  }
}

bool aligned16(const void* base, int64_t row_stride, size_t elem) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * static_cast<int64_t>(elem)) % 16 == 0;
}

template <typename T>
int launch_row_stats(const void* logits, int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* targets,
                     float inv_t, float* lse, float* logp, float* entropy, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  const bool vec = aligned16(logits, row_stride, sizeof(T));
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec && entropy) row_stats_kernel<T, true, true><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, inv_t, lse, logp, entropy);
  else if (vec) row_stats_kernel<T, true, false><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, inv_t, lse, logp, entropy);
  else if (entropy) row_stats_kernel<T, false, true><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, inv_t, lse, logp, entropy);
  else row_stats_kernel<T, false, false><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, inv_t, lse, logp, entropy);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_grad(void* logits, int64_t rows, int64_t vocab, int64_t row_stride, const int64_t* targets,
                const float* lse, const float* grad_logp, float inv_t, cudaStream_t stream) {
  T* x = static_cast<T*>(logits);
  const dim3 grid(static_cast<unsigned>(rows));
  if (aligned16(logits, row_stride, sizeof(T)))
    grad_inplace_kernel<T, true><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, lse, grad_logp, inv_t);
  else
    grad_inplace_kernel<T, false><<<grid, kRowThreads, 0, stream>>>(x, vocab, row_stride, targets, lse, grad_logp, inv_t);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int logits_row_stats(const void* logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride,
                     const int64_t* targets, float inv_t, float* lse, float* logp, float* entropy,
                     cudaStream_t stream) {
  if (rows <= 0) return 0;
  switch (dtype) {
    case kF32: return launch_row_stats<float>(logits, rows, vocab, row_stride, targets, inv_t, lse, logp, entropy, stream);
    case kBF16: return launch_row_stats<__nv_bfloat16>(logits, rows, vocab, row_stride, targets, inv_t, lse, logp, entropy, stream);
    case kF16: return launch_row_stats<__half>(logits, rows, vocab, row_stride, targets, inv_t, lse, logp, entropy, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

int logits_grad_inplace(void* logits, int dtype, int64_t rows, int64_t vocab, int64_t row_stride,
                        const int64_t* targets, const float* lse, const float* grad_logp, float inv_t,
                        cudaStream_t stream) {
  if (rows <= 0) return 0;
  switch (dtype) {
    case kF32: return launch_grad<float>(logits, rows, vocab, row_stride, targets, lse, grad_logp, inv_t, stream);
    case kBF16: return launch_grad<__nv_bfloat16>(logits, rows, vocab, row_stride, targets, lse, grad_logp, inv_t, stream);
    case kF16: return launch_grad<__half>(logits, rows, vocab, row_stride, targets, lse, grad_logp, inv_t, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace lpo
