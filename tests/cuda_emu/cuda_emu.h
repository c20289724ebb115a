// A CPU emulator for the CUDA kernels in csrc/cuda/*.cuh, so CI (no GPU) executes them: every CUDA thread of
// a block is a CPU thread, __syncthreads is a barrier over the block, warp shuffles exchange through a
// per-warp slot array between two warp barriers, and blocks run one after another (so a function-local
// static serves as a block's __shared__ memory), except the blocks of a cluster, which run together, with
// their own KL_EXT_SHARED memory and a barrier over the cluster. 1-D grids and blocks of whole warps only,
// as the kernels use.
// It checks the kernels' logic, indexing and warp-level exchanges; not the GPU's rounding of exp2 / log2, its
// memory model, or speed. A missing __syncthreads before shared memory is reused rarely shows in the results (OS
// threads interleave too coarsely), but ThreadSanitizer reports it (scripts/sanitize.sh builds this with it), and
// AddressSanitizer an out-of-bounds access of a tensor or a block's shared array.
#pragma once
#include <math.h>

#include <array>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <stdexcept>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace emu {

struct Cluster;

struct Block {
  Block(unsigned threads, unsigned rank_, Cluster* cluster_)
      : all(threads), slots(threads / 32), rank(rank_), cluster(cluster_) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<uint64_t, 32>> slots;
  unsigned rank;
  Cluster* cluster;
  // A reader-writer lock, so that ThreadSanitizer sees no ordering between blocks that only look variables up
  // (TSan orders a write lock after every earlier holder, a read lock after writers only): the kernels' own
  // barriers must order their shared-memory accesses, as on a GPU.
  std::shared_mutex lock;
  std::map<std::string, std::vector<unsigned char>> shared;  // KL_EXT_SHARED variables, by name

  // The block's variable `name` (made on first use by any of its threads; never resized after).
  unsigned char* get_shared(const std::string& name, size_t bytes) {
    {
      const std::shared_lock<std::shared_mutex> read(lock);
      const auto it = shared.find(name);
      if (it != shared.end()) return it->second.data();
    }
    const std::unique_lock<std::shared_mutex> write(lock);
    auto& v = shared[name];
    if (v.empty()) v.resize(bytes);
    return v.data();
  }

  // The name and offset of the variable holding `at`, if it is one of this block's.
  bool find(const unsigned char* at, std::string& name, size_t& bytes, size_t& offset) {
    const std::shared_lock<std::shared_mutex> read(lock);
    for (auto& [n, v] : shared) {
      if (at >= v.data() && at < v.data() + v.size()) {
        name = n;
        bytes = v.size();
        offset = size_t(at - v.data());
        return true;
      }
    }
    return false;
  }
};

struct Cluster {
  explicit Cluster(unsigned size, unsigned threads) : all(size * threads) {}
  std::barrier<> all;
  std::vector<std::unique_ptr<Block>> blocks;
};

inline thread_local Block* current = nullptr;

template <typename T>
T* shared(const char* name, size_t count) {
  return reinterpret_cast<T*>(current->get_shared(name, sizeof(T) * count));
}

}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { emu::current->all.arrive_and_wait(); }

inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slot = emu::current->slots[warp];
  auto& bar = *emu::current->warps[warp];
  std::memcpy(&slot[lane], &v, sizeof(T));
  bar.arrive_and_wait();
  T r;
  std::memcpy(&r, &slot[lane ^ unsigned(lane_mask)], sizeof(T));
  bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return r;
}

namespace emu {

template <typename... P, typename... A>
void launch_cluster(void (*kernel)(P...), dim3 grid, dim3 block, unsigned size, A&&... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024 ||
      grid.x % size != 0) {
    throw std::invalid_argument("cuda_emu: 1-D grids of whole clusters, blocks of whole warps (<= 1024 threads)");
  }
  gridDim = grid;
  blockDim = block;
  for (unsigned c = 0; c < grid.x / size; ++c) {
    Cluster cluster(size, block.x);
    for (unsigned r = 0; r < size; ++r) cluster.blocks.push_back(std::make_unique<Block>(block.x, r, &cluster));
    std::vector<std::thread> threads;
    threads.reserve(size * block.x);
    for (unsigned r = 0; r < size; ++r) {
      for (unsigned t = 0; t < block.x; ++t) {
        threads.emplace_back([&, r, t] {
          threadIdx = dim3(t);
          blockIdx = dim3(c * size + r);
          current = cluster.blocks[r].get();
          kernel(args...);
        });
      }
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace emu

namespace kl_ext {
namespace cuda {

inline unsigned cluster_rank() { return emu::current->rank; }
inline unsigned cluster_size() { return unsigned(emu::current->cluster->blocks.size()); }
inline void cluster_sync() { emu::current->cluster->all.arrive_and_wait(); }

// `p`, a KL_EXT_SHARED variable of this block, in block `rank` of the cluster.
template <typename T>
T* cluster_map(T* p, unsigned rank) {
  std::string name;
  size_t bytes = 0, offset = 0;
  if (!emu::current->find(reinterpret_cast<const unsigned char*>(p), name, bytes, offset)) {
    throw std::logic_error("cuda_emu: cluster_map of a pointer outside KL_EXT_SHARED memory");
  }
  return reinterpret_cast<T*>(emu::current->cluster->blocks[rank]->get_shared(name, bytes) + offset);
}

}  // namespace cuda
}  // namespace kl_ext

// A plain launch is a launch in clusters of one block: blocks run one after another.
#define KL_EXT_LAUNCH(kernel, grid, block, stream, ...) ::emu::launch_cluster(kernel, (grid), (block), 1u, __VA_ARGS__)
#define KL_EXT_LAUNCH_CLUSTER(kernel, grid, block, cluster, stream, ...) \
  ::emu::launch_cluster(kernel, (grid), (block), unsigned(cluster), __VA_ARGS__)
#define KL_EXT_SHARED(type, name, count) type* name = ::emu::shared<type>(#name, (count))
#define KL_EXT_DYN_SHARED(type, name, count) KL_EXT_SHARED(type, name, count)
#define KL_EXT_LAUNCH_SMEM(kernel, grid, block, smem, stream, ...) KL_EXT_LAUNCH(kernel, grid, block, stream, __VA_ARGS__)
