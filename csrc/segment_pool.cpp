// The fastlab segment-pooling operators: schemas, argument checks, output allocation and
// the choice of device kernel, all in one place so CPU and CUDA callers see the same rules.
//
// Value checks on offsets (start at 0, end at the row count, non-decreasing) need offsets'
// values on the host. On CPU they are always run. On CUDA they would cost a device-to-host
// copy and a stream sync on every call, so they run only when `validate=True`; without it
// the kernels still clamp every offset into range, so bad offsets give unspecified values,
// never an out-of-bounds access.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <initializer_list>
#include <limits>

#include "segment_pool.h"

namespace fastlab {
namespace {

Reduce parse_reduce(c10::string_view name) {
  if (name == "sum") return Reduce::Sum;
  if (name == "mean") return Reduce::Mean;
  if (name == "max") return Reduce::Max;
  if (name == "min") return Reduce::Min;
  if (name == "first") return Reduce::First;
  if (name == "last") return Reduce::Last;
  TORCH_CHECK_VALUE(false, "segment_pool: reduce must be one of 'sum', 'mean', 'max', 'min', "
                    "'first', 'last', got '", name, "'");
}

bool selects_row(Reduce reduce) { return reduce == Reduce::Max || reduce == Reduce::Min; }

// `integers`: the op also takes int32/int64 values (pooling and broadcasting them, not
// their gradients), in the CPU kernels only; fastlab.ops runs CUDA ones through the
// plain-PyTorch reference, so a direct call with them is refused here.
void check_features(const char* op, const char* name, const at::Tensor& t, bool integers) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D (rows, features), got shape ",
                    t.sizes());
  const at::ScalarType dtype = t.scalar_type();
  const bool floating = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                        dtype == at::kBFloat16;
  const bool integral = dtype == at::kInt || dtype == at::kLong;
  if (integers) {
    TORCH_CHECK_TYPE(floating || integral, op, ": ", name,
                     " must be float32, float64, float16, bfloat16, int32 or int64, got ", dtype);
  } else {
    TORCH_CHECK_TYPE(floating, op, ": ", name,
                     " must be float32, float64, float16 or bfloat16, got ", dtype);
  }
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), op, ": ", name,
                    " must be a CPU or CUDA tensor, got ", t.device());
  TORCH_CHECK_TYPE(!(integral && t.is_cuda()), op, ": ", name, " of dtype ", dtype,
                   " runs on CPU tensors only (fastlab.ops.", op,
                   " runs CUDA integer inputs through the reference)");
}

void check_offsets(const char* op, const at::Tensor& offsets, const at::Tensor& like,
                   const char* like_name, int64_t total) {
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kInt || offsets.scalar_type() == at::kLong, op,
                   ": offsets must be int32 or int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1, op,
                    ": offsets must be 1-D with S + 1 >= 1 boundaries, got shape ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(offsets.device() == like.device(), op, ": offsets must be on ", like_name,
                    "'s device ", like.device(), ", got ", offsets.device());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong ||
                        total <= std::numeric_limits<int32_t>::max(),
                    op, ": int32 offsets address at most 2**31 - 1 rows, got ", total,
                    "; use int64 offsets");
}

// offsets' first value, last value, and whether it never decreases. CUDA offsets are
// copied to the host first (S + 1 integers and a stream sync: the reason the check is
// opt-in there), then both devices share one loop.
std::array<int64_t, 3> summarize_offsets(const at::Tensor& offsets) {
  const at::Tensor o = offsets.is_cpu() ? offsets.contiguous() : offsets.to(at::kCPU).contiguous();
  std::array<int64_t, 3> summary{0, 0, 1};
  AT_DISPATCH_INDEX_TYPES(o.scalar_type(), "summarize_offsets", [&] {
    const index_t* p = o.const_data_ptr<index_t>();
    const int64_t n = o.numel();
    summary = {static_cast<int64_t>(p[0]), static_cast<int64_t>(p[n - 1]), 1};
    for (int64_t i = 1; i < n; ++i) {
      if (p[i] < p[i - 1]) {
        summary[2] = 0;
        break;
      }
    }
  });
  return summary;
}

void check_offset_values(const char* op, const at::Tensor& offsets, int64_t total) {
  const std::array<int64_t, 3> summary = summarize_offsets(offsets);
  TORCH_CHECK_VALUE(summary[0] == 0, op, ": offsets must start at 0, got ", summary[0]);
  TORCH_CHECK_VALUE(summary[1] == total, op, ": offsets must end at the number of rows (", total,
                    "), got ", summary[1]);
  TORCH_CHECK_VALUE(summary[2] == 1, op, ": offsets must be non-decreasing");
}

void maybe_check_offset_values(const char* op, const at::Tensor& offsets, int64_t total,
                               bool validate) {
  if (offsets.is_cpu() || validate) check_offset_values(op, offsets, total);
}

// The kernels index rows with a stride and columns with stride 1.
at::Tensor unit_columns(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> segment_pool(const at::Tensor& x_in,
                                                const at::Tensor& offsets_in,
                                                c10::string_view reduce_name, bool validate,
                                                bool return_arg) {
  constexpr const char* op = "segment_pool";
  const Reduce reduce = parse_reduce(reduce_name);
  check_features(op, "x", x_in, /*integers=*/true);
  const int64_t total = x_in.size(0);
  check_offsets(op, offsets_in, x_in, "x", total);
  maybe_check_offset_values(op, offsets_in, total, validate);
  const at::Tensor offsets = offsets_in.contiguous();

  const at::Tensor x = unit_columns(x_in);
  const int64_t segments = offsets.numel() - 1;
  at::Tensor out = at::empty({segments, x.size(1)}, x.options());
  at::Tensor arg = selects_row(reduce) && return_arg
                       ? at::empty({segments, x.size(1)}, offsets.options())
                       : at::empty({0}, offsets.options());
  if (x.is_cuda()) {
#ifdef FASTLAB_WITH_CUDA
    segment_pool_cuda(x, offsets, reduce, out, arg);
#endif
  } else {
    segment_pool_cpu(x, offsets, reduce, out, arg);
  }
  return {out, arg};
}

at::Tensor segment_broadcast(const at::Tensor& y_in, const at::Tensor& offsets_in, int64_t total,
                             int64_t shift, const c10::optional<at::Tensor>& base_in, bool mean,
                             bool validate) {
  constexpr const char* op = "segment_broadcast";
  check_features(op, "y", y_in, /*integers=*/true);
  TORCH_CHECK_VALUE(total >= 0, op, ": total must be >= 0, got ", total);
  TORCH_CHECK_VALUE(shift >= 0, op, ": shift must be >= 0, got ", shift);
  check_offsets(op, offsets_in, y_in, "y", total);
  TORCH_CHECK_VALUE(offsets_in.numel() - 1 == y_in.size(0), op,
                    ": offsets must have y.shape[0] + 1 = ", y_in.size(0) + 1,
                    " boundaries, got ", offsets_in.numel());
  at::Tensor base;
  if (base_in.has_value() && base_in->defined()) {
    TORCH_CHECK_VALUE(base_in->dim() == 2 && base_in->size(0) == total &&
                          base_in->size(1) == y_in.size(1),
                      op, ": base must have shape (total, y.shape[1]) = (", total, ", ",
                      y_in.size(1), "), got ", base_in->sizes());
    TORCH_CHECK_TYPE(base_in->scalar_type() == y_in.scalar_type(), op,
                     ": base must have y's dtype ", y_in.scalar_type(), ", got ",
                     base_in->scalar_type());
    TORCH_CHECK_VALUE(base_in->device() == y_in.device(), op, ": base must be on y's device ",
                      y_in.device(), ", got ", base_in->device());
    base = unit_columns(*base_in);
  }
  maybe_check_offset_values(op, offsets_in, total, validate);

  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor y = unit_columns(y_in);
  at::Tensor out = at::empty({total, y.size(1)}, y.options());
  if (y.is_cuda()) {
#ifdef FASTLAB_WITH_CUDA
    segment_broadcast_cuda(y, offsets, shift, base, mean, out);
#endif
  } else {
    segment_broadcast_cpu(y, offsets, shift, base, mean, out);
  }
  return out;
}

at::Tensor segment_arg_scatter(const at::Tensor& grad_in, const at::Tensor& arg_in,
                               const at::Tensor& offsets_in, int64_t total) {
  constexpr const char* op = "segment_arg_scatter";
  check_features(op, "grad", grad_in, /*integers=*/false);
  TORCH_CHECK_VALUE(total >= 0, op, ": total must be >= 0, got ", total);
  check_offsets(op, offsets_in, grad_in, "grad", total);
  TORCH_CHECK_VALUE(offsets_in.numel() - 1 == grad_in.size(0), op,
                    ": offsets must have grad.shape[0] + 1 = ", grad_in.size(0) + 1,
                    " boundaries, got ", offsets_in.numel());
  TORCH_CHECK_VALUE(arg_in.sizes() == grad_in.sizes(), op, ": arg must have grad's shape ",
                    grad_in.sizes(), ", got ", arg_in.sizes());
  TORCH_CHECK_TYPE(arg_in.scalar_type() == offsets_in.scalar_type(), op,
                   ": arg must have offsets' dtype ", offsets_in.scalar_type(), ", got ",
                   arg_in.scalar_type());
  TORCH_CHECK_VALUE(arg_in.device() == grad_in.device(), op, ": arg must be on grad's device ",
                    grad_in.device(), ", got ", arg_in.device());
  maybe_check_offset_values(op, offsets_in, total, /*validate=*/false);

  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor arg = arg_in.contiguous();
  at::Tensor out = at::empty({total, grad.size(1)}, grad.options());
  if (grad.is_cuda()) {
#ifdef FASTLAB_WITH_CUDA
    segment_arg_scatter_cuda(grad, arg, offsets, out);
#endif
  } else {
    segment_arg_scatter_cpu(grad, arg, offsets, out);
  }
  return out;
}

// The staged kernel's launch overrides (segment_pool.h); -1: unset. Atomics, as a bench or
// test may set them while another thread launches.
std::atomic<int> tuning_buffer_kib{-1};
std::atomic<int> tuning_window_kib{-1};
std::atomic<int> tuning_segs_per_group{-1};
std::atomic<int> tuning_threads{-1};
std::atomic<int> tuning_stage_offsets{-1};

int checked_tuning(const char* name, int64_t value, std::initializer_list<int> allowed) {
  const bool ok = value == -1 || std::find(allowed.begin(), allowed.end(), value) != allowed.end();
  TORCH_CHECK_VALUE(ok, "segment_pool_tuning: ", name, " must be -1 (the default) or one of ",
                    c10::ArrayRef<int>(allowed), ", got ", value);
  return static_cast<int>(value);
}

// Sets every override at once (-1 restores a default); the values are the ones the staged
// kernel's planning supports.
void segment_pool_tuning(int64_t buffer_kib, int64_t window_kib, int64_t segs_per_group,
                         int64_t threads, int64_t stage_offsets) {
  const int buffer = checked_tuning("buffer_kib", buffer_kib, {0, 8, 16, 24, 32, 40, 48});
  const int window = checked_tuning("window_kib", window_kib, {4, 8, 12, 16, 24, 32, 40});
  const int segs = checked_tuning("segs_per_group", segs_per_group, {1, 2, 4, 8});
  const int block = checked_tuning("threads", threads, {64, 128, 256});
  const int staged = checked_tuning("stage_offsets", stage_offsets, {0, 1});
  tuning_buffer_kib = buffer;
  tuning_window_kib = window;
  tuning_segs_per_group = segs;
  tuning_threads = block;
  tuning_stage_offsets = staged;
}

}  // namespace

StagingTuning staging_tuning() {
  return {tuning_buffer_kib.load(), tuning_window_kib.load(), tuning_segs_per_group.load(),
          tuning_threads.load(), tuning_stage_offsets.load()};
}

TORCH_LIBRARY(fastlab, m) {
  // Fake (meta) kernels and autograd formulas live in this Python module.
  m.set_python_module("fastlab.ops.segment_pool");
  // arg: (S, D) rows picked by max/min when return_arg (backward needs it), else (0,).
  m.def("segment_pool(Tensor x, Tensor offsets, str reduce=\"mean\", bool validate=False,"
        " bool return_arg=True) -> (Tensor, Tensor)");
  m.def("segment_broadcast(Tensor y, Tensor offsets, SymInt total, int shift=0,"
        " Tensor? base=None, bool mean=False, bool validate=False) -> Tensor");
  m.def("segment_arg_scatter(Tensor grad, Tensor arg, Tensor offsets, SymInt total)"
        " -> Tensor");
  // Launch overrides of the CUDA staged pooling kernel (benches, tests); no effect on CPU.
  m.def("segment_pool_tuning(int buffer_kib=-1, int window_kib=-1, int segs_per_group=-1,"
        " int threads=-1, int stage_offsets=-1) -> ()",
        &segment_pool_tuning);
}

TORCH_LIBRARY_IMPL(fastlab, CPU, m) {
  m.impl("segment_pool", &segment_pool);
  m.impl("segment_broadcast", &segment_broadcast);
  m.impl("segment_arg_scatter", &segment_arg_scatter);
}

#ifdef FASTLAB_WITH_CUDA
TORCH_LIBRARY_IMPL(fastlab, CUDA, m) {
  m.impl("segment_pool", &segment_pool);
  m.impl("segment_broadcast", &segment_broadcast);
  m.impl("segment_arg_scatter", &segment_arg_scatter);
}
#endif

}  // namespace fastlab
