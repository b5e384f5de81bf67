// CUDA kernels of the segment-pooling ops; they mirror cpu/segment_pool_cpu.cpp.
//
// Design. Pooling ragged units of a few rows is a pure streaming problem: each element of x
// is read once and each output element written once, so the floor is
// (N * D + S * D) * sizeof(scalar) bytes at HBM bandwidth (4.19M x 256 bf16 rows pooled
// into 524K segments: 2.42 GB, 0.81 ms on an H100). The kernels are built to reach it:
//
// 1. Mapping. A group of `lanes` consecutive threads owns one segment, and lane l owns the
//    column vectors l, l + lanes, ... of every row of that segment. Lanes never exchange
//    data: each output element is reduced by one thread, sequentially over rows, so there
//    are no shuffles, no shared memory and no atomics; the order of accumulation is fixed,
//    which makes forward and backward deterministic and equal to the CPU kernel's order.
//    lanes = min(D / VEC, kThreads): at D = 256 bf16 (32 vectors) one warp per segment; at
//    D = 32 bf16 (4 vectors) eight segments per warp. Sub-warp groups are what keep the
//    narrow hierarchy levels at full speed: a warp still issues 32 16-byte loads per
//    instruction (eight 64-byte rows), where a warp-per-segment kernel would idle 7/8 of it.
// 2. Vectorised access. VEC = 16 bytes / sizeof(scalar) elements (8 for bf16/fp16) when D,
//    the row strides and every pointer allow it, else the largest power of two that does
//    (down to 1 for odd D), chosen on the host from shapes and pointers only.
// 3. Memory-level parallelism. Rows are loaded kUnroll at a time before they are combined,
//    so each thread has kUnroll independent loads in flight. Little's law on an H100 wants
//    ~3.3 TB/s x ~1 us = ~3.3 MB in flight; at the ~64 registers of the bf16 kernels (1024
//    resident threads per SM) that is 132 x 1024 x 4 x 16 B = 8.6 MB available.
// 4. Numerics. Accumulation in fp32 registers for bf16/fp16 (opmath), one rounding per
//    output element. max/min keep the first row on ties and propagate NaN (segment_bounds
//    and replaces() in segment_pool.h are shared with the CPU kernel).
// 5. Safety. Every segment's offsets are clamped into [0, N] (segment_bounds), so no offsets
//    value can produce an out-of-bounds access, and nothing here reads offsets on the host.
//
// Backward kernels use the same mapping: segment_broadcast (the adjoint of sum/mean) loads
// the unit's vector once and streams it to each of its rows; segment_arg_scatter (max/min)
// writes every row once, the gradient where that row was the arg and zero elsewhere.
// Load balance: one group per segment suits short units (the hierarchy's <= 16 rows); a very
// long segment is walked by one group alone.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "segment_pool.h"

namespace fastlab {
namespace {

// 8 warps: eight resident blocks fill an SM's 2048 threads, and small blocks keep the
// ragged tail of the grid short.
constexpr int kThreads = 256;
// Independent row loads in flight per thread (design point 3).
constexpr int kUnroll = 4;
// Widest access the hardware does in one instruction.
constexpr int kVectorBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& value) {
  *reinterpret_cast<Vec<T, N>*>(p) = value;
}

// Which segment this thread works on, and its lane within the segment's group; false for
// the threads left over when kThreads is not a multiple of `lanes`.
__device__ __forceinline__ bool my_segment(int lanes, int64_t segments, int64_t& s, int& lane) {
  const int groups = blockDim.x / lanes;
  const int group = threadIdx.x / lanes;
  lane = threadIdx.x % lanes;
  s = static_cast<int64_t>(blockIdx.x) * groups + group;
  return group < groups && s < segments;
}

// Folds one row vector (row r) into the running sum or max/min of a column vector.
template <Reduce R, typename acc_t, typename index_t, typename scalar_t, int VEC>
__device__ __forceinline__ void fold(acc_t (&acc)[VEC], index_t (&where)[VEC],
                                     const Vec<scalar_t, VEC>& row, int64_t r) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t value = static_cast<acc_t>(row.v[k]);
    if constexpr (R == Reduce::Max || R == Reduce::Min) {
      if (replaces<R>(value, acc[k])) {
        acc[k] = value;
        where[k] = static_cast<index_t>(r);
      }
    } else {
      acc[k] += value;
    }
  }
}

template <typename scalar_t, typename index_t, int VEC, Reduce R>
__global__ void __launch_bounds__(kThreads) segment_pool_kernel(
    const scalar_t* __restrict__ x,        // (N, D), row stride x_row
    const index_t* __restrict__ offsets,   // (S + 1,)
    scalar_t* __restrict__ out,            // (S, D) contiguous
    index_t* __restrict__ arg,             // (S, D) contiguous, max/min only; may be null
    int64_t total, int64_t segments, int64_t features, int64_t x_row, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSelects = R == Reduce::Max || R == Reduce::Min;
  int64_t s;
  int lane;
  if (!my_segment(lanes, segments, s, lane)) return;
  int64_t begin, end;
  segment_bounds(offsets, s, total, begin, end);
  const int64_t cols = features / VEC;
  for (int64_t c = lane; c < cols; c += lanes) {
    const int64_t col = c * VEC;
    Vec<scalar_t, VEC> result;
    Vec<index_t, VEC> result_arg;
    // 1. Empty segment: 0, and for max/min the arg sentinel N (no row).
    if (begin == end) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        result.v[k] = scalar_t(0);
        result_arg.v[k] = static_cast<index_t>(total);
      }
      store(out + s * features + col, result);
      if (kSelects && arg != nullptr) store(arg + s * features + col, result_arg);
      continue;
    }
    // 2. first/last: a copy of one row.
    if constexpr (R == Reduce::First || R == Reduce::Last) {
      const int64_t r = R == Reduce::First ? begin : end - 1;
      store(out + s * features + col, load<scalar_t, VEC>(x + r * x_row + col));
      continue;
    }
    // 3. Start from the first row, so max/min of all -inf rows still points at a row.
    acc_t acc[VEC];
    index_t where[VEC];
    const Vec<scalar_t, VEC> first = load<scalar_t, VEC>(x + begin * x_row + col);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc[k] = static_cast<acc_t>(first.v[k]);
      where[k] = static_cast<index_t>(begin);
    }
    // 4. The other rows, kUnroll loads issued before any is consumed, folded in row order.
    int64_t r = begin + 1;
    for (; r + kUnroll <= end; r += kUnroll) {
      Vec<scalar_t, VEC> rows[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) rows[u] = load<scalar_t, VEC>(x + (r + u) * x_row + col);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) fold<R>(acc, where, rows[u], r + u);
    }
    for (; r < end; ++r) fold<R>(acc, where, load<scalar_t, VEC>(x + r * x_row + col), r);
    // 5. One rounding per element; mean divides by the row count like the reference.
    const acc_t count = static_cast<acc_t>(end - begin);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      result.v[k] = static_cast<scalar_t>(R == Reduce::Mean ? acc[k] / count : acc[k]);
      result_arg.v[k] = where[k];
    }
    store(out + s * features + col, result);
    if (kSelects && arg != nullptr) store(arg + s * features + col, result_arg);
  }
}

template <typename scalar_t, typename index_t, int VEC, bool kBase>
__global__ void __launch_bounds__(kThreads) segment_broadcast_kernel(
    const scalar_t* __restrict__ y,        // (S, D), row stride y_row
    const index_t* __restrict__ offsets,   // (S + 1,)
    const scalar_t* __restrict__ base,     // (N, D), row stride base_row, when kBase
    scalar_t* __restrict__ out,            // (N, D) contiguous
    int64_t total, int64_t segments, int64_t features, int64_t y_row, int64_t base_row,
    int64_t shift, bool mean, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t s;
  int lane;
  if (!my_segment(lanes, segments, s, lane)) return;
  int64_t begin, end;
  segment_bounds(offsets, s, total, begin, end);
  if (begin == end) return;
  const int64_t src = s - shift;
  const acc_t count = static_cast<acc_t>(end - begin);
  const int64_t cols = features / VEC;
  for (int64_t c = lane; c < cols; c += lanes) {
    const int64_t col = c * VEC;
    // 1. The unit's vector (0 before the first unit when shifted), scaled once.
    acc_t value[VEC];
    if (src >= 0) {
      const Vec<scalar_t, VEC> v = load<scalar_t, VEC>(y + src * y_row + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        value[k] = mean ? static_cast<acc_t>(v.v[k]) / count : static_cast<acc_t>(v.v[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) value[k] = acc_t(0);
    }
    // 2. Every row of the unit: base + value, rounded once; base rows loaded kUnroll ahead.
    int64_t r = begin;
    for (; r + kUnroll <= end; r += kUnroll) {
      Vec<scalar_t, VEC> rows[kUnroll];
      if constexpr (kBase) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          rows[u] = load<scalar_t, VEC>(base + (r + u) * base_row + col);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        Vec<scalar_t, VEC> row;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t b = kBase ? static_cast<acc_t>(rows[u].v[k]) : acc_t(0);
          row.v[k] = static_cast<scalar_t>(b + value[k]);
        }
        store(out + (r + u) * features + col, row);
      }
    }
    for (; r < end; ++r) {
      Vec<scalar_t, VEC> base_row_values, row;
      if constexpr (kBase) base_row_values = load<scalar_t, VEC>(base + r * base_row + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t b = kBase ? static_cast<acc_t>(base_row_values.v[k]) : acc_t(0);
        row.v[k] = static_cast<scalar_t>(b + value[k]);
      }
      store(out + r * features + col, row);
    }
  }
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) segment_arg_scatter_kernel(
    const scalar_t* __restrict__ grad,     // (S, D) contiguous
    const index_t* __restrict__ arg,       // (S, D) contiguous
    const index_t* __restrict__ offsets,   // (S + 1,)
    scalar_t* __restrict__ out,            // (N, D) contiguous
    int64_t total, int64_t segments, int64_t features, int lanes) {
  int64_t s;
  int lane;
  if (!my_segment(lanes, segments, s, lane)) return;
  int64_t begin, end;
  segment_bounds(offsets, s, total, begin, end);
  if (begin == end) return;
  const int64_t cols = features / VEC;
  for (int64_t c = lane; c < cols; c += lanes) {
    const int64_t col = c * VEC;
    const Vec<scalar_t, VEC> g = load<scalar_t, VEC>(grad + s * features + col);
    const Vec<index_t, VEC> a = load<index_t, VEC>(arg + s * features + col);
    // Each row written once: the gradient where it was the arg, 0 elsewhere.
    for (int64_t r = begin; r < end; ++r) {
      Vec<scalar_t, VEC> row;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        row.v[k] = static_cast<int64_t>(a.v[k]) == r ? g.v[k] : scalar_t(0);
      }
      store(out + r * features + col, row);
    }
  }
}

// One tensor the kernel accesses with vectors: its data, element size and row stride.
struct Operand {
  const void* data;
  int64_t element_size;
  int64_t row_stride;
};

// The widest vector (in elements, a power of two <= max_vec) that divides the row length and
// every row stride and keeps every pointer aligned.
int pick_vec(int max_vec, int64_t features, std::initializer_list<Operand> operands) {
  for (int vec = max_vec; vec > 1; vec /= 2) {
    bool fits = features % vec == 0;
    for (const Operand& o : operands) {
      fits = fits && reinterpret_cast<uintptr_t>(o.data) % (vec * o.element_size) == 0 &&
             o.row_stride % vec == 0;
    }
    if (fits) return vec;
  }
  return 1;
}

// Calls f(std::integral_constant<int, VEC>{}) for the chosen width.
template <typename scalar_t, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kMax = kVectorBytes / static_cast<int>(sizeof(scalar_t));
  switch (vec) {
    case 8:
      if constexpr (kMax >= 8) return f(std::integral_constant<int, 8>{});
      break;
    case 4:
      if constexpr (kMax >= 4) return f(std::integral_constant<int, 4>{});
      break;
    case 2:
      if constexpr (kMax >= 2) return f(std::integral_constant<int, 2>{});
      break;
    default:
      return f(std::integral_constant<int, 1>{});
  }
  TORCH_CHECK(false, "fastlab: unsupported vector width ", vec);
}

// Threads per segment and blocks for `segments` segments of `features / vec` vectors.
struct Launch {
  int lanes;
  unsigned int blocks;
};

Launch plan(int64_t segments, int64_t features, int vec) {
  const int64_t cols = std::max<int64_t>(features / vec, 1);
  const int lanes = static_cast<int>(std::min<int64_t>(cols, kThreads));
  const int64_t groups = kThreads / lanes;
  const int64_t blocks = (segments + groups - 1) / groups;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastlab: too many segments (",
              segments, ") for one launch");
  return {lanes, static_cast<unsigned int>(blocks)};
}

}  // namespace

void segment_pool_cuda(const at::Tensor& x, const at::Tensor& offsets, Reduce reduce,
                       at::Tensor& out, at::Tensor& arg) {
  const int64_t total = x.size(0), features = x.size(1), segments = out.size(0);
  if (segments == 0 || features == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTLAB_DISPATCH_FLOATS(x.scalar_type(), "segment_pool_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_pool_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      index_t* argp = arg.numel() ? arg.mutable_data_ptr<index_t>() : nullptr;
      const int vec = pick_vec(kVectorBytes / sizeof(scalar_t), features,
                               {{xp, sizeof(scalar_t), x.stride(0)},
                                {outp, sizeof(scalar_t), features},
                                {argp, sizeof(index_t), features}});
      dispatch_vec<scalar_t>(vec, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        const Launch launch = plan(segments, features, VEC);
        dispatch_reduce(reduce, [&](auto r) {
          segment_pool_kernel<scalar_t, index_t, VEC, decltype(r)::value>
              <<<launch.blocks, kThreads, 0, stream>>>(xp, op, outp, argp, total, segments,
                                                       features, x.stride(0), launch.lanes);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

void segment_broadcast_cuda(const at::Tensor& y, const at::Tensor& offsets, int64_t shift,
                            const at::Tensor& base, bool mean, at::Tensor& out) {
  const int64_t total = out.size(0), features = out.size(1), segments = y.size(0);
  if (segments == 0 || features == 0 || total == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTLAB_DISPATCH_FLOATS(y.scalar_type(), "segment_broadcast_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_broadcast_cuda", [&] {
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* bp = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
      const int64_t base_row = base.defined() ? base.stride(0) : 0;
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      const int vec = pick_vec(kVectorBytes / sizeof(scalar_t), features,
                               {{yp, sizeof(scalar_t), y.stride(0)},
                                {bp, sizeof(scalar_t), base_row},
                                {outp, sizeof(scalar_t), features}});
      dispatch_vec<scalar_t>(vec, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        const Launch launch = plan(segments, features, VEC);
        if (bp != nullptr) {
          segment_broadcast_kernel<scalar_t, index_t, VEC, true>
              <<<launch.blocks, kThreads, 0, stream>>>(yp, op, bp, outp, total, segments,
                                                       features, y.stride(0), base_row, shift,
                                                       mean, launch.lanes);
        } else {
          segment_broadcast_kernel<scalar_t, index_t, VEC, false>
              <<<launch.blocks, kThreads, 0, stream>>>(yp, op, bp, outp, total, segments,
                                                       features, y.stride(0), base_row, shift,
                                                       mean, launch.lanes);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void segment_arg_scatter_cuda(const at::Tensor& grad, const at::Tensor& arg,
                              const at::Tensor& offsets, at::Tensor& out) {
  const int64_t total = out.size(0), features = out.size(1), segments = grad.size(0);
  if (segments == 0 || features == 0 || total == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTLAB_DISPATCH_FLOATS(grad.scalar_type(), "segment_arg_scatter_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_arg_scatter_cuda", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const index_t* ap = arg.const_data_ptr<index_t>();
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      const int vec = pick_vec(kVectorBytes / sizeof(scalar_t), features,
                               {{gp, sizeof(scalar_t), features},
                                {ap, sizeof(index_t), features},
                                {outp, sizeof(scalar_t), features}});
      dispatch_vec<scalar_t>(vec, [&](auto v) {
        constexpr int VEC = decltype(v)::value;
        const Launch launch = plan(segments, features, VEC);
        segment_arg_scatter_kernel<scalar_t, index_t, VEC>
            <<<launch.blocks, kThreads, 0, stream>>>(gp, ap, op, outp, total, segments,
                                                     features, launch.lanes);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace fastlab
