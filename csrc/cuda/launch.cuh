// The GPU side of the kernel headers' launch interface (the CPU emulator in tests/cuda_emu provides the same
// names): the launch macro, and the SM count used to size grids, cached per device.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>

#define KL_EXT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)

namespace kl_ext {
namespace cuda {

inline int sm_count(int device) {
  static std::array<int, 64> cache{};  // 0 = not asked yet; a race writes the same value
  const bool cached = device >= 0 && device < int(cache.size());
  if (cached && cache[device] > 0) return cache[device];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (cached) cache[device] = n;
  return n;
}

}  // namespace cuda
}  // namespace kl_ext
