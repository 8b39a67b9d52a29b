// group_tokens: a stable counting sort of token ids by route, with no host synchronisation.
//
// Tokens are cut into tiles of kTile; tile b is handled by block b of every kernel.
//   1. _histogram_kernel   per-tile path counts -> workspace[bucket * B + b]; routes -> int64
//   2. _scan_kernel        one block: exclusive scan of the (bucket-major) workspace, so entry
//                          (p, b) becomes the first position of tile b's path-p tokens; writes
//                          counts and offsets
//   3. _scatter_kernel     re-reads its tile in token order, ranks each token among the earlier
//                          ones of its path (warp match + per-warp counts: stable), writes perm
//                          and inv
// A problem of at most kFusedMaxTokens tokens (decode) runs all three steps in one block.
// Buckets 0..P-1 are the paths; bucket P collects out-of-range routes (never out of bounds).
#include "duollm.cuh"

namespace duollm {
namespace {

using detail::kFullMask;

constexpr int kThreads = 256;                    // tokens per round of a block
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;                        // rounds per tile
constexpr int kTile = kThreads * kItems;         // tokens per block
constexpr int kFusedMaxTokens = 2 * kTile;       // single-block path up to here
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int bucket_of(int64_t r, int num_paths) {
  return (r >= 0 && r < num_paths) ? (int)r : num_paths;
}

// Count the tokens [begin, end) per bucket into hist (shared, zeroed, num_paths + 1 entries);
// optionally copy the routes to routes_out as int64.
template <typename R>
__device__ void count_tokens(const R* __restrict__ routes, int64_t begin, int64_t end,
                             int num_paths, int* hist, int64_t* __restrict__ routes_out) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const bool valid = t < end;
    int b = -1;
    if (valid) {
      const int64_t r = (int64_t)routes[t];
      routes_out[t] = r;
      b = bucket_of(r, num_paths);
    }
    // One shared atomic per distinct bucket in the warp (integer adds: order-independent).
    const unsigned same = __match_any_sync(kFullMask, b);
    if (valid && lane == __ffs(same) - 1) atomicAdd(&hist[b], __popc(same));
  }
}

// Write perm/inv for tokens [begin, end), in token order. run[b] (shared) holds the position
// of the next bucket-b token; warp_cnt (shared, kWarps x (num_paths + 1), zero on entry and
// on exit) holds each warp's count per bucket within the current round.
template <typename R>
__device__ void scatter_tokens(const R* __restrict__ routes, int64_t begin, int64_t end,
                               int num_paths, unsigned long long* run, int* warp_cnt,
                               int64_t* __restrict__ perm, int64_t* __restrict__ inv) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nb = num_paths + 1;
  const unsigned lanes_before = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const bool valid = t < end;
    const int b = valid ? bucket_of((int64_t)routes[t], num_paths) : -1;
    const unsigned same = __match_any_sync(kFullMask, b);
    const bool leader = valid && lane == __ffs(same) - 1;
    if (leader) warp_cnt[warp * nb + b] = __popc(same);
    __syncthreads();
    if (valid) {
      // Earlier rounds (run), earlier warps of this round, earlier lanes of this warp.
      unsigned long long pos = run[b] + __popc(same & lanes_before);
      for (int w = 0; w < warp; ++w) pos += warp_cnt[w * nb + b];
      perm[pos] = t;
      inv[t] = (int64_t)pos;
    }
    __syncthreads();
    if (leader) {
      atomicAdd(&run[b], (unsigned long long)__popc(same));
      warp_cnt[warp * nb + b] = 0;
    }
    __syncthreads();
  }
}

// Shared memory: run[(P+1)] u64, then warp_cnt[kWarps * (P+1)] int, then hist[(P+1)] int.
inline size_t shared_bytes(int num_paths) {
  const size_t nb = (size_t)num_paths + 1;
  return nb * sizeof(unsigned long long) + (kWarps + 1) * nb * sizeof(int);
}

template <typename R>
__global__ void __launch_bounds__(kThreads)
_histogram_kernel(const R* __restrict__ routes,      // (n,) path per token
                  int64_t* __restrict__ routes_out,  // (n,) the routes as int64
                  int64_t* __restrict__ tile_counts, // ((P+1) * B,) bucket-major counts
                  int64_t n, int num_paths) {
  extern __shared__ unsigned long long smem_u64[];
  const int nb = num_paths + 1;
  int* hist = reinterpret_cast<int*>(smem_u64);
  for (int i = threadIdx.x; i < nb; i += kThreads) hist[i] = 0;
  __syncthreads();
  const int64_t begin = (int64_t)blockIdx.x * kTile;
  const int64_t end = begin + kTile < n ? begin + kTile : n;
  count_tokens(routes, begin, end, num_paths, hist, routes_out);
  __syncthreads();
  for (int i = threadIdx.x; i < nb; i += kThreads)
    tile_counts[(int64_t)i * gridDim.x + blockIdx.x] = hist[i];
}

// One block: exclusive scan of a (len,) in place, then counts/offsets from the bucket starts.
__global__ void __launch_bounds__(kScanThreads)
_scan_kernel(int64_t* __restrict__ a,        // ((P+1) * B,) tile counts -> tile starts
             int64_t* __restrict__ counts,   // (P,)
             int64_t* __restrict__ offsets,  // (P+1,)
             int64_t len, int64_t num_tiles, int num_paths) {
  __shared__ long long warp_tot[kScanThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int nwarps = kScanThreads / 32;
  long long carry = 0;
  for (int64_t base = 0; base < len; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const long long v = i < len ? a[i] : 0;
    long long s = v;  // inclusive scan within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const long long u = __shfl_up_sync(kFullMask, s, o);
      if (lane >= o) s += u;
    }
    if (lane == 31) warp_tot[warp] = s;
    __syncthreads();
    if (warp == 0) {
      long long w = warp_tot[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long u = __shfl_up_sync(kFullMask, w, o);
        if (lane >= o) w += u;
      }
      warp_tot[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    if (i < len) a[i] = carry + (warp > 0 ? warp_tot[warp - 1] : 0) + s - v;
    carry += warp_tot[nwarps - 1];
    __syncthreads();
  }
  // Bucket p starts at a[p * B]; bucket P (out-of-range routes) starts after every path.
  for (int p = threadIdx.x; p <= num_paths; p += kScanThreads) {
    const int64_t start = a[(int64_t)p * num_tiles];
    offsets[p] = start;
    if (p < num_paths) counts[p] = a[(int64_t)(p + 1) * num_tiles] - start;
  }
}

template <typename R>
__global__ void __launch_bounds__(kThreads)
_scatter_kernel(const R* __restrict__ routes,           // (n,) path per token
                const int64_t* __restrict__ tile_start, // ((P+1) * B,) scanned tile counts
                int64_t* __restrict__ perm,             // (n,) out
                int64_t* __restrict__ inv,              // (n,) out
                int64_t n, int num_paths) {
  extern __shared__ unsigned long long smem_u64[];
  const int nb = num_paths + 1;
  unsigned long long* run = smem_u64;
  int* warp_cnt = reinterpret_cast<int*>(run + nb);
  for (int i = threadIdx.x; i < nb; i += kThreads)
    run[i] = (unsigned long long)tile_start[(int64_t)i * gridDim.x + blockIdx.x];
  for (int i = threadIdx.x; i < kWarps * nb; i += kThreads) warp_cnt[i] = 0;
  __syncthreads();
  const int64_t begin = (int64_t)blockIdx.x * kTile;
  const int64_t end = begin + kTile < n ? begin + kTile : n;
  scatter_tokens(routes, begin, end, num_paths, run, warp_cnt, perm, inv);
}

// All of group_tokens in one block, for n <= kFusedMaxTokens (one launch for decode).
template <typename R>
__global__ void __launch_bounds__(kThreads)
_group_small_kernel(const R* __restrict__ routes,     // (n,) path per token
                    int64_t* __restrict__ routes_out, // (n,) int64 copy
                    int64_t* __restrict__ perm,       // (n,)
                    int64_t* __restrict__ inv,        // (n,)
                    int64_t* __restrict__ counts,     // (P,)
                    int64_t* __restrict__ offsets,    // (P+1,)
                    int64_t n, int num_paths) {
  extern __shared__ unsigned long long smem_u64[];
  const int nb = num_paths + 1;
  unsigned long long* run = smem_u64;
  int* warp_cnt = reinterpret_cast<int*>(run + nb);
  int* hist = warp_cnt + kWarps * nb;
  for (int i = threadIdx.x; i < nb; i += kThreads) hist[i] = 0;
  for (int i = threadIdx.x; i < kWarps * nb; i += kThreads) warp_cnt[i] = 0;
  __syncthreads();
  count_tokens(routes, 0, n, num_paths, hist, routes_out);
  __syncthreads();
  if (threadIdx.x < 32) {  // exclusive scan of hist by warp 0, 32 buckets at a time
    const int lane = threadIdx.x;
    unsigned long long carry = 0;
    for (int base = 0; base < nb; base += 32) {
      const int i = base + lane;
      const unsigned long long v = i < nb ? (unsigned long long)hist[i] : 0ull;
      unsigned long long s = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long u = __shfl_up_sync(kFullMask, s, o);
        if (lane >= o) s += u;
      }
      if (i < nb) {
        run[i] = carry + s - v;
        offsets[i] = (int64_t)(carry + s - v);
        if (i < num_paths) counts[i] = (int64_t)v;
      }
      carry += __shfl_sync(kFullMask, s, 31);
    }
  }
  __syncthreads();
  scatter_tokens(routes, 0, n, num_paths, run, warp_cnt, perm, inv);
}

template <typename R>
cudaError_t group_tokens_impl(const R* routes, int64_t n, int num_paths, int64_t* perm,
                              int64_t* inv, int64_t* counts, int64_t* offsets,
                              int64_t* routes_out, int64_t* workspace, cudaStream_t stream) {
  const size_t smem = shared_bytes(num_paths);
  if (n <= kFusedMaxTokens) {
    _group_small_kernel<R><<<1, kThreads, smem, stream>>>(routes, routes_out, perm, inv,
                                                          counts, offsets, n, num_paths);
    return cudaGetLastError();
  }
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int64_t len = tiles * (num_paths + 1);
  _histogram_kernel<R><<<(unsigned)tiles, kThreads, smem, stream>>>(routes, routes_out,
                                                                    workspace, n, num_paths);
  _scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace, counts, offsets, len, tiles,
                                               num_paths);
  _scatter_kernel<R><<<(unsigned)tiles, kThreads, smem, stream>>>(routes, workspace, perm, inv,
                                                                  n, num_paths);
  return cudaGetLastError();
}

}  // namespace

int64_t group_tokens_workspace_size(int64_t n, int num_paths) {
  if (n <= kFusedMaxTokens) return 0;
  return (n + kTile - 1) / kTile * (int64_t)(num_paths + 1);
}

cudaError_t launch_group_tokens(const void* routes, IType rtype, int64_t n, int num_paths,
                                int64_t* perm, int64_t* inv, int64_t* counts, int64_t* offsets,
                                int64_t* routes_out, int64_t* workspace, cudaStream_t stream) {
  if (num_paths < 1 || num_paths > kMaxPaths) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (rtype) {
    case IType::kInt8:
      return group_tokens_impl(static_cast<const int8_t*>(routes), n, num_paths, perm, inv,
                               counts, offsets, routes_out, workspace, stream);
    case IType::kUInt8:
      return group_tokens_impl(static_cast<const uint8_t*>(routes), n, num_paths, perm, inv,
                               counts, offsets, routes_out, workspace, stream);
    case IType::kInt16:
      return group_tokens_impl(static_cast<const int16_t*>(routes), n, num_paths, perm, inv,
                               counts, offsets, routes_out, workspace, stream);
    case IType::kInt32:
      return group_tokens_impl(static_cast<const int32_t*>(routes), n, num_paths, perm, inv,
                               counts, offsets, routes_out, workspace, stream);
    case IType::kInt64:
      return group_tokens_impl(static_cast<const int64_t*>(routes), n, num_paths, perm, inv,
                               counts, offsets, routes_out, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace duollm
