// gather (optionally fused with RMSNorm) and scatter_combine, forward and backward.
//
// Every kernel here is a row kernel: tpr threads (a multiple of 32, at most a block) own one
// row of d elements and move it in packs of VEC elements, 16 bytes when d and every row
// pointer allow it, else one element at a time. Row offsets are int64. Top-1 routing makes
// each op a permutation of rows: every output row is written by exactly one row group, so
// there are no atomics and results are deterministic. Reductions (RMSNorm statistics, the
// gate gradient's row dot) are done in fp32 (fp64 for double) in a fixed order; the
// norm-weight gradient is reduced through per-chunk partials, again in a fixed order.
#include "duollm.cuh"

namespace duollm {
namespace {

using detail::acc_t;
using detail::from_acc;
using detail::kRowThreads;
using detail::kRowWarps;
using detail::load_pack;
using detail::Pack;
using detail::row_sum;
using detail::store_pack;
using detail::to_acc;

// norm-weight gradient: column tiles of kDwCols x row chunks of at least kDwMinRows rows.
constexpr int kDwCols = 32;
constexpr int kDwRowThreads = 8;
constexpr int kDwMinRows = 64;
constexpr int kDwMaxChunks = 256;

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

__device__ __forceinline__ bool is_skipped(int64_t r, uint64_t skip_mask, int num_paths) {
  if (r < 0 || r >= num_paths) return true;  // out of range (unvalidated input): no FFN term
  return r < 64 && ((skip_mask >> r) & 1ull);
}

// ----------------------------------------------------------------------------- gather

template <typename T, int VEC, bool NORM>
__global__ void __launch_bounds__(kRowThreads)
_gather_fwd_kernel(const T* __restrict__ x,               // (n, d) source rows
                   const int64_t* __restrict__ index,     // (n,) source row of each output row
                   const acc_t<T>* __restrict__ weight,   // (d,) RMSNorm weight (NORM only)
                   T* __restrict__ out,                   // (n, d)
                   acc_t<T>* __restrict__ rstd,           // (n,) or nullptr (NORM only)
                   int64_t n, int64_t d, double eps) {
  using A = acc_t<T>;
  __shared__ A red[kRowWarps];
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < n;
  const int64_t nvec = d / VEC;
  const T* src = x + (valid ? index[row] : 0) * d;
  T* dst = out + row * d;
  if constexpr (!NORM) {
    if (!valid) return;
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x)
      store_pack<T, VEC>(dst + c * VEC, load_pack<T, VEC>(src + c * VEC));
  } else {
    A ss = A(0);
    if (valid) {
      for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
        const Pack<T, VEC> p = load_pack<T, VEC>(src + c * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const A f = to_acc(p.v[k]);
          ss += f * f;
        }
      }
    }
    ss = row_sum(ss, red);
    if (!valid) return;
    const A r = rsqrt_acc(ss / (A)d + (A)eps);
    if (threadIdx.x == 0 && rstd != nullptr) rstd[row] = r;
    // Second read of the row hits L1/L2; it keeps registers independent of d.
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const Pack<T, VEC> p = load_pack<T, VEC>(src + c * VEC);
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        o.v[k] = from_acc<T>((to_acc(p.v[k]) * r) * __ldg(weight + c * VEC + k));
      store_pack<T, VEC>(dst + c * VEC, o);
    }
  }
}

// dx[perm[i]] = rstd_i * (g - xhat * mean(g * xhat)), g = dy_i * w, xhat = x[perm[i]] * rstd_i.
template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
_gather_norm_bwd_kernel(const T* __restrict__ dy,              // (n, d) grouped order
                        const T* __restrict__ x,               // (n, d) token order
                        const int64_t* __restrict__ perm,      // (n,)
                        const acc_t<T>* __restrict__ weight,   // (d,)
                        const acc_t<T>* __restrict__ rstd,     // (n,) from the forward
                        T* __restrict__ dx,                    // (n, d) token order
                        int64_t n, int64_t d) {
  using A = acc_t<T>;
  __shared__ A red[kRowWarps];
  const int64_t row = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = row < n;
  const int64_t nvec = d / VEC;
  const int64_t t = valid ? perm[row] : 0;
  const T* xr = x + t * d;
  const T* gr = dy + row * d;
  const A r = valid ? rstd[row] : A(0);
  A dot = A(0);
  if (valid) {
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const Pack<T, VEC> xp = load_pack<T, VEC>(xr + c * VEC);
      const Pack<T, VEC> gp = load_pack<T, VEC>(gr + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        dot += to_acc(gp.v[k]) * __ldg(weight + c * VEC + k) * (to_acc(xp.v[k]) * r);
    }
  }
  dot = row_sum(dot, red) / (A)d;
  if (!valid) return;
  T* dr = dx + t * d;
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
    const Pack<T, VEC> xp = load_pack<T, VEC>(xr + c * VEC);
    const Pack<T, VEC> gp = load_pack<T, VEC>(gr + c * VEC);
    Pack<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A g = to_acc(gp.v[k]) * __ldg(weight + c * VEC + k);
      o.v[k] = from_acc<T>(r * (g - to_acc(xp.v[k]) * r * dot));
    }
    store_pack<T, VEC>(dr + c * VEC, o);
  }
}

// partial[chunk, col] = sum over the chunk's rows i of dy[i, col] * x[perm[i], col] * rstd[i].
template <typename T>
__global__ void __launch_bounds__(kDwCols * kDwRowThreads)
_norm_weight_partial_kernel(const T* __restrict__ dy,            // (n, d) grouped order
                            const T* __restrict__ x,             // (n, d) token order
                            const int64_t* __restrict__ perm,    // (n,)
                            const acc_t<T>* __restrict__ rstd,   // (n,)
                            acc_t<T>* __restrict__ partial,      // (chunks, d)
                            int64_t n, int64_t d, int64_t rows_per_chunk) {
  using A = acc_t<T>;
  __shared__ A s[kDwRowThreads][kDwCols + 1];
  const int64_t col = (int64_t)blockIdx.x * kDwCols + threadIdx.x;
  const int64_t begin = (int64_t)blockIdx.y * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < n ? begin + rows_per_chunk : n;
  A acc = A(0);
  if (col < d) {
    for (int64_t i = begin + threadIdx.y; i < end; i += kDwRowThreads)
      acc += to_acc(dy[i * d + col]) * (to_acc(x[perm[i] * d + col]) * rstd[i]);
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    A tot = A(0);
#pragma unroll
    for (int k = 0; k < kDwRowThreads; ++k) tot += s[k][threadIdx.x];
    partial[(int64_t)blockIdx.y * d + col] = tot;
  }
}

template <typename A>
__global__ void _sum_chunks_kernel(const A* __restrict__ partial,  // (chunks, d)
                                   A* __restrict__ out,            // (d,)
                                   int64_t chunks, int64_t d) {
  const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= d) return;
  A tot = A(0);
  for (int64_t k = 0; k < chunks; ++k) tot += partial[k * d + col];
  out[col] = tot;
}

// ----------------------------------------------------------------------------- scatter_combine

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
_scatter_combine_fwd_kernel(const T* __restrict__ y,             // (n, d) grouped order
                            const int64_t* __restrict__ inv,     // (n,)
                            const int64_t* __restrict__ routes,  // (n,)
                            const T* __restrict__ residual,      // (n, d) or nullptr
                            const T* __restrict__ gate,          // (n,) or nullptr
                            T* __restrict__ out,                 // (n, d) token order
                            int64_t n, int64_t d, uint64_t skip_mask, int num_paths) {
  using A = acc_t<T>;
  const int64_t t = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  if (t >= n) return;
  const int64_t nvec = d / VEC;
  const bool skip = is_skipped(routes[t], skip_mask, num_paths);
  const A g = gate != nullptr ? to_acc(gate[t]) : A(1);
  const T* src = y + (skip ? 0 : inv[t]) * d;
  const T* res = residual != nullptr ? residual + t * d : nullptr;
  T* dst = out + t * d;
  for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
    A acc[VEC];
    if (res != nullptr) {
      const Pack<T, VEC> rp = load_pack<T, VEC>(res + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = to_acc(rp.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = A(0);
    }
    if (!skip) {
      const Pack<T, VEC> yp = load_pack<T, VEC>(src + c * VEC);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += g * to_acc(yp.v[k]);
    }
    Pack<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_acc<T>(acc[k]);
    store_pack<T, VEC>(dst + c * VEC, o);
  }
}

// Row i in grouped order, t = perm[i]: dy[i] = gate[t] * dout[t]; dgate[t] = dot(dout[t], y[i]).
template <typename T, int VEC, bool NEED_DGATE>
__global__ void __launch_bounds__(kRowThreads)
_scatter_combine_bwd_kernel(const T* __restrict__ dout,          // (n, d) token order
                            const T* __restrict__ y,             // (n, d) grouped order
                            const int64_t* __restrict__ perm,    // (n,)
                            const int64_t* __restrict__ routes,  // (n,)
                            const T* __restrict__ gate,          // (n,) or nullptr
                            T* __restrict__ dy,                  // (n, d) or nullptr
                            T* __restrict__ dgate,               // (n,) (NEED_DGATE only)
                            int64_t n, int64_t d, uint64_t skip_mask, int num_paths) {
  using A = acc_t<T>;
  __shared__ A red[kRowWarps];
  const int64_t i = (int64_t)blockIdx.x * blockDim.y + threadIdx.y;
  const bool valid = i < n;
  const int64_t nvec = d / VEC;
  const int64_t t = valid ? perm[i] : 0;
  const bool skip = !valid || is_skipped(routes[t], skip_mask, num_paths);
  const A g = (gate != nullptr && !skip) ? to_acc(gate[t]) : A(1);
  const T* go = dout + t * d;
  const T* yr = y + i * d;
  T* dyr = dy != nullptr ? dy + i * d : nullptr;
  A dot = A(0);
  if (valid) {
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      Pack<T, VEC> o;
      if (skip) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_acc<T>(A(0));
      } else {
        const Pack<T, VEC> gp = load_pack<T, VEC>(go + c * VEC);
        if constexpr (NEED_DGATE) {
          const Pack<T, VEC> yp = load_pack<T, VEC>(yr + c * VEC);
#pragma unroll
          for (int k = 0; k < VEC; ++k) dot += to_acc(gp.v[k]) * to_acc(yp.v[k]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_acc<T>(g * to_acc(gp.v[k]));
      }
      if (dyr != nullptr) store_pack<T, VEC>(dyr + c * VEC, o);
    }
  }
  if constexpr (NEED_DGATE) {
    dot = row_sum(dot, red);
    if (valid && threadIdx.x == 0) dgate[t] = from_acc<T>(dot);
  }
}

// ----------------------------------------------------------------------------- launch helpers

template <typename T> struct Tag { using type = T; };

template <typename Fn> cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(Tag<float>{});
    case DType::kFloat16: return fn(Tag<__half>{});
    case DType::kBFloat16: return fn(Tag<__nv_bfloat16>{});
    case DType::kFloat64: return fn(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

inline bool aligned16(const void* p) { return p == nullptr || (uintptr_t)p % 16 == 0; }

// Widest pack for T when d and every row pointer allow 16-byte accesses, else 1.
template <typename T>
inline bool can_vectorise(int64_t d, const void* a, const void* b, const void* c = nullptr) {
  return d % (16 / sizeof(T)) == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

struct RowGrid {
  dim3 grid, block;
};

// tpr threads per row (the smallest power of two >= the packs per row, in [32, kRowThreads]),
// kRowThreads / tpr rows per block.
inline RowGrid row_grid(int64_t n, int64_t packs_per_row) {
  int tpr = 32;
  while (tpr < packs_per_row && tpr < kRowThreads) tpr <<= 1;
  const int rpb = kRowThreads / tpr;
  return {dim3((unsigned)((n + rpb - 1) / rpb)), dim3(tpr, rpb)};
}

template <typename T, bool NORM>
void gather_rows(const T* x, const int64_t* index, const acc_t<T>* weight, T* out, acc_t<T>* rstd,
                 int64_t n, int64_t d, double eps, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (can_vectorise<T>(d, x, out)) {
    const RowGrid g = row_grid(n, d / V);
    _gather_fwd_kernel<T, V, NORM><<<g.grid, g.block, 0, stream>>>(x, index, weight, out, rstd,
                                                                   n, d, eps);
  } else {
    const RowGrid g = row_grid(n, d);
    _gather_fwd_kernel<T, 1, NORM><<<g.grid, g.block, 0, stream>>>(x, index, weight, out, rstd,
                                                                   n, d, eps);
  }
}

inline int64_t dw_chunks(int64_t n) {
  const int64_t c = (n + kDwMinRows - 1) / kDwMinRows;
  return c < kDwMaxChunks ? c : kDwMaxChunks;
}

}  // namespace

// ----------------------------------------------------------------------------- launchers

cudaError_t launch_gather_fwd(const void* x, const int64_t* index, const void* weight,
                              void* out, void* rstd, int64_t n, int64_t d, double eps,
                              DType dtype, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (weight != nullptr)
      gather_rows<T, true>(static_cast<const T*>(x), index, static_cast<const A*>(weight),
                           static_cast<T*>(out), static_cast<A*>(rstd), n, d, eps, stream);
    else
      gather_rows<T, false>(static_cast<const T*>(x), index, nullptr, static_cast<T*>(out),
                            nullptr, n, d, eps, stream);
    return cudaGetLastError();
  });
}

int64_t gather_bwd_workspace_size(int64_t n, int64_t d) { return dw_chunks(n) * d; }

cudaError_t launch_gather_bwd(const void* dy, const void* x, const int64_t* perm,
                              const int64_t* inv, const void* weight_, const void* rstd_,
                              void* dx, void* dweight_, void* workspace_, int64_t n, int64_t d,
                              DType dtype, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const A* weight = static_cast<const A*>(weight_);
    const A* rstd = static_cast<const A*>(rstd_);
    A* dweight = static_cast<A*>(dweight_);
    A* workspace = static_cast<A*>(workspace_);
    const T* dy_t = static_cast<const T*>(dy);
    const T* x_t = static_cast<const T*>(x);
    T* dx_t = static_cast<T*>(dx);
    if (weight == nullptr) {  // dx[t] = dy[inv[t]]: a gather by inv
      gather_rows<T, false>(dy_t, inv, nullptr, dx_t, nullptr, n, d, 0.0, stream);
      return cudaGetLastError();
    }
    constexpr int V = 16 / sizeof(T);
    if (can_vectorise<T>(d, dy, x, dx)) {
      const RowGrid g = row_grid(n, d / V);
      _gather_norm_bwd_kernel<T, V><<<g.grid, g.block, 0, stream>>>(dy_t, x_t, perm, weight,
                                                                    rstd, dx_t, n, d);
    } else {
      const RowGrid g = row_grid(n, d);
      _gather_norm_bwd_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(dy_t, x_t, perm, weight,
                                                                    rstd, dx_t, n, d);
    }
    if (dweight != nullptr) {
      const int64_t chunks = dw_chunks(n);
      const int64_t rows_per_chunk = (n + chunks - 1) / chunks;
      const dim3 grid((unsigned)((d + kDwCols - 1) / kDwCols), (unsigned)chunks);
      _norm_weight_partial_kernel<T><<<grid, dim3(kDwCols, kDwRowThreads), 0, stream>>>(
          dy_t, x_t, perm, rstd, workspace, n, d, rows_per_chunk);
      _sum_chunks_kernel<A><<<(unsigned)((d + 255) / 256), 256, 0, stream>>>(workspace, dweight,
                                                                          chunks, d);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_scatter_combine_fwd(const void* y, const int64_t* inv, const int64_t* routes,
                                       const void* residual, const void* gate, void* out,
                                       int64_t n, int64_t d, uint64_t skip_mask, int num_paths,
                                       DType dtype, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = 16 / sizeof(T);
    const T* y_t = static_cast<const T*>(y);
    const T* res_t = static_cast<const T*>(residual);
    const T* gate_t = static_cast<const T*>(gate);
    T* out_t = static_cast<T*>(out);
    if (can_vectorise<T>(d, y, out, residual)) {
      const RowGrid g = row_grid(n, d / V);
      _scatter_combine_fwd_kernel<T, V><<<g.grid, g.block, 0, stream>>>(
          y_t, inv, routes, res_t, gate_t, out_t, n, d, skip_mask, num_paths);
    } else {
      const RowGrid g = row_grid(n, d);
      _scatter_combine_fwd_kernel<T, 1><<<g.grid, g.block, 0, stream>>>(
          y_t, inv, routes, res_t, gate_t, out_t, n, d, skip_mask, num_paths);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_scatter_combine_bwd(const void* dout, const void* y, const int64_t* perm,
                                       const int64_t* routes, const void* gate, void* dy,
                                       void* dgate, int64_t n, int64_t d, uint64_t skip_mask,
                                       int num_paths, DType dtype, cudaStream_t stream) {
  if (n == 0 || d == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = 16 / sizeof(T);
    const T* dout_t = static_cast<const T*>(dout);
    const T* y_t = static_cast<const T*>(y);
    const T* gate_t = static_cast<const T*>(gate);
    T* dy_t = static_cast<T*>(dy);
    T* dgate_t = static_cast<T*>(dgate);
    const bool vec = can_vectorise<T>(d, dout, y, dy);
    const RowGrid g = row_grid(n, vec ? d / V : d);
    if (dgate != nullptr) {
      if (vec)
        _scatter_combine_bwd_kernel<T, V, true><<<g.grid, g.block, 0, stream>>>(
            dout_t, y_t, perm, routes, gate_t, dy_t, dgate_t, n, d, skip_mask, num_paths);
      else
        _scatter_combine_bwd_kernel<T, 1, true><<<g.grid, g.block, 0, stream>>>(
            dout_t, y_t, perm, routes, gate_t, dy_t, dgate_t, n, d, skip_mask, num_paths);
    } else {
      if (vec)
        _scatter_combine_bwd_kernel<T, V, false><<<g.grid, g.block, 0, stream>>>(
            dout_t, y_t, perm, routes, gate_t, dy_t, nullptr, n, d, skip_mask, num_paths);
      else
        _scatter_combine_bwd_kernel<T, 1, false><<<g.grid, g.block, 0, stream>>>(
            dout_t, y_t, perm, routes, gate_t, dy_t, nullptr, n, d, skip_mask, num_paths);
    }
    return cudaGetLastError();
  });
}

}  // namespace duollm
