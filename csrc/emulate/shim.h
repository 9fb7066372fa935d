// Host emulation of the CUDA constructs the kernels in csrc/ use, so their logic can be
// tested on a machine without a GPU (tests/test_cuda.py, via build.py): one std::thread per
// CUDA thread, blocks run one after another, std::barrier for __syncthreads and for the
// warp shuffles, a mutex for atomics. Correctness only: says nothing about speed, and a
// race the GPU's scheduling would expose may pass here.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <mutex>

#undef __global__
#undef __device__
#undef __forceinline__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
using std::max;
using std::min;

struct EmuCtx {
  std::barrier<>* block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers;
  std::vector<float>* warp_f;
  std::vector<unsigned long long>* warp_u;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim_, gridDim_;
#define blockDim blockDim_
#define gridDim gridDim_
inline thread_local EmuCtx emu;

inline void __syncthreads() { emu.block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  auto& b = *(*emu.warp_barriers)[w];
  (*emu.warp_f)[threadIdx.x] = v;
  b.arrive_and_wait();
  float r = (*emu.warp_f)[w * 32 + (l ^ off)];
  b.arrive_and_wait();
  return r;
}
inline unsigned long long __shfl_xor_sync(unsigned, unsigned long long v, int off) {
  int w = threadIdx.x / 32, l = threadIdx.x % 32;
  auto& b = *(*emu.warp_barriers)[w];
  (*emu.warp_u)[threadIdx.x] = v;
  b.arrive_and_wait();
  unsigned long long r = (*emu.warp_u)[w * 32 + (l ^ off)];
  b.arrive_and_wait();
  return r;
}
inline std::mutex atomic_mutex;
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  std::lock_guard<std::mutex> g(atomic_mutex);
  auto old = *p; *p += v; return old;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __expf(float x) { return expf(x); }

#define cudaGetLastError() cudaSuccess  // launches cannot fail here

template <typename F, typename... Args>
void emulate_launch(dim3 grid, dim3 block, size_t, cudaStream_t, F kernel, Args... args) {
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bb(block.x);
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    for (unsigned w = 0; w < (block.x + 31) / 32; ++w) wb.emplace_back(new std::barrier<>(32));
    std::vector<float> wf(block.x);
    std::vector<unsigned long long> wu(block.x);
    std::vector<std::thread> threads;
    for (unsigned tx = 0; tx < block.x; ++tx) {
      threads.emplace_back([&, tx] {
        threadIdx = dim3(tx, 0, 0); blockIdx = dim3(bx, 0, 0); blockDim_ = block; gridDim_ = grid;
        emu = EmuCtx{&bb, &wb, &wf, &wu};
        kernel(args...);
      });
    }
    for (auto& t : threads) t.join();
  }
}
