// Segment (CSR) pooling: the interface between the op layer (segment_pool.cpp, which checks
// arguments and allocates outputs) and the device kernels (cpu/, cuda/), plus the few rules
// both kernels must apply identically so CPU and CUDA results agree bit for bit on ordering.
//
// Layout. x is (N, D) with unit column stride and any row stride: the rows of all units
// concatenated. offsets is (S + 1,) int32 or int64: segment s owns rows
// [offsets[s], offsets[s + 1]). Outputs are freshly allocated and contiguous.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace fastlab {

enum class Reduce { Sum, Mean, Max, Min, First, Last };

// The feature dtypes every kernel supports: float32, float64, float16, bfloat16.
#define FASTLAB_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Calls f(std::integral_constant<Reduce, R>{}) so kernels can be templated on the reduction.
template <typename F>
void dispatch_reduce(Reduce reduce, F&& f) {
  switch (reduce) {
    case Reduce::Sum: return f(std::integral_constant<Reduce, Reduce::Sum>{});
    case Reduce::Mean: return f(std::integral_constant<Reduce, Reduce::Mean>{});
    case Reduce::Max: return f(std::integral_constant<Reduce, Reduce::Max>{});
    case Reduce::Min: return f(std::integral_constant<Reduce, Reduce::Min>{});
    case Reduce::First: return f(std::integral_constant<Reduce, Reduce::First>{});
    case Reduce::Last: return f(std::integral_constant<Reduce, Reduce::Last>{});
  }
}

// Row range of segment s, clamped into [0, total] and made non-empty-or-empty (end >= begin),
// so that no offsets value, valid or not, ever leads a kernel outside x.
template <typename index_t>
C10_HOST_DEVICE inline void segment_bounds(const index_t* offsets, int64_t s, int64_t total,
                                           int64_t& begin, int64_t& end) {
  const int64_t lo = static_cast<int64_t>(offsets[s]);
  const int64_t hi = static_cast<int64_t>(offsets[s + 1]);
  begin = lo < 0 ? 0 : (lo > total ? total : lo);
  end = hi < begin ? begin : (hi > total ? total : hi);
}

// Whether `candidate` (a later row) replaces `current` as the max/min of a segment. Strict
// comparison keeps the first row on ties; a NaN replaces any number once, so it propagates
// and its arg is the first NaN.
template <Reduce R, typename acc_t>
C10_HOST_DEVICE inline bool replaces(acc_t candidate, acc_t current) {
  static_assert(R == Reduce::Max || R == Reduce::Min, "only max and min select a row");
  const bool better = R == Reduce::Max ? candidate > current : candidate < current;
  return better || (candidate != candidate && current == current);
}

// Overrides of the CUDA staged pooling kernel's launch, for benches and tests (the register
// kernel, other buffer, window, group and block sizes), set by the op segment_pool_tuning and
// read from memory at each launch. A negative field keeps the kernel's own choice.
struct StagingTuning {
  int buffer_kib;      // shared-memory buffer in KiB; 0 runs the register kernel
  int window_kib;      // bytes of x a block's window aims at, in KiB
  int segs_per_group;  // fewest segments a group of threads takes
  int threads;         // most threads a block
  int stage_offsets;   // 0: the block's offsets stay in global memory
};
StagingTuning staging_tuning();

// out (S, D) = reduce over each segment of x; arg (S, D), offsets' dtype, written for
// max/min when defined and non-empty: the row each value came from, `total` (= N) for empty
// segments.
void segment_pool_cpu(const at::Tensor& x, const at::Tensor& offsets, Reduce reduce,
                      at::Tensor& out, at::Tensor& arg);

// out (total, D): row r of segment s gets base[r] + y[s - shift] * scale, where
// y[negative] = 0 and scale = 1 / len(s) when `mean`, else 1. base may be undefined.
void segment_broadcast_cpu(const at::Tensor& y, const at::Tensor& offsets, int64_t shift,
                           const at::Tensor& base, bool mean, at::Tensor& out);

// out (total, D): row r of segment s gets grad[s, d] where arg[s, d] == r, else 0.
void segment_arg_scatter_cpu(const at::Tensor& grad, const at::Tensor& arg,
                             const at::Tensor& offsets, at::Tensor& out);

#ifdef FASTLAB_WITH_CUDA
void segment_pool_cuda(const at::Tensor& x, const at::Tensor& offsets, Reduce reduce,
                       at::Tensor& out, at::Tensor& arg);
void segment_broadcast_cuda(const at::Tensor& y, const at::Tensor& offsets, int64_t shift,
                            const at::Tensor& base, bool mean, at::Tensor& out);
void segment_arg_scatter_cuda(const at::Tensor& grad, const at::Tensor& arg,
                              const at::Tensor& offsets, at::Tensor& out);
#endif

}  // namespace fastlab
