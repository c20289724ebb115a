// The GPU side of the kernel headers' interface to the device (tests/cuda_emu/cuda_emu.h provides the same
// names on the CPU): launches, thread-block clusters, and device facts, cached per device.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <array>

#define KL_EXT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)

// A launch with `smem` bytes of dynamic shared memory (KL_EXT_DYN_SHARED), opted into above the default 48 KB.
#define KL_EXT_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...)                                  \
  do {                                                                                             \
    if ((smem) > 48 * 1024) {                                                                      \
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem))); \
    }                                                                                              \
    kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__);                                    \
  } while (0)

// A launch in clusters of `cluster` consecutive blocks (sm_90+); above 8 (the portable limit) opted into.
#define KL_EXT_LAUNCH_CLUSTER(kernel, grid, block, cluster, stream, ...)          \
  do {                                                                           \
    if ((cluster) > 8) {                                                         \
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1)); \
    }                                                                            \
    cudaLaunchAttribute attr_[1];                                                \
    attr_[0].id = cudaLaunchAttributeClusterDimension;                           \
    attr_[0].val.clusterDim.x = unsigned(cluster);                               \
    attr_[0].val.clusterDim.y = 1;                                               \
    attr_[0].val.clusterDim.z = 1;                                               \
    cudaLaunchConfig_t config_ = {};                                             \
    config_.gridDim = (grid);                                                    \
    config_.blockDim = (block);                                                  \
    config_.dynamicSmemBytes = 0;                                                \
    config_.stream = (stream);                                                   \
    config_.attrs = attr_;                                                       \
    config_.numAttrs = 1;                                                        \
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config_, kernel, __VA_ARGS__));           \
  } while (0)

// Shared memory that other blocks of a cluster may read (the emulator gives each block its own).
#define KL_EXT_SHARED(type, name, count) __shared__ type name[count]
// The block's dynamic shared memory, as `count` values of `type` (the launch's smem bytes; one per kernel).
#define KL_EXT_DYN_SHARED(type, name, count) extern __shared__ type name[]

namespace kl_ext {
namespace cuda {

// Clusters exist from sm_90 on; these are only called by kernels launched in clusters.
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#elif defined(__CUDA_ARCH__)
  __trap();  // compiled for a GPU without clusters (e.g. sm_80 PTX run on sm_90), yet launched in clusters
  return 0;
#else
  return 0;
#endif
}

__device__ __forceinline__ unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().num_blocks();
#else
  return 1;
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

// `p` (this block's shared memory) in block `rank` of the cluster.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  return p;
#endif
}

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

inline int sm_count(int device) {
  static std::array<int, 64> cache{};  // 0 = not asked yet; a race writes the same value
  const bool cached = device >= 0 && device < int(cache.size());
  if (cached && cache[device] > 0) return cache[device];
  const int n = device_attribute(cudaDevAttrMultiProcessorCount, device);
  if (cached) cache[device] = n;
  return n;
}

inline bool has_clusters(int device) {
  static std::array<int, 64> cache{};  // 0 = not asked yet, 1 = no, 2 = yes
  const bool cached = device >= 0 && device < int(cache.size());
  if (cached && cache[device] > 0) return cache[device] == 2;
  const bool yes = device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9;
  if (cached) cache[device] = yes ? 2 : 1;
  return yes;
}

}  // namespace cuda
}  // namespace kl_ext
