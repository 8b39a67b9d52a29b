// The one binding file of duollm._C (docs/kernels.md): checks inputs, allocates outputs, takes the
// current stream and calls the launchers of csrc/*.cu (declared in duollm.cuh). The only
// file here that includes torch or Python headers.
//
// Errors: TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK ->
// RuntimeError (a failed launch). duollm.ops validates user input before these run; the
// checks below guard direct callers and the assumptions the kernels make.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "duollm.cuh"

namespace {

using duollm::DType;
using duollm::IType;

#define CHECK_CUDA(x) \
  TORCH_CHECK_VALUE((x).is_cuda(), #x ": expected a CUDA tensor, got one on ", (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK_VALUE((x).is_contiguous(), #x ": expected a contiguous tensor")
#define CHECK_DTYPE(x, dt)                                                               \
  TORCH_CHECK_TYPE((x).scalar_type() == (dt), #x ": expected dtype ", (dt), ", got ", \
                   (x).scalar_type())
#define CHECK_DIM(x, n) \
  TORCH_CHECK_VALUE((x).dim() == (n), #x ": expected a ", (n), "-D tensor, got shape ", (x).sizes())
#define CHECK_INPUT(x) \
  CHECK_CUDA(x);       \
  CHECK_CONTIGUOUS(x)
#define CHECK_LAUNCH(err) \
  TORCH_CHECK((err) == cudaSuccess, "duollm._C: kernel launch failed: ", cudaGetErrorString(err))

DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

IType int_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kChar: return IType::kInt8;
    case at::kByte: return IType::kUInt8;
    case at::kShort: return IType::kInt16;
    case at::kInt: return IType::kInt32;
    case at::kLong: return IType::kInt64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected an integer dtype (int8, uint8, int16, int32 "
                       "or int64), got ", t.scalar_type());
  }
  return IType::kInt64;  // unreachable
}

// An (n,) int64 index tensor on x's device (perm, inv, routes of a RouteGroups).
void check_index(const at::Tensor& idx, const at::Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(idx.is_cuda() && idx.device() == x.device(), name, ": expected a tensor on ",
                    x.device(), ", got one on ", idx.device());
  TORCH_CHECK_VALUE(idx.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, name, ": expected int64, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == n, name, ": expected shape (", n,
                    ",), got ", idx.sizes());
}

// A (n, d) float tensor: CUDA, contiguous, 2-D.
void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), name, ": expected a CUDA tensor, got one on ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK_VALUE(x.dim() == 2, name, ": expected a 2-D (N, d) tensor, got shape ", x.sizes());
  float_dtype(x, name);
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": on ", t.device(), ", expected ",
                    ref.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ",
                   ref.scalar_type(), ", got ", t.scalar_type());
}

// RMSNorm side tensors have the rows' arithmetic type: float64 for float64 rows, else float32.
at::ScalarType norm_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_norm_weight(const at::Tensor& w, const at::Tensor& x) {
  TORCH_CHECK_VALUE(w.device() == x.device(), "weight: on ", w.device(), ", expected ",
                    x.device());
  CHECK_CONTIGUOUS(w);
  CHECK_DTYPE(w, norm_dtype(x));
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(1), "weight: expected shape (",
                    x.size(1), ",), got ", w.sizes());
}

// Paths whose tokens skip: bit p of the mask, given from Python as a signed int64.
uint64_t skip_bits(int64_t skip_mask) { return static_cast<uint64_t>(skip_mask); }

void check_num_paths(int64_t num_paths) {
  TORCH_CHECK_VALUE(num_paths >= 1 && num_paths <= duollm::kMaxPaths,
                    "num_paths: the cuda backend supports 1 to ", duollm::kMaxPaths,
                    " paths, got ", num_paths);
}

// The current stream of the current device (set by the guard of each op).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// ----------------------------------------------------------------------------- ops

// routes (N,) any integer dtype -> (perm, inv, counts, offsets, routes_int64).
std::vector<at::Tensor> group_tokens(const at::Tensor& routes, int64_t num_paths) {
  CHECK_INPUT(routes);
  CHECK_DIM(routes, 1);
  check_num_paths(num_paths);
  const IType rtype = int_dtype(routes, "routes");
  const c10::cuda::OptionalCUDAGuard guard(routes.device());
  const int64_t n = routes.size(0);
  const auto i64 = routes.options().dtype(at::kLong);
  at::Tensor perm = at::empty({n}, i64), inv = at::empty({n}, i64);
  at::Tensor routes_out = at::empty({n}, i64);
  at::Tensor counts, offsets;
  if (n == 0) {  // nothing to launch; the tensors still have their documented values
    counts = at::zeros({num_paths}, i64);
    offsets = at::zeros({num_paths + 1}, i64);
    return {perm, inv, counts, offsets, routes_out};
  }
  counts = at::empty({num_paths}, i64);
  offsets = at::empty({num_paths + 1}, i64);
  at::Tensor workspace = at::empty({duollm::group_tokens_workspace_size(n, (int)num_paths)}, i64);
  CHECK_LAUNCH(duollm::launch_group_tokens(
      routes.data_ptr(), rtype, n, (int)num_paths, perm.data_ptr<int64_t>(),
      inv.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
      routes_out.data_ptr<int64_t>(), workspace.data_ptr<int64_t>(), current_stream()));
  return {perm, inv, counts, offsets, routes_out};
}

// out[i] = x[index[i]] (N, d), RMS-normalised with weight (d,) when given (float32, or float64
// for float64 x). Returns (out, rstd): rstd (N,) of weight's dtype with weight, else empty.
std::vector<at::Tensor> gather_fwd(const at::Tensor& x, const at::Tensor& index,
                                   const std::optional<at::Tensor>& weight, double eps) {
  check_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1);
  check_index(index, x, n, "index");
  if (weight) check_norm_weight(*weight, x);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor rstd = at::empty({weight ? n : 0}, x.options().dtype(norm_dtype(x)));
  CHECK_LAUNCH(duollm::launch_gather_fwd(
      x.data_ptr(), index.data_ptr<int64_t>(), weight ? weight->data_ptr() : nullptr,
      out.data_ptr(), weight ? rstd.data_ptr() : nullptr, n, d, eps,
      float_dtype(x, "x"), current_stream()));
  return {out, rstd};
}

// Backward of gather_fwd(x, perm, weight): (dx (N, d), dweight (d,) of weight's dtype, or
// empty without weight or need_dweight).
std::vector<at::Tensor> gather_bwd(const at::Tensor& dy, const at::Tensor& x,
                                   const at::Tensor& perm, const at::Tensor& inv,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& rstd, bool need_dweight) {
  check_rows(dy, "dy");
  check_rows(x, "x");
  check_like(x, dy, "x");
  TORCH_CHECK_VALUE(x.sizes() == dy.sizes(), "x: expected shape ", dy.sizes(), ", got ",
                    x.sizes());
  const int64_t n = dy.size(0), d = dy.size(1);
  check_index(perm, dy, n, "perm");
  check_index(inv, dy, n, "inv");
  const c10::cuda::OptionalCUDAGuard guard(dy.device());
  at::Tensor dx = at::empty_like(dy);
  const auto acc = dy.options().dtype(norm_dtype(dy));
  if (!weight) {
    CHECK_LAUNCH(duollm::launch_gather_bwd(
        dy.data_ptr(), x.data_ptr(), perm.data_ptr<int64_t>(), inv.data_ptr<int64_t>(), nullptr,
        nullptr, dx.data_ptr(), nullptr, nullptr, n, d, float_dtype(dy, "dy"), current_stream()));
    return {dx, at::empty({0}, acc)};
  }
  check_norm_weight(*weight, dy);
  TORCH_CHECK_VALUE(rstd.has_value(), "rstd: required with weight");
  check_like(*rstd, *weight, "rstd");
  TORCH_CHECK_VALUE(rstd->dim() == 1 && rstd->size(0) == n, "rstd: expected shape (", n,
                    ",), got ", rstd->sizes());
  // zeros: with n == 0 nothing is launched and the gradient is 0.
  at::Tensor dweight = need_dweight ? at::zeros({d}, acc) : at::empty({0}, acc);
  at::Tensor workspace =
      at::empty({need_dweight ? duollm::gather_bwd_workspace_size(n, d) : 0}, acc);
  CHECK_LAUNCH(duollm::launch_gather_bwd(
      dy.data_ptr(), x.data_ptr(), perm.data_ptr<int64_t>(), inv.data_ptr<int64_t>(),
      weight->data_ptr(), rstd->data_ptr(), dx.data_ptr(),
      need_dweight ? dweight.data_ptr() : nullptr,
      need_dweight ? workspace.data_ptr() : nullptr, n, d, float_dtype(dy, "dy"),
      current_stream()));
  return {dx, dweight};
}

// out[t] = residual[t] + gate[t] * y[inv[t]]; residual[t] for skipped tokens (N, d).
at::Tensor scatter_combine_fwd(const at::Tensor& y, const at::Tensor& inv,
                               const at::Tensor& routes,
                               const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& gate, int64_t skip_mask,
                               int64_t num_paths) {
  check_rows(y, "y");
  const int64_t n = y.size(0), d = y.size(1);
  check_index(inv, y, n, "inv");
  check_index(routes, y, n, "routes");
  check_num_paths(num_paths);
  if (residual) {
    check_like(*residual, y, "residual");
    TORCH_CHECK_VALUE(residual->sizes() == y.sizes(), "residual: expected shape ", y.sizes(),
                      ", got ", residual->sizes());
  }
  if (gate) {
    check_like(*gate, y, "gate");
    TORCH_CHECK_VALUE(gate->dim() == 1 && gate->size(0) == n, "gate: expected shape (", n,
                      ",), got ", gate->sizes());
  }
  const c10::cuda::OptionalCUDAGuard guard(y.device());
  at::Tensor out = at::empty_like(y);
  CHECK_LAUNCH(duollm::launch_scatter_combine_fwd(
      y.data_ptr(), inv.data_ptr<int64_t>(), routes.data_ptr<int64_t>(),
      residual ? residual->data_ptr() : nullptr, gate ? gate->data_ptr() : nullptr,
      out.data_ptr(), n, d, skip_bits(skip_mask), (int)num_paths, float_dtype(y, "y"),
      current_stream()));
  return out;
}

// Backward of scatter_combine_fwd for y and gate: (dy (N, d) grouped order, dgate (N,) or empty).
std::vector<at::Tensor> scatter_combine_bwd(const at::Tensor& dout, const at::Tensor& y,
                                            const at::Tensor& perm, const at::Tensor& routes,
                                            const std::optional<at::Tensor>& gate,
                                            int64_t skip_mask, int64_t num_paths,
                                            bool need_dy, bool need_dgate) {
  check_rows(dout, "dout");
  check_rows(y, "y");
  check_like(y, dout, "y");
  TORCH_CHECK_VALUE(y.sizes() == dout.sizes(), "y: expected shape ", dout.sizes(), ", got ",
                    y.sizes());
  const int64_t n = dout.size(0), d = dout.size(1);
  check_index(perm, dout, n, "perm");
  check_index(routes, dout, n, "routes");
  check_num_paths(num_paths);
  if (gate) {
    check_like(*gate, dout, "gate");
    TORCH_CHECK_VALUE(gate->dim() == 1 && gate->size(0) == n, "gate: expected shape (", n,
                      ",), got ", gate->sizes());
  }
  const c10::cuda::OptionalCUDAGuard guard(dout.device());
  at::Tensor dy = need_dy ? at::empty_like(dout) : at::empty({0}, dout.options());
  // d == 0 launches nothing, and an empty row's dot is 0.
  at::Tensor dgate = need_dgate ? (d == 0 ? at::zeros({n}, dout.options())
                                          : at::empty({n}, dout.options()))
                                : at::empty({0}, dout.options());
  CHECK_LAUNCH(duollm::launch_scatter_combine_bwd(
      dout.data_ptr(), y.data_ptr(), perm.data_ptr<int64_t>(), routes.data_ptr<int64_t>(),
      gate ? gate->data_ptr() : nullptr, need_dy ? dy.data_ptr() : nullptr,
      need_dgate ? dgate.data_ptr() : nullptr, n, d, skip_bits(skip_mask), (int)num_paths,
      float_dtype(dout, "dout"), current_stream()));
  return {dy, dgate};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duollm CUDA kernels: group_tokens, gather (+RMSNorm), scatter_combine, "
            "forward and backward. Called through duollm.cuda_backend.";
  m.def("group_tokens", &group_tokens, "Stable counting sort of token ids by route -> "
        "(perm, inv, counts, offsets, routes_int64)", py::arg("routes"), py::arg("num_paths"));
  m.def("gather_fwd", &gather_fwd, "out[i] = x[index[i]] (+ fused RMSNorm) -> (out, rstd)",
        py::arg("x"), py::arg("index"), py::arg("weight"), py::arg("eps"));
  m.def("gather_bwd", &gather_bwd, "Backward of gather_fwd -> (dx, dweight)", py::arg("dy"),
        py::arg("x"), py::arg("perm"), py::arg("inv"), py::arg("weight"), py::arg("rstd"),
        py::arg("need_dweight"));
  m.def("scatter_combine_fwd", &scatter_combine_fwd,
        "out[t] = residual[t] + gate[t] * y[inv[t]] (residual only for skipped tokens)",
        py::arg("y"), py::arg("inv"), py::arg("routes"), py::arg("residual"), py::arg("gate"),
        py::arg("skip_mask"), py::arg("num_paths"));
  m.def("scatter_combine_bwd", &scatter_combine_bwd,
        "Backward of scatter_combine_fwd -> (dy, dgate)", py::arg("dout"), py::arg("y"),
        py::arg("perm"), py::arg("routes"), py::arg("gate"), py::arg("skip_mask"),
        py::arg("num_paths"), py::arg("need_dy"), py::arg("need_dgate"));
}
