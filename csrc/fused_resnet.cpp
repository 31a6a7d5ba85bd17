// The fused_resnet_C operator library: schemas, the CPU kernels, and the Python module stub.
//
// CUDA kernels are registered in csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m)).
// The fake (meta) implementations and the derivatives of the functional ops are in
// fused_resnet/backends/cuda.py. Every op that writes a preallocated `out` has a functional twin
// that allocates it, so either form can be used and checked.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/conv2d_cutlass.h"
#include "cuda_archs.h"
#ifdef FUSED_RESNET_WITH_CUTLASS
#include "cuda/conv2d_kernel_choice.h"
#endif

// `import fused_resnet._C` loads this library, which runs the registrations below. The module
// itself has no functions: everything is reached through torch.ops.fused_resnet_C.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // documentation
      -1,       // no per-interpreter state
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}

namespace fused_resnet {
namespace {

void add_relu_out_cpu(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  TORCH_CHECK(x.sizes() == y.sizes() && x.sizes() == out.sizes(), "fused_resnet_C::add_relu: x, y and out must ",
              "have one shape, got ", x.sizes(), ", ", y.sizes(), " and ", out.sizes());
  // TensorIterator checks that the three tensors share device and dtype, rejects a partially
  // overlapping out, and walks any strides.
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(out)
                                .add_const_input(x)
                                .add_const_input(y)
                                .resize_outputs(false)
                                .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, iter.common_dtype(), "fused_resnet_C::add_relu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // A 2-D loop: strides[0..2] step out, x, y along the inner dimension, strides[3..5] along the outer.
    iter.for_each([](char** data, const int64_t* strides, int64_t inner, int64_t outer) {
      for (int64_t j = 0; j < outer; ++j) {
        for (int64_t i = 0; i < inner; ++i) {
          opmath_t sum = opmath_t(*reinterpret_cast<const scalar_t*>(data[1] + i * strides[1] + j * strides[4])) +
                         opmath_t(*reinterpret_cast<const scalar_t*>(data[2] + i * strides[2] + j * strides[5]));
          // `sum < 0` is false for NaN, so NaN propagates as in torch.relu.
          *reinterpret_cast<scalar_t*>(data[0] + i * strides[0] + j * strides[3]) = scalar_t(sum < 0 ? opmath_t(0) : sum);
        }
      }
    });
  });
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty_like(x);
  add_relu_out_cpu(x, y, out);
  return out;
}

// Names of the convolution kernels; the `config` argument of the conv ops indexes this list.
// Empty when the extension was built without CUTLASS (then the conv ops have no kernels).
std::vector<std::string> conv2d_configs() {
  std::vector<std::string> names;
#ifdef FUSED_RESNET_WITH_CUTLASS
  for (const Conv2dConfig& config : kConv2dConfigs) {
    names.emplace_back(config.name);
  }
#endif
  return names;
}

void out_form_without_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for (const c10::IValue& value : torch::jit::last(*stack, op.schema().arguments().size())) {
      TORCH_CHECK(!(value.isTensor() && value.toTensor().requires_grad()), op.schema().name(),
                  ": the out= form has no derivative, but an argument requires grad; use the functional form");
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

constexpr const char* kNoConvKernels =
    "this build of fused_resnet._C has no conv kernels (the CUTLASS headers were missing at build time)";

std::string conv2d_layer_unsupported(at::ScalarType dtype, int64_t in_channels, at::IntArrayRef weight_size) {
  TORCH_CHECK(weight_size.size() == 4, "fused_resnet_C::conv2d_layer_unsupported: weight_size must be (K, C, R, S), got ",
              weight_size);
#ifdef FUSED_RESNET_WITH_CUTLASS
  return conv2d_layer_unsupported_reason(dtype, in_channels, weight_size[0], weight_size[1], weight_size[2],
                                         weight_size[3]);
#else
  return kNoConvKernels;
#endif
}

std::tuple<std::string, std::string, bool> conv2d_kernel(at::ScalarType dtype, at::IntArrayRef x_size,
                                                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                                         bool residual, at::IntArrayRef capability, int64_t sm_count,
                                                         int64_t config) {
  TORCH_CHECK(x_size.size() == 4 && weight_size.size() == 4 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2 && capability.size() == 2,
              "fused_resnet_C::conv2d_kernel: x_size and weight_size must have 4 sizes; stride, padding, dilation and ",
              "capability 2");
#ifdef FUSED_RESNET_WITH_CUTLASS
  const Conv2dLayer layer{dtype,          x_size[0],      x_size[1],      x_size[2],
                          x_size[3],      weight_size[0], weight_size[1], weight_size[2],
                          weight_size[3], {stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]},
                          residual};
  const Conv2dKernelChoice choice = choose_conv2d_kernel(layer, GpuInfo{capability[0], capability[1], sm_count}, config);
  return {choice.config < 0 ? "" : kConv2dConfigs[choice.config].name, choice.reason, choice.can_implement};
#else
  return {"", kNoConvKernels, false};
#endif
}

}  // namespace

TORCH_LIBRARY(fused_resnet_C, m) {
  // relu(x + y), computed in the op-math type (float for half/bfloat16) and rounded once.
  m.def("add_relu(Tensor x, Tensor y) -> Tensor");
  m.def("add_relu_out(Tensor x, Tensor y, Tensor(a!) out) -> ()");
  // act(conv2d(x, weight) + bias + residual) for groups = 1; act = ReLU if relu. The output is
  // channels_last. config: -1 picks a kernel by a heuristic, otherwise an index into conv2d_configs().
  m.def(
      "conv2d_bias_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
      "int[2] dilation, bool relu, int config=-1) -> Tensor");
  m.def(
      "conv2d_bias_act_out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, "
      "int[2] padding, int[2] dilation, bool relu, int config, Tensor(a!) out) -> ()");
  // y = conv2d(x, weight) + bias + residual into out, and relu(y * scale + shift) per output channel
  // into out_preact (a pre-activation ResNet's next BatchNorm + ReLU).
  m.def(
      "conv2d_preact_out(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor scale, Tensor shift, "
      "int[2] stride, int[2] padding, int[2] dilation, int config, Tensor(a!) out, Tensor(b!) out_preact) -> ()");
  m.def("conv2d_configs() -> str[]", &conv2d_configs);
  // Which kernel serves a layer on a GPU of compute capability `capability` with `sm_count` SMs:
  // (its name, or "" when none; why it cannot serve the layer, or "" when it can; whether CUTLASS's
  // can_implement accepts it). config as in conv2d_bias_act. The rule the CUDA kernels follow,
  // evaluated from sizes alone: it needs no GPU.
  m.def(
      "conv2d_kernel(ScalarType dtype, int[] x_size, int[] weight_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool residual, int[2] capability, int sm_count, int config=-1) -> "
      "(str kernel, str reason, bool can_implement)",
      &conv2d_kernel);
  // Why no conv kernel serves layers of this dtype, input channels and weight size whatever the
  // batch, spatial size and GPU ("" if one may): what an op traced with a symbolic batch can check.
  m.def("conv2d_layer_unsupported(ScalarType dtype, int in_channels, int[] weight_size) -> str",
        &conv2d_layer_unsupported);
  // The TORCH_CUDA_ARCH_LIST the library was built with, and why it cannot run on a GPU of compute
  // capability major.minor ("" if it can).
  m.def("cuda_archs() -> str", &built_cuda_archs);
  m.def("cuda_arch_unsupported(int major, int minor) -> str", &cuda_arch_unsupported_reason);
}

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("add_relu", &add_relu_cpu);
  m.impl("add_relu_out", &add_relu_out_cpu);
}

// The functional ops get their derivatives in Python (fused_resnet/backends/cuda.py). The out=
// forms have none: like aten's out= ops they refuse arguments that require grad, rather than return
// an output autograd would take for a constant.
TORCH_LIBRARY_IMPL(fused_resnet_C, Autograd, m) {
  m.impl("add_relu_out", torch::CppFunction::makeFromBoxedFunction<&out_form_without_grad>());
  m.impl("conv2d_bias_act_out", torch::CppFunction::makeFromBoxedFunction<&out_form_without_grad>());
  m.impl("conv2d_preact_out", torch::CppFunction::makeFromBoxedFunction<&out_form_without_grad>());
}

}  // namespace fused_resnet
