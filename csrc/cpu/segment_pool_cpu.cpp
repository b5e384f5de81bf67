// CPU kernels of the segment-pooling ops. They mirror cuda/segment_pool_cuda.cu: the same
// clamped segment bounds, the same order of accumulation (row by row, in fp32 for
// half/bfloat16), the same tie and NaN rule for max/min; parallel over segments with
// at::parallel_for, each task keeping one row of fp32 accumulators so the inner loop over
// features is a contiguous, vectorisable sweep. Pooling and broadcasting also take int32 and
// int64 values (the CUDA kernels do not: fastlab.ops runs those through the reference),
// with torch_scatter's integer semantics (see Arith).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "segment_pool.h"

namespace fastlab {
namespace {

// The value dtypes of pooling and broadcasting: the floats, int32 and int64.
#define FASTLAB_DISPATCH_FLOATS_AND_INTS(TYPE, NAME, ...)                               \
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kHalf, at::kBFloat16, at::kInt, at::kLong, TYPE, NAME, \
                                  __VA_ARGS__)

// How sums of scalar_t accumulate and become results. Floats: in opmath precision (fp32 for
// half/bfloat16), a mean is the sum divided by the row count. Integers, as torch_scatter's
// segment_csr: a sum wraps around in the input's width, and a mean is the sum divided by the
// row count truncated toward zero (C++ integer division: the mean of -7 and 0 is -3). They
// accumulate in uint64_t, whose wrap-around is defined (signed overflow is not) and read as
// int64_t; so an int32 mean divides the exact sum (torch_scatter's divides the sum wrapped
// to 32 bits where it overflows), an int64 one the sum wrapped to 64 bits, as there.
template <typename scalar_t, bool kIntegral = std::is_integral_v<scalar_t>>
struct Arith {
  using acc_t = at::opmath_type<scalar_t>;
  static acc_t widen(scalar_t v) { return static_cast<acc_t>(v); }
  static acc_t divide(acc_t sum, int64_t rows) { return sum / static_cast<acc_t>(rows); }
  static scalar_t narrow(acc_t v) { return static_cast<scalar_t>(v); }
};

template <typename scalar_t>
struct Arith<scalar_t, true> {
  using acc_t = uint64_t;
  static acc_t widen(scalar_t v) { return static_cast<acc_t>(static_cast<int64_t>(v)); }
  static acc_t divide(acc_t sum, int64_t rows) {
    return static_cast<acc_t>(static_cast<int64_t>(sum) / rows);
  }
  static scalar_t narrow(acc_t v) { return static_cast<scalar_t>(static_cast<int64_t>(v)); }
};

// Elements one parallel task should touch: large enough that the task's scheduling cost
// (a few microseconds) is noise, small enough to balance ragged segments across threads.
constexpr int64_t kElementsPerTask = 1 << 15;

// Segments per task, from shapes only (reading offsets to balance would cost a pass).
int64_t grain(int64_t segments, int64_t rows, int64_t features) {
  const int64_t rows_per_segment = rows / std::max<int64_t>(segments, 1) + 1;
  const int64_t per_segment = std::max<int64_t>(rows_per_segment * features, 1);
  return std::max<int64_t>(kElementsPerTask / per_segment, 1);
}

// pos_t holds a row's position within its segment for max/min; with the width of acc_t the
// compare-and-select loop vectorises (int32 for fp32 accumulators unless N >= 2**31).
// Max/min compare in opmath precision (the value itself for integers), sums use Arith.
template <typename scalar_t, typename index_t, typename pos_t, Reduce R>
void pool_segments(const scalar_t* x, int64_t x_row, const index_t* offsets, scalar_t* out,
                   index_t* arg, int64_t total, int64_t features, int64_t lo, int64_t hi) {
  constexpr bool kSelects = R == Reduce::Max || R == Reduce::Min;
  using acc_t = std::conditional_t<kSelects, at::opmath_type<scalar_t>,
                                   typename Arith<scalar_t>::acc_t>;
  const auto widen = [](scalar_t v) -> acc_t {
    if constexpr (kSelects) {
      return static_cast<acc_t>(v);
    } else {
      return Arith<scalar_t>::widen(v);
    }
  };
  std::vector<acc_t> acc(features);
  std::vector<pos_t> where(kSelects ? features : 0);
  for (int64_t s = lo; s < hi; ++s) {
    int64_t begin, end;
    segment_bounds(offsets, s, total, begin, end);
    scalar_t* o = out + s * features;
    // 1. Empty segment: 0, and for max/min the arg sentinel `total` (no row).
    if (begin == end) {
      std::fill(o, o + features, scalar_t(0));
      if (kSelects && arg != nullptr) {
        std::fill(arg + s * features, arg + (s + 1) * features, index_t(total));
      }
      continue;
    }
    // 2. first/last: a copy of one row.
    if constexpr (R == Reduce::First || R == Reduce::Last) {
      const scalar_t* row = x + (R == Reduce::First ? begin : end - 1) * x_row;
      std::copy(row, row + features, o);
      continue;
    }
    // 3. Start from the first row (so max/min of all -inf rows still points at a row).
    const scalar_t* first = x + begin * x_row;
    for (int64_t d = 0; d < features; ++d) acc[d] = widen(first[d]);
    if constexpr (kSelects) std::fill(where.begin(), where.end(), pos_t(0));
    // 4. Fold the other rows in order (selects, not branches, so the loop vectorises).
    for (int64_t r = begin + 1; r < end; ++r) {
      const scalar_t* row = x + r * x_row;
      if constexpr (kSelects) {
        const pos_t pos = static_cast<pos_t>(r - begin);
        for (int64_t d = 0; d < features; ++d) {
          const acc_t v = widen(row[d]);
          const bool take = replaces<R>(v, acc[d]);
          acc[d] = take ? v : acc[d];
          where[d] = take ? pos : where[d];
        }
      } else {
        for (int64_t d = 0; d < features; ++d) acc[d] += widen(row[d]);
      }
    }
    // 5. Write out (mean divides by the row count, like the reference).
    for (int64_t d = 0; d < features; ++d) {
      if constexpr (kSelects) {
        o[d] = static_cast<scalar_t>(acc[d]);
      } else {
        using A = Arith<scalar_t>;
        o[d] = A::narrow(R == Reduce::Mean ? A::divide(acc[d], end - begin) : acc[d]);
      }
    }
    if (kSelects && arg != nullptr) {
      for (int64_t d = 0; d < features; ++d) arg[s * features + d] = index_t(begin + where[d]);
    }
  }
}

}  // namespace

void segment_pool_cpu(const at::Tensor& x, const at::Tensor& offsets, Reduce reduce,
                      at::Tensor& out, at::Tensor& arg) {
  const int64_t total = x.size(0), features = x.size(1), segments = out.size(0);
  if (segments == 0 || features == 0) return;
  const int64_t x_row = x.stride(0);
  FASTLAB_DISPATCH_FLOATS_AND_INTS(x.scalar_type(), "segment_pool_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_pool_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      index_t* argp = arg.numel() ? arg.mutable_data_ptr<index_t>() : nullptr;
      using narrow_t =
          std::conditional_t<sizeof(at::opmath_type<scalar_t>) == 4, int32_t, int64_t>;
      dispatch_reduce(reduce, [&](auto r) {
        const int64_t per_task = grain(segments, total, features);
        at::parallel_for(0, segments, per_task, [&](int64_t lo, int64_t hi) {
          constexpr Reduce R = decltype(r)::value;
          if (total <= std::numeric_limits<int32_t>::max()) {
            pool_segments<scalar_t, index_t, narrow_t, R>(xp, x_row, op, outp, argp, total,
                                                          features, lo, hi);
          } else {
            pool_segments<scalar_t, index_t, int64_t, R>(xp, x_row, op, outp, argp, total,
                                                         features, lo, hi);
          }
        });
      });
    });
  });
}

void segment_broadcast_cpu(const at::Tensor& y, const at::Tensor& offsets, int64_t shift,
                           const at::Tensor& base, bool mean, at::Tensor& out) {
  const int64_t total = out.size(0), features = out.size(1), segments = y.size(0);
  if (segments == 0 || features == 0) return;
  const int64_t y_row = y.stride(0);
  const int64_t base_row = base.defined() ? base.stride(0) : 0;
  FASTLAB_DISPATCH_FLOATS_AND_INTS(y.scalar_type(), "segment_broadcast_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_broadcast_cpu", [&] {
      using A = Arith<scalar_t>;
      using acc_t = typename A::acc_t;
      const scalar_t* yp = y.const_data_ptr<scalar_t>();
      const scalar_t* bp = base.defined() ? base.const_data_ptr<scalar_t>() : nullptr;
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, segments, grain(segments, total, features), [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> value(features);
        for (int64_t s = lo; s < hi; ++s) {
          int64_t begin, end;
          segment_bounds(op, s, total, begin, end);
          if (begin == end) continue;
          // 1. The unit's vector (0 before the first unit when shifted), scaled once.
          const int64_t src = s - shift;
          for (int64_t d = 0; d < features; ++d) {
            const acc_t v = src >= 0 ? A::widen(yp[src * y_row + d]) : acc_t(0);
            value[d] = mean ? A::divide(v, end - begin) : v;
          }
          // 2. Every row of the unit: base + value, rounded once.
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* o = outp + r * features;
            if (bp != nullptr) {
              const scalar_t* b = bp + r * base_row;
              for (int64_t d = 0; d < features; ++d) {
                o[d] = A::narrow(A::widen(b[d]) + value[d]);
              }
            } else {
              for (int64_t d = 0; d < features; ++d) o[d] = A::narrow(value[d]);
            }
          }
        }
      });
    });
  });
}

void segment_arg_scatter_cpu(const at::Tensor& grad, const at::Tensor& arg,
                             const at::Tensor& offsets, at::Tensor& out) {
  const int64_t total = out.size(0), features = out.size(1), segments = grad.size(0);
  if (segments == 0 || features == 0) return;
  FASTLAB_DISPATCH_FLOATS(grad.scalar_type(), "segment_arg_scatter_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "segment_arg_scatter_cpu", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      const index_t* ap = arg.const_data_ptr<index_t>();
      const index_t* op = offsets.const_data_ptr<index_t>();
      scalar_t* outp = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, segments, grain(segments, total, features), [&](int64_t lo, int64_t hi) {
        for (int64_t s = lo; s < hi; ++s) {
          int64_t begin, end;
          segment_bounds(op, s, total, begin, end);
          const scalar_t* g = gp + s * features;
          const index_t* a = ap + s * features;
          // Each row is written once: the gradient where it was the arg, 0 elsewhere.
          for (int64_t r = begin; r < end; ++r) {
            scalar_t* o = outp + r * features;
            for (int64_t d = 0; d < features; ++d) {
              o[d] = static_cast<int64_t>(a[d]) == r ? g[d] : scalar_t(0);
            }
          }
        }
      });
    });
  });
}

}  // namespace fastlab
