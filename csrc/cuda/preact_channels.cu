// Packing bias, scale and shift into the CUTLASS 2.x pre-activation kernels' per-channel vector, in
// one launch (a zeros and three strided copies took four).
//
// Packed on every call rather than cached per layer: a pack launched with the conv is captured with
// it in a CUDA graph, so that every replay reads the bias, scale and shift of that moment (in-place
// updates between replays included), and it runs on the conv's stream, so that it is ordered before
// the conv on any stream without events. Its cost is one launch of a kernel that reads 3 K values and
// writes 16 K bytes (K = output channels, at most 32 KiB for ResNet's 2048).

#include "preact_channels.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace fused_resnet {
namespace {

struct alignas(16) PackedChannel {
  float bias, scale, shift, unused;
};

template <typename T>
__global__ void pack_preact_channels_kernel(const T* bias, int64_t bias_stride, const T* scale, int64_t scale_stride,
                                            const T* shift, int64_t shift_stride, int64_t k, PackedChannel* out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < k) {
    out[i] = {bias ? float(bias[i * bias_stride]) : 0.f, float(scale[i * scale_stride]),
              float(shift[i * shift_stride]), 0.f};
  }
}

}  // namespace

at::Tensor pack_preact_channels(const std::optional<at::Tensor>& bias, const at::Tensor& scale, const at::Tensor& shift) {
  const int64_t k = scale.size(0);
  at::Tensor packed = at::empty({k, 4}, scale.options().dtype(at::kFloat));
  static_assert(sizeof(PackedChannel) == 4 * sizeof(float));
  if (k == 0) {
    return packed;
  }
  constexpr int kThreads = 256;
  const unsigned blocks = unsigned((k + kThreads - 1) / kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(scale.scalar_type(), "fused_resnet::pack_preact_channels", [&] {
    pack_preact_channels_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        bias ? bias->const_data_ptr<scalar_t>() : nullptr, bias ? bias->stride(0) : 0,
        scale.const_data_ptr<scalar_t>(), scale.stride(0), shift.const_data_ptr<scalar_t>(), shift.stride(0), k,
        reinterpret_cast<PackedChannel*>(packed.mutable_data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

}  // namespace fused_resnet
