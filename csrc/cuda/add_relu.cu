// relu(x + y) on CUDA: one memory-bound pass, 16 bytes per load and store where the three
// pointers allow it, element by element otherwise.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace fused_resnet {
namespace {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T>
__device__ __forceinline__ T relu_sum(T a, T b) {
  using opmath_t = at::opmath_type<T>;
  opmath_t sum = opmath_t(a) + opmath_t(b);
  return T(sum < 0 ? opmath_t(0) : sum);  // NaN propagates, as in torch.relu
}

// Elements [0, n - n % V) in packs of V (pointers aligned to sizeof(T) * V), then the last
// n % V elements one per thread. No __restrict__: out may be x or y (add_relu_out(x, y, x)), and
// restrict would allow the compiler to read x and y through the read-only cache while out is written.
template <typename T, int V>
__global__ void add_relu_kernel(const T* x, const T* y, T* out, int64_t n) {
  const int64_t packs = n / V;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < packs; i += step) {
    Pack<T, V> a = reinterpret_cast<const Pack<T, V>*>(x)[i];
    Pack<T, V> b = reinterpret_cast<const Pack<T, V>*>(y)[i];
    Pack<T, V> r;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      r.v[j] = relu_sum(a.v[j], b.v[j]);
    }
    reinterpret_cast<Pack<T, V>*>(out)[i] = r;
  }
  if (first < n % V) {
    const int64_t i = packs * V + first;
    out[i] = relu_sum(x[i], y[i]);
  }
}

bool aligned(const void* p, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

template <typename T>
void launch_add_relu(const T* x, const T* y, T* out, int64_t n) {
  constexpr int kVector = 16 / sizeof(T);
  constexpr int kThreads = 256;
  const bool vectorised = aligned(x, 16) && aligned(y, 16) && aligned(out, 16);
  const int64_t work = vectorised ? (n + kVector - 1) / kVector : n;
  // 2^16 blocks fill any GPU many times over; beyond that the grid-stride loop covers the rest.
  const unsigned blocks = unsigned(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, int64_t(1) << 16));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorised) {
    add_relu_kernel<T, kVector><<<blocks, kThreads, 0, stream>>>(x, y, out, n);
  } else {
    add_relu_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(x, y, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void add_relu_out_cuda(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  TORCH_CHECK(x.sizes() == y.sizes() && x.sizes() == out.sizes(), "fused_resnet_C::add_relu: x, y and out must ",
              "have one shape, got ", x.sizes(), ", ", y.sizes(), " and ", out.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == out.scalar_type(),
              "fused_resnet_C::add_relu: x, y and out must have one dtype, got ", x.scalar_type(), ", ",
              y.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(x.is_cuda() && y.device() == x.device() && out.device() == x.device(),
              "fused_resnet_C::add_relu: x, y and out must be on one CUDA device, got ", x.device(), ", ",
              y.device(), " and ", out.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
  at::assert_no_partial_overlap(out, y);
  if (out.numel() == 0) {
    return;
  }
  c10::cuda::CUDAGuard guard(out.device());
  if (!out.is_non_overlapping_and_dense()) {
    at::Tensor dense = at::empty_like(out, at::MemoryFormat::Contiguous);
    add_relu_out_cuda(x, y, dense);
    out.copy_(dense);
    return;
  }
  // The kernel walks memory linearly, so x and y must be laid out as out is; they almost always
  // are (out is usually empty_like(x)), otherwise they are copied into that layout first.
  auto in_layout_of_out = [&](const at::Tensor& t) {
    return t.strides() == out.strides() ? t : at::empty_like(out).copy_(t);
  };
  const at::Tensor xs = in_layout_of_out(x);
  const at::Tensor ys = in_layout_of_out(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fused_resnet_C::add_relu", [&] {
    launch_add_relu<scalar_t>(xs.const_data_ptr<scalar_t>(), ys.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), out.numel());
  });
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty_like(x);
  add_relu_out_cuda(x, y, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("add_relu", &add_relu_cuda);
  m.impl("add_relu_out", &add_relu_out_cuda);
}

}  // namespace fused_resnet
