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
//    are no shuffles and no atomics; the order of accumulation is fixed,
//    which makes forward and backward deterministic and equal to the CPU kernel's order.
//    lanes = min(D / VEC, kThreads): at D = 256 bf16 (32 vectors) one warp per segment; at
//    D = 32 bf16 (4 vectors) eight segments per warp. Sub-warp groups are what keep the
//    narrow hierarchy levels at full speed: a warp still issues 32 16-byte loads per
//    instruction (eight 64-byte rows), where a warp-per-segment kernel would idle 7/8 of it.
// 2. Vectorised access. VEC = 16 bytes / sizeof(scalar) elements (8 for bf16/fp16) when D,
//    the row strides and every pointer allow it, else the largest power of two that does
//    (down to 1 for odd D), chosen on the host from shapes and pointers only.
// 3. Memory-level parallelism. Short units give a thread too few rows to cover the memory
//    latency with its own loads (a 2-row unit: two 16-byte loads in flight per thread), and
//    registers cap what any thread can hold in flight. So sum/mean/max/min over 16-byte
//    vectors go through shared memory: a block's units are consecutive, their rows one
//    contiguous window of x (sized from the mean unit length to at most ~40 KiB), which the
//    block copies into a 40 KiB shared buffer with cp.async (no register round trip; every
//    thread issues its share of the copies at once), each group then folding its units'
//    rows from the buffer. The block's offsets go to shared memory first, in one coalesced
//    load, so a group walking several units reads their bounds there instead of waiting on
//    global memory once per unit. Other widths and first/last use the register kernel,
//    which issues kUnroll predicated row loads per pass.
// 4. Instructions. With the bytes in flight, the short units of the upper levels (2-3 rows
//    a unit) leave the staged kernel bound by instruction issue, so each instruction per
//    element counts: the mean divides through one reciprocal a unit and a correction step
//    (as exact as division), the first row is peeled out of the fold loop, and bf16 pairs
//    widen with one shift or mask an element.
//
// What each variant measured, and the designs tried and dropped, are in
// benches/results/2026-12-02_segment_pool_kernel_notes.md.
// 5. Numerics. Accumulation in fp32 registers for bf16/fp16 (opmath), one rounding per
//    output element. max/min keep the first row on ties and propagate NaN (segment_bounds
//    and replaces() in segment_pool.h are shared with the CPU kernel).
// 6. Safety. Every segment's offsets are clamped into [0, N] (segment_bounds), so no offsets
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

// Stores through an integer of the vector's size: the compiler splits a plain struct copy
// into one 2-byte store per bf16 element in places.
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& value) {
  constexpr size_t kBytes = sizeof(Vec<T, N>);
  using Raw = std::conditional_t<kBytes == 16, int4,
              std::conditional_t<kBytes == 8, int2,
              std::conditional_t<kBytes == 4, int, Vec<T, N>>>>;
  Raw raw;
  memcpy(&raw, &value, kBytes);
  *reinterpret_cast<Raw*>(p) = raw;
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

// A row vector in opmath precision. A bf16 pair unpacks with one shift (low half) and one
// mask (high half), exact for every value; the generic conversion spends a permute and a
// multiply on the high half.
template <typename acc_t, typename scalar_t, int VEC>
__device__ __forceinline__ void widen(const Vec<scalar_t, VEC>& row, acc_t (&value)[VEC]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && VEC % 2 == 0) {
    uint32_t words[VEC / 2];
    memcpy(words, &row, sizeof(words));
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      value[2 * i] = __uint_as_float(words[i] << 16);
      value[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) value[k] = static_cast<acc_t>(row.v[k]);
  }
}

// Folds one row vector (row r) into the running sum or max/min of a column vector.
template <Reduce R, typename acc_t, typename index_t, typename scalar_t, int VEC>
__device__ __forceinline__ void fold(acc_t (&acc)[VEC], index_t (&where)[VEC],
                                     const Vec<scalar_t, VEC>& row, int64_t r) {
  acc_t values[VEC];
  widen(row, values);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t value = values[k];
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

// Starts (first row of the segment) or continues a segment's reduction with one row.
template <Reduce R, typename acc_t, typename index_t, typename scalar_t, int VEC>
__device__ __forceinline__ void fold_row(acc_t (&acc)[VEC], index_t (&where)[VEC],
                                         const Vec<scalar_t, VEC>& row, int64_t r, bool first) {
  if (first) {
    widen(row, acc);
#pragma unroll
    for (int k = 0; k < VEC; ++k) where[k] = static_cast<index_t>(r);
  } else {
    fold<R>(acc, where, row, r);
  }
}

// a / b for the mean, given r = 1 / b (rounded): the correctly rounded quotient, as IEEE
// division gives it, in one multiply and two FMAs (Markstein's correction: q = a r, then
// q + (a - q b) r), so that a unit's division costs one reciprocal and not one full fp32
// division (a multi-instruction sequence) per element: design point 4. Equal to the CPU
// kernel's division bit for bit (tests/test_segment_pool.py, the CUDA mean test).
// Infinities and NaN, where the correction would give NaN, keep a r (= a / b there).
template <typename acc_t>
__device__ __forceinline__ acc_t divide(acc_t a, acc_t b, acc_t r) {
  if constexpr (std::is_same_v<acc_t, float>) {
    const float q = a * r;
    return isfinite(q) ? fmaf(fmaf(-q, b, a), r, q) : q;
  } else {
    return a / b;
  }
}

// Writes segment s's result: one rounding per element, mean divided by the row count like
// the reference; an empty segment gives 0 and, for max/min, the arg sentinel N (no row).
template <Reduce R, typename acc_t, typename index_t, typename scalar_t, int VEC>
__device__ __forceinline__ void finish(const acc_t (&acc)[VEC], const index_t (&where)[VEC],
                                       int64_t rows, int64_t total, scalar_t* out,
                                       index_t* arg) {
  Vec<scalar_t, VEC> result;
  Vec<index_t, VEC> result_arg;
  const acc_t count = static_cast<acc_t>(rows);
  const acc_t inverse = R == Reduce::Mean ? acc_t(1) / count : acc_t(1);
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const acc_t value = R == Reduce::Mean ? divide(acc[k], count, inverse) : acc[k];
    result.v[k] = rows == 0 ? scalar_t(0) : static_cast<scalar_t>(value);
    result_arg.v[k] = rows == 0 ? static_cast<index_t>(total) : where[k];
  }
  store(out, result);
  if constexpr (R == Reduce::Max || R == Reduce::Min) {
    if (arg != nullptr) store(arg, result_arg);
  }
}

// Register kernel: any width, any reduction. A group of `lanes` threads owns one segment;
// each thread walks its column vector down the segment kUnroll rows a pass, every load of
// a pass issued (predicated on the row being in the segment) before any is folded, so a
// short unit has all its rows in flight at once.
template <typename scalar_t, typename index_t, int VEC, Reduce R>
__global__ void __launch_bounds__(kThreads) segment_pool_kernel(
    const scalar_t* __restrict__ x,        // (N, D), row stride x_row
    const index_t* __restrict__ offsets,   // (S + 1,)
    scalar_t* __restrict__ out,            // (S, D) contiguous
    index_t* __restrict__ arg,             // (S, D) contiguous, max/min only; may be null
    int64_t total, int64_t segments, int64_t features, int64_t x_row, int lanes) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t s;
  int lane;
  if (!my_segment(lanes, segments, s, lane)) return;
  int64_t begin, end;
  segment_bounds(offsets, s, total, begin, end);
  const int64_t rows = end - begin;
  const int64_t cols = features / VEC;
  for (int64_t c = lane; c < cols; c += lanes) {
    const int64_t col = c * VEC;
    if constexpr (R == Reduce::First || R == Reduce::Last) {
      // first/last: a copy of one row (0 for an empty segment)
      Vec<scalar_t, VEC> result;
#pragma unroll
      for (int k = 0; k < VEC; ++k) result.v[k] = scalar_t(0);
      if (rows > 0) {
        result = load<scalar_t, VEC>(x + (R == Reduce::First ? begin : end - 1) * x_row + col);
      }
      store(out + s * features + col, result);
    } else {
      acc_t acc[VEC];
      index_t where[VEC];
      for (int64_t i = 0; i < rows; i += kUnroll) {
        const scalar_t* row = x + (begin + i) * x_row + col;
        Vec<scalar_t, VEC> batch[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (i + u < rows) batch[u] = load<scalar_t, VEC>(row + u * x_row);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (i + u < rows) fold_row<R>(acc, where, batch[u], begin + i + u, i + u == 0);
        }
      }
      finish<R>(acc, where, rows, total, out + s * features + col,
                arg == nullptr ? nullptr : arg + s * features + col);
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FASTLAB_CP_ASYNC 1
#endif

// 16 bytes global -> shared without a register round trip (cp.async, sm_80+), so a block
// can have its whole stage in flight at once.
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
#ifdef FASTLAB_CP_ASYNC
  const unsigned smem = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(src));
#else
  *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(src);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#ifdef FASTLAB_CP_ASYNC
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// One 16-byte vector from shared memory in one instruction (LDS.128). Reading the Vec
// struct directly lets the compiler split it into a 2-byte load per bf16 value, eight times
// the shared-memory instructions.
template <typename V>
__device__ __forceinline__ V load_shared(const V* p) {
  static_assert(sizeof(V) == 16, "a shared-memory vector is 16 bytes");
  const int4 raw = *reinterpret_cast<const int4*>(p);
  V v;
  memcpy(&v, &raw, sizeof(V));
  return v;
}

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait() {
#ifdef FASTLAB_CP_ASYNC
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Blocks of the staged kernel an SM must hold at once: five 40 KiB buffers fill its shared
// memory, and the bound keeps the compiler within the 48 registers a thread that five
// 256-thread blocks allow (unbounded it takes more, and an SM holds four).
constexpr int kStagedBlocksPerSM = 5;

// Staged kernel: 16-byte vectors, one column vector per thread (D <= kThreads x VEC),
// sum/mean/max/min. A block owns groups x segs_per_group consecutive segments (each group
// `segs_per_group` consecutive ones), so the block's rows form one contiguous window of x.
// The block copies the window into shared memory with cp.async, `buffer_rows` rows at a
// time (every thread issues its share of the 16-byte copies at once, none waits on a
// register), then each group walks its segments in row order, folding the rows that lie in
// the buffer and writing a segment's result as soon as its last row is folded. The host
// sizes the window to fit one buffer, so most blocks make one copy round trip; bytes in
// flight per SM are then set by shared memory, not by the few rows a short unit gives each
// thread. One buffer, not two: with windows this small, a second buffer's barrier and the
// halved buffers cost more than the overlap gains.
template <typename scalar_t, typename index_t, int VEC, Reduce R>
__global__ void __launch_bounds__(kThreads, kStagedBlocksPerSM) segment_pool_staged_kernel(
    const scalar_t* __restrict__ x, const index_t* __restrict__ offsets,
    scalar_t* __restrict__ out, index_t* __restrict__ arg, int64_t total, int64_t segments,
    int64_t features, int64_t x_row, int lanes, int segs_per_group, int buffer_rows,
    bool stage_offsets) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  static_assert(sizeof(V) == 16, "the staged kernel copies 16-byte vectors");
  // buffer_rows x cols vectors, then (stage_offsets) the block's per_block + 1 offsets
  extern __shared__ __align__(16) unsigned char smem[];
  V* const buffer = reinterpret_cast<V*>(smem);
  const int cols = static_cast<int>(features / VEC);  // == lanes (host check: <= kThreads)
  const int groups = blockDim.x / lanes;
  const int group = threadIdx.x / lanes;
  const int lane = threadIdx.x % lanes;
  const int64_t per_block = static_cast<int64_t>(groups) * segs_per_group;
  const int64_t block_first = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t block_end = block_first + per_block < segments ? block_first + per_block
                                                               : segments;
  const int64_t first = block_first + static_cast<int64_t>(group) * segs_per_group;
  const int64_t last = first + segs_per_group < block_end ? first + segs_per_group : block_end;
  const bool mine = group < groups && first < last;
  // The block's offsets, indexed from its first segment. Staged in shared memory by one
  // coalesced load, each group's bounds are a shared-memory read: from global memory, a
  // group walking several segments waits on one dependent L1/L2 miss per segment after
  // its rows have landed.
  const index_t* block_offsets = offsets + block_first;
  if (stage_offsets) {
    index_t* const staged =
        reinterpret_cast<index_t*>(smem + static_cast<size_t>(buffer_rows) * cols * sizeof(V));
    for (int64_t i = threadIdx.x; i <= block_end - block_first; i += blockDim.x) {
      staged[i] = block_offsets[i];
    }
    __syncthreads();
    block_offsets = staged;
  }
  // The window: the block's first segment's begin to its last segment's end, clamped. Valid
  // offsets put every segment of the block inside it; bad ones only lose rows (such a
  // segment reads as empty), never read outside x.
  int64_t lo, hi, unused;
  segment_bounds(block_offsets, 0, total, lo, unused);
  segment_bounds(block_offsets, block_end - 1 - block_first, total, unused, hi);
  hi = hi < lo ? lo : hi;

  // This group's current segment s, rows [begin, end); `started` once its first row folded.
  int64_t s = first, begin = 0, end = 0;
  bool started = false;
  acc_t acc[VEC];
  index_t where[VEC];
  if (mine) segment_bounds(block_offsets, s - block_first, total, begin, end);
  auto finish_segment = [&]() {
    finish<R>(acc, where, started ? end - begin : 0, total, out + s * features + lane * VEC,
              arg == nullptr ? nullptr : arg + s * features + lane * VEC);
    started = false;
    if (++s < last) segment_bounds(block_offsets, s - block_first, total, begin, end);
  };

  // Rows stored back to back (the usual case) make the window one run of vectors: the copy
  // loop then costs an add per vector, not a division by `cols` and a 64-bit multiply
  // (which issue as many instructions as the loads themselves).
  const bool dense = x_row == features;
  for (int64_t base = lo; base < hi; base += buffer_rows) {
    const int n = static_cast<int>(hi - base < buffer_rows ? hi - base : buffer_rows);
    if (dense) {
      const V* window = reinterpret_cast<const V*>(x + base * x_row);
      for (int i = threadIdx.x; i < n * cols; i += blockDim.x) copy16_async(&buffer[i], &window[i]);
    } else {
      for (int i = threadIdx.x; i < n * cols; i += blockDim.x) {
        const int r = i / cols;
        copy16_async(&buffer[i],
                     x + (base + r) * x_row + static_cast<int64_t>(i - r * cols) * VEC);
      }
    }
    copy_async_commit();
    copy_async_wait<0>();  // this thread's copies have landed ...
    __syncthreads();       // ... and everyone's
    const int64_t stop = base + n;
    while (mine && s < last) {
      const int64_t r0 = begin > base ? begin : base;
      const int64_t r1 = end < stop ? end : stop;
      int64_t r = r0;
      const V* row = &buffer[(r0 - base) * cols + lane];
      if (r < r1 && r == begin) {  // the segment's first row starts its reduction
        started = true;
        fold_row<R>(acc, where, load_shared(row), r, true);
        ++r;
        row += cols;
      }
      // the other rows, with no first-row test per row (it cost a branch and a
      // reconvergence per row); unrolled so that a long unit's shared-memory loads issue
      // four at a time instead of each waiting for the fold of the one before (units of
      // the character level: 1-16 rows)
#pragma unroll 4
      for (; r < r1; ++r, row += cols) fold<R>(acc, where, load_shared(row), r);
      if (end > stop) break;  // continues in the next buffer load
      finish_segment();
    }
    __syncthreads();  // everyone is done with the buffer before it is refilled
  }
  while (mine && s < last) finish_segment();  // empty window, or rows lost to bad offsets
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
  const acc_t inverse = acc_t(1) / count;
  const int64_t cols = features / VEC;
  for (int64_t c = lane; c < cols; c += lanes) {
    const int64_t col = c * VEC;
    // 1. The unit's vector (0 before the first unit when shifted), scaled once.
    acc_t value[VEC];
    if (src >= 0) {
      const Vec<scalar_t, VEC> v = load<scalar_t, VEC>(y + src * y_row + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        value[k] = mean ? divide(static_cast<acc_t>(v.v[k]), count, inverse)
                        : static_cast<acc_t>(v.v[k]);
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

// Staged pooling: bytes of the shared-memory buffer, and bytes of x a block's window aims
// at (at most): the fastest pair of the buffer/window sweep over the five level widths. A
// window that fits the buffer makes one copy round trip per block; ~5 such blocks per SM
// (shared memory bound) keep ~200 KB in flight. Benches and tests override these and the
// other launch choices through staging_tuning() (segment_pool.h).
constexpr int kStageBufferKiB = 40;
constexpr int kStageWindowKiB = 32;
// Most segments a staged block takes, so that its offsets (per_block + 1 values) fit in
// shared memory next to the buffer: 4 KiB of int64 offsets.
constexpr int kMaxBlockSegments = 511;
// Dynamic shared memory a launch may use without opting in per kernel.
constexpr size_t kDefaultSharedBytes = 48 * 1024;

// An override of staging_tuning(), or the default where it is unset (negative).
int tuned(int override_value, int fallback) {
  return override_value >= 0 ? override_value : fallback;
}

struct Staging {
  int threads;         // 0: run the register kernel
  int segs_per_group;
  int buffer_rows;
  size_t smem_bytes;
  unsigned int blocks;
  bool stage_offsets;  // the block's offsets go to shared memory too
};

// The staged kernel's launch for segments of `cols` 16-byte vectors a row. Blocks shrink
// (fewer groups) or groups take more segments until the expected window, from the mean
// unit length N / S (shapes only, no sync), is the largest within 1.25x the target.
Staging plan_staging(int64_t total, int64_t segments, int64_t cols, int64_t index_bytes) {
  const StagingTuning tuning = staging_tuning();
  const int buffer_kib = tuned(tuning.buffer_kib, kStageBufferKiB);
  const int window_kib = tuned(tuning.window_kib, kStageWindowKiB);
  if (buffer_kib == 0 || cols > kThreads) return {0, 0, 0, 0, 0, false};
  const int lanes = static_cast<int>(cols);
  const int64_t row_bytes = cols * 16;
  // the target, with slack: a window up to 1.25x it still fits the buffer in the defaults
  const double window = 1.25 * window_kib * 1024.0;
  const double group_bytes =
      std::max(1.0, static_cast<double>(total) / std::max<int64_t>(segments, 1)) * row_bytes;
  // at least min_segs segments a group (blocks shrink to keep the window): sums of lengths
  // vary less than lengths, which evens out warp-wide groups; narrower rows lose more to
  // the smaller blocks than they gain, so they keep 1.
  const int min_segs = tuned(tuning.segs_per_group, lanes >= 32 ? 2 : 1);
  int threads = tuned(tuning.threads, kThreads);
  while (threads / 2 >= std::max(lanes, 64) &&
         (threads / lanes) * min_segs * group_bytes > window) {
    threads /= 2;
  }
  int segs = min_segs;
  while (segs < 64 && 2 * segs * (threads / lanes) * group_bytes <= window &&
         2 * segs * (threads / lanes) <= kMaxBlockSegments) {
    segs *= 2;
  }
  const int64_t per_block = static_cast<int64_t>(threads / lanes) * segs;
  const int64_t blocks = (segments + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastlab: too many segments (",
              segments, ") for one launch");
  const int buffer_rows = static_cast<int>(std::max<int64_t>(1, buffer_kib * 1024 / row_bytes));
  const size_t buffer_bytes = static_cast<size_t>(buffer_rows * row_bytes);
  const size_t offsets_bytes = static_cast<size_t>((per_block + 1) * index_bytes);
  const bool stage_offsets = tuned(tuning.stage_offsets, 1) == 1 &&
                             per_block <= kMaxBlockSegments &&
                             buffer_bytes + offsets_bytes <= kDefaultSharedBytes;
  return {threads, segs, buffer_rows, buffer_bytes + (stage_offsets ? offsets_bytes : 0),
          static_cast<unsigned int>(blocks), stage_offsets};
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
        const Staging staging = VEC * sizeof(scalar_t) == 16
                                    ? plan_staging(total, segments, features / VEC,
                                                   sizeof(index_t))
                                    : Staging{0, 0, 0, 0, 0, false};
        dispatch_reduce(reduce, [&](auto r) {
          constexpr Reduce R = decltype(r)::value;
          constexpr bool kStageable = VEC * sizeof(scalar_t) == 16 && R != Reduce::First &&
                                      R != Reduce::Last;
          if constexpr (kStageable) {
            if (staging.threads > 0) {
              segment_pool_staged_kernel<scalar_t, index_t, VEC, R>
                  <<<staging.blocks, staging.threads, staging.smem_bytes, stream>>>(
                      xp, op, outp, argp, total, segments, features, x.stride(0), launch.lanes,
                      staging.segs_per_group, staging.buffer_rows, staging.stage_offsets);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              return;
            }
          }
          segment_pool_kernel<scalar_t, index_t, VEC, R>
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
