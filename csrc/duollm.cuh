// Shared declarations and device helpers of the duollm CUDA kernels (extension duollm._C).
//
// Only CUDA headers here (docs/kernels.md): every .cu file compiles on its own with
//   nvcc -std=c++17 -arch=sm_90 -c file.cu
// and csrc/bindings.cpp (the one file that sees torch) calls the launchers declared below.
// Launchers take raw pointers, sizes and a stream, never synchronise, launch nothing for an
// empty problem, and return the launch status (cudaGetLastError) for the caller to check.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace duollm {

// Element types the row kernels are instantiated for (bindings maps torch dtypes to these).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// Integer types a routes tensor may have.
enum class IType : int { kInt8 = 0, kUInt8 = 1, kInt16 = 2, kInt32 = 3, kInt64 = 4 };

// ----------------------------------------------------------------------------- grouping.cu

// Largest num_paths group_tokens supports (its per-block tables live in shared memory).
constexpr int kMaxPaths = 1024;

// int64 elements of scratch memory launch_group_tokens needs for n tokens and num_paths paths.
int64_t group_tokens_workspace_size(int64_t n, int num_paths);

// Stable counting sort of token ids by route. routes (n,) of type rtype; writes
// perm (n,), inv (n,), counts (num_paths,), offsets (num_paths + 1,) and routes_out (n,) (the
// routes as int64), all int64. A route outside [0, num_paths) is never written out of bounds:
// such tokens go after every path (perm stays a permutation; offsets[num_paths] counts only
// the valid tokens). workspace: group_tokens_workspace_size(n, num_paths) int64 elements.
// n == 0 launches nothing (counts and offsets are then left for the caller to zero).
cudaError_t launch_group_tokens(const void* routes, IType rtype, int64_t n, int num_paths,
                                int64_t* perm, int64_t* inv, int64_t* counts, int64_t* offsets,
                                int64_t* routes_out, int64_t* workspace, cudaStream_t stream);

// ----------------------------------------------------------------------------- permute.cu

// RMSNorm side tensors (weight, rstd, dweight, workspace) are of the arithmetic type of the
// rows: fp32 for float32/float16/bfloat16 rows, fp64 for float64 rows (as reference.rms_norm).

// out[i, :] = x[index[i], :] for i < n (rows of width d). With weight != nullptr ((d,)) each
// row is RMS-normalised in the arithmetic type ((x * rstd) * weight, cast back, the Llama
// convention) and rstd ((n,)) receives 1/sqrt(mean(x^2) + eps) per output row.
cudaError_t launch_gather_fwd(const void* x, const int64_t* index, const void* weight,
                              void* out, void* rstd, int64_t n, int64_t d, double eps,
                              DType dtype, cudaStream_t stream);

// Elements (of the arithmetic type) of scratch memory launch_gather_bwd needs for dweight.
int64_t gather_bwd_workspace_size(int64_t n, int64_t d);

// Backward of launch_gather_fwd with index = perm (inv its inverse).
// Without weight: dx[t, :] = dy[inv[t], :].
// With weight: dx[perm[i]] = rstd_i * (dy_i * w - xhat_i * mean(dy_i * w * xhat_i)),
// xhat_i = x[perm[i]] * rstd_i; and, if dweight != nullptr, dweight ((d,)) =
// sum_i dy_i * xhat_i, reduced in a fixed order through per-chunk partials in workspace
// (gather_bwd_workspace_size elements): deterministic, no atomics.
cudaError_t launch_gather_bwd(const void* dy, const void* x, const int64_t* perm,
                              const int64_t* inv, const void* weight, const void* rstd,
                              void* dx, void* dweight, void* workspace, int64_t n, int64_t d,
                              DType dtype, cudaStream_t stream);

// out[t] = residual[t] + gate[t] * y[inv[t]] for a routed token; out[t] = residual[t] for a
// token whose route r has bit r of skip_mask set or lies outside [0, num_paths) (its row of y
// is never read). residual/gate may be nullptr (zero / one). One pass, no atomics.
cudaError_t launch_scatter_combine_fwd(const void* y, const int64_t* inv, const int64_t* routes,
                                       const void* residual, const void* gate, void* out,
                                       int64_t n, int64_t d, uint64_t skip_mask, int num_paths,
                                       DType dtype, cudaStream_t stream);

// Backward of launch_scatter_combine_fwd with respect to y and gate, row i in grouped order,
// t = perm[i]: dy[i] = gate[t] * dout[t] (0 for a skipped token), and, if dgate != nullptr,
// dgate[t] = dot(dout[t], y[i]) (0 for a skipped token). dy may be nullptr (not needed).
cudaError_t launch_scatter_combine_bwd(const void* dout, const void* y, const int64_t* perm,
                                       const int64_t* routes, const void* gate, void* dy,
                                       void* dgate, int64_t n, int64_t d, uint64_t skip_mask,
                                       int num_paths, DType dtype, cudaStream_t stream);

// ----------------------------------------------------------------------------- device helpers

#ifdef __CUDACC__
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// Arithmetic type of an element type: fp32 for the 16- and 32-bit floats, fp64 for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Explicit conversions only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// VEC consecutive elements moved as one access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p) = v;
}

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Row kernels run blocks of kRowThreads threads shaped (tpr, rows_per_block): each row is
// owned by tpr threads (a multiple of 32) so a row's warps never straddle two rows.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

// Sum of v over the threads of this row; the same value in every one of them. Every thread
// of the block must call it (it may hold a barrier); partial sums are added in a fixed order.
template <typename A> __device__ __forceinline__ A row_sum(A v, A* smem /* [kRowWarps] */) {
  v = warp_sum(v);
  const int wpr = blockDim.x >> 5;  // warps per row, uniform over the block
  if (wpr == 1) return v;
  const int first = (threadIdx.y * blockDim.x) >> 5;
  if ((threadIdx.x & 31) == 0) smem[first + (threadIdx.x >> 5)] = v;
  __syncthreads();
  A s = 0;
  for (int k = 0; k < wpr; ++k) s += smem[first + k];
  __syncthreads();  // smem is reused by the next call
  return s;
}

}  // namespace detail
#endif  // __CUDACC__

}  // namespace duollm
