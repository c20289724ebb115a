// Device helpers shared by the CUDA kernels of both losses.
//
// The kernel headers (csrc/cuda/<op>.cuh) are plain CUDA C++ that also compiles as host C++ against
// tests/cuda_emu/cuda_emu.h, which runs each CUDA thread as a CPU thread: CI has no GPU, and that is how it
// still executes these kernels. So: nothing here may include CUDA headers, and kernels are launched through
// KL_EXT_LAUNCH, defined by csrc/cuda/launch.cuh (nvcc) or by the emulator.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>

#include "../common.h"

namespace kl_ext {
namespace cuda {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// One 16-byte load of VEC elements (VEC = 1 when rows are not 16-byte aligned).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Row `row` of base (rows: its RowLayout), as packs of VEC elements.
template <int VEC, typename scalar_t>
__host__ __device__ __forceinline__ const Pack<scalar_t, VEC>* row_packs(const scalar_t* base, const RowLayout& rows,
                                                                         int64_t row) {
  return reinterpret_cast<const Pack<scalar_t, VEC>*>(base + rows(row));
}

template <typename scalar_t>
constexpr int vec_size() {
  return 16 / int(sizeof(scalar_t));
}

// Elements per pack of an input / target pair read together: 16 bytes of the wider one (8 of the other).
template <typename scalar_t, typename target_t>
constexpr int pair_vec() {
  return vec_size<scalar_t>() < vec_size<target_t>() ? vec_size<scalar_t>() : vec_size<target_t>();
}

// exp2 / log2 map to single SFU instructions on the GPU in float; double keeps full precision.
__host__ __device__ __forceinline__ float kexp2(float x) { return exp2f(x); }
__host__ __device__ __forceinline__ double kexp2(double x) { return exp2(x); }
__host__ __device__ __forceinline__ float klog2(float x) { return log2f(x); }
__host__ __device__ __forceinline__ double klog2(double x) { return log2(x); }
__host__ __device__ __forceinline__ float kexp(float x) { return expf(x); }
__host__ __device__ __forceinline__ double kexp(double x) { return exp(x); }
__host__ __device__ __forceinline__ float klog(float x) { return logf(x); }
__host__ __device__ __forceinline__ double klog(double x) { return log(x); }
__host__ __device__ __forceinline__ float klog1p(float x) { return log1pf(x); }
__host__ __device__ __forceinline__ double klog1p(double x) { return log1p(x); }
__host__ __device__ __forceinline__ float kexpm1(float x) { return expm1f(x); }
__host__ __device__ __forceinline__ double kexpm1(double x) { return expm1(x); }

// a * b rounded on its own. nvcc fuses `a * b - c` into one FMA, which keeps a * b unrounded: x * s - m, with
// m the same product rounded, would then not be exactly 0 at the row maximum (V = 1, identical rows).
template <typename T>
__host__ __device__ __forceinline__ T kmul(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// Fast float math for the elementwise kernels, which would otherwise be bound by the accurate libm sequences:
// one SFU instruction each plus a few FMAs, within ~2 ulp (log1p(e) for e in [0, 1] as log(u) * e / (u - 1),
// u = 1 + e, which stays relative-accurate where 1 + e rounds). double keeps the accurate functions.
__host__ __device__ __forceinline__ float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ __forceinline__ double fdiv(double a, double b) { return a / b; }
__host__ __device__ __forceinline__ float fexp(float x) { return exp2f(x * float(kLog2e)); }
__host__ __device__ __forceinline__ double fexp(double x) { return exp(x); }
__host__ __device__ __forceinline__ float flog(float x) { return log2f(x) * float(kLn2); }
__host__ __device__ __forceinline__ double flog(double x) { return log(x); }
__host__ __device__ __forceinline__ float flog1p(float e) {
  const float u = 1.0f + e;
  return u == 1.0f ? e : flog(u) * fdiv(e, u - 1.0f);
}
__host__ __device__ __forceinline__ double flog1p(double e) { return log1p(e); }

// Loaded element -> accumulation type. bfloat16 widens by a shift: the cuda_bf16 intrinsic that c10 uses
// cost the row-resident kernels ~50 more registers (ptxas -v, sm_90).
template <typename scalar_t>
__host__ __device__ __forceinline__ at::opmath_type<scalar_t> to_acc(scalar_t v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}
__host__ __device__ __forceinline__ float to_acc(c10::BFloat16 v) { return c10::detail::f32_from_bits(v.x); }

template <typename T>
__host__ __device__ __forceinline__ T kmax(T a, T b) {
  return a > b ? a : b;
}

template <typename T>
__host__ __device__ __forceinline__ T kinf() {
  return T(INFINITY);
}

// A running max of -inf (nothing with mass seen yet) shifts by 0 instead, so x - m never is -inf - -inf.
template <typename T>
__host__ __device__ __forceinline__ T safe_shift(T m) {
  return m == -kinf<T>() ? T(0) : m;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Each pointer (nullptr: none) on a boundary of VEC elements of its type, as Pack<T, VEC> loads need.
template <int VEC, typename... T>
bool packs_aligned(const T*... p) {
  return ((p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC) == 0) && ...);
}
inline int round_up(int64_t a, int b) { return int(ceil_div(a, b) * b); }

}  // namespace cuda
}  // namespace kl_ext
