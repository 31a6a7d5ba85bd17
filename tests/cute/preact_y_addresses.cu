// Where the Hopper pre-activation kernels write y, computed on the CPU from the kernels' own types.
//
// For each kernel (element type, tile shape, with and without a residual) and each layer of a small
// set whose tiles cross image boundaries (and the channel count's end), this program
//   1. builds the kernel's arguments with conv2d_cutlass_sm90_kernel.cuh's arguments() and its
//      parameters with CUTLASS's to_underlying_arguments, which encodes y's TMA descriptor: the
//      encoding call is replaced by one that records it (the driver is not needed, nor loaded);
//   2. walks every CTA tile as the kernel's y store does (the TMA coordinate tensor over the
//      linearised problem shape, the CTA's tile of it, its epilogue subtiles and TMA boxes) and, for
//      every (m, n) of the output, turns the TMA coordinate into a byte offset with the recorded
//      descriptor, then compares it with the offset of pixel m = (image, p, q), channel n, in a
//      dense NHWC tensor; and checks that each TMA box (origin and size) covers exactly its subtile.
// It prints one line per kernel and layer, then the totals. A control evaluates what the kernels
// did before (CUTLASS's (Q, P, N) stride read against the linearised M, stored from registers) for a
// y whose images are padded: it must find mismatches, or the check could not tell the two apart.
//
// Built and run by tests/test_cuda_preact_y_store.py:
//   nvcc -std=c++20 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
//        -I<cutlass>/include -Icsrc/cuda preact_y_addresses.cu -o preact_y_addresses

#define CUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL 1  // call cuTensorMapEncodeTiled by name: the one below
#define FUSED_RESNET_WITH_SM90 1
#undef NDEBUG  // CuTe's checks of the descriptor (strides multiple of 16 bytes, box sizes) stay on

#include <cuda.h>

#include <cstdint>
#include <cstdio>
#include <map>
#include <set>
#include <vector>

#include "conv2d_cutlass_sm90_kernel.cuh"

namespace {

struct Descriptor {
  unsigned rank = 0;
  uint64_t dims[5] = {};
  uint64_t byte_strides[5] = {};  // [0]: the element size, implicit in a real descriptor
  uint32_t box[5] = {};
  uint32_t element_strides[5] = {};
};

std::map<const void*, Descriptor> encoded;  // by global address
size_t element_bytes = 0;

}  // namespace

// What CuTe calls to encode a TMA descriptor; records it instead.
extern "C" CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap*, CUtensorMapDataType, cuuint32_t rank, void* address,
                                                   const cuuint64_t* dims, const cuuint64_t* strides,
                                                   const cuuint32_t* box, const cuuint32_t* element_strides,
                                                   CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                                   CUtensorMapFloatOOBfill) {
  Descriptor d;
  d.rank = rank;
  d.byte_strides[0] = element_bytes;
  for (unsigned i = 0; i < rank; ++i) {
    d.dims[i] = dims[i];
    d.box[i] = box[i];
    d.element_strides[i] = element_strides[i];
    if (i > 0) {
      d.byte_strides[i] = strides[i - 1];
    }
  }
  encoded[address] = d;
  return CUDA_SUCCESS;
}

// The im2col descriptors (x, the output z) are not checked here: accepted unrecorded.
extern "C" CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                                    const cuuint64_t*, const cuuint64_t*, const int*, const int*,
                                                    cuuint32_t, cuuint32_t, const cuuint32_t*, CUtensorMapInterleave,
                                                    CUtensorMapSwizzle, CUtensorMapL2promotion,
                                                    CUtensorMapFloatOOBfill) {
  return CUDA_SUCCESS;
}

namespace {

using fused_resnet::Conv2dProblem;

struct Layer {
  const char* name;
  int n, h, w, c, k, r, s, stride, pad;
};

// M = N*P*Q is not a multiple of any tile's M, images end inside tiles, and K ends inside a tile.
const Layer kLayers[] = {
    {"1x1 3x7x7 64->200", 3, 7, 7, 64, 200, 1, 1, 1, 0},
    {"3x3/2 2x13x13 64->136", 2, 13, 13, 64, 136, 3, 3, 2, 1},
    {"3x3 5x9x5 128->64", 5, 9, 5, 128, 64, 3, 3, 1, 1},
};

// Fake, distinct, 128-byte aligned device addresses: nothing is dereferenced.
char* const kX = reinterpret_cast<char*>(uintptr_t(1) << 40);
char* const kWeight = kX + (uintptr_t(1) << 36);
char* const kBias = kWeight + (uintptr_t(1) << 36);
char* const kResidual = kBias + (uintptr_t(1) << 36);
char* const kY = kResidual + (uintptr_t(1) << 36);
char* const kZ = kY + (uintptr_t(1) << 36);
char* const kScale = kZ + (uintptr_t(1) << 36);
char* const kShift = kScale + (uintptr_t(1) << 36);

Conv2dProblem problem_for(const Layer& l, bool residual) {
  Conv2dProblem p{};
  p.n = l.n, p.h = l.h, p.w = l.w, p.c = l.c, p.k = l.k, p.r = l.r, p.s = l.s;
  p.p = (l.h + 2 * l.pad - l.r) / l.stride + 1;
  p.q = (l.w + 2 * l.pad - l.s) / l.stride + 1;
  p.pad_h = p.pad_w = l.pad;
  p.stride_h = p.stride_w = l.stride;
  p.dilation_h = p.dilation_w = 1;
  p.x = kX, p.weight = kWeight, p.bias = kBias, p.residual = residual ? kResidual : nullptr;
  p.out = kY, p.preact_out = kZ, p.preact_scale = kScale, p.preact_shift = kShift;
  return p;
}

// Byte offset of pixel m (linearised as (image, p, q)), channel n in an NHWC tensor with these
// element strides of image, row and column (the channel's is 1).
int64_t nhwc_offset(const Conv2dProblem& p, int64_t m, int64_t n, int64_t image_stride, int64_t row_stride,
                    int64_t column_stride, size_t bytes) {
  const int64_t q = m % p.q, row = (m / p.q) % p.p, image = m / (int64_t(p.p) * p.q);
  return (image * image_stride + row * row_stride + q * column_stride + n) * int64_t(bytes);
}

template <class Coord>
int64_t coordinate_offset(const Descriptor& d, const Coord& coord) {
  int64_t offset = 0;
  cute::for_each(cute::make_seq<cute::rank_v<Coord>>{}, [&](auto i) {
    offset += int64_t(cute::get<i>(coord)) * int64_t(d.byte_strides[i]);
  });
  return offset;
}

struct Counts {
  int64_t elements = 0, address_mismatches = 0, boxes = 0, box_mismatches = 0;
};

template <typename Element, int TileM, int TileN, bool Residual>
Counts check(const Layer& layer, const char* type_name) {
  using K = fused_resnet::sm90::HopperConv<Element, TileM, TileN, Residual, /*Preact=*/true>;
  using Kernel = typename K::Kernel;
  using Epilogue = typename K::Epilogue;
  using AuxStore = fused_resnet::sm90::LinearAuxStore<Epilogue::DispatchPolicy::StagesD, typename Epilogue::EpilogueTile,
                                                      Element, typename Epilogue::SmemLayoutAtomD,
                                                      typename Epilogue::CopyOpR2S>;
  Counts counts;
  const Conv2dProblem problem = problem_for(layer, Residual);
  const auto args = fused_resnet::sm90::arguments<Element, TileM, TileN, Residual, true>(problem);
  if (K::Device::can_implement(args) != cutlass::Status::kSuccess) {
    std::printf("FAIL %s %dx%d residual=%d %s: can_implement refuses the layer\n", type_name, TileM, TileN, Residual,
                layer.name);
    counts.address_mismatches = 1;
    return counts;
  }
  encoded.clear();
  element_bytes = sizeof(Element);
  const typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  if (encoded.count(kY) != 1) {
    std::printf("FAIL %s %dx%d residual=%d %s: no TMA descriptor for y\n", type_name, TileM, TileN, Residual, layer.name);
    counts.address_mismatches = 1;
    return counts;
  }
  const Descriptor& y = encoded[kY];

  // The y store's parameters, where the tree (relu(multiply_add(scale, store(y), shift))) keeps them.
  const auto& aux = params.epilogue.thread.op_0.op_1.op_1;
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(aux)>, typename AuxStore::Params>,
                "the y store is not where PreactTree puts it");

  // As Sm90AuxStore::get_consumer_store_callbacks and its tma_store do, over the kernel's own
  // (linearised) problem shape.
  auto [M, N, GemmK, L] = cute::append<4>(params.problem_shape, 1);
  auto mY = aux.tma_store_aux.get_tma_tensor(cute::make_shape(M, N, L));
  const auto tile = cute::take<0, 2>(typename K::TileShape{});
  const auto epi_tile = typename Epilogue::EpilogueTile{};
  const int tiles_m = (int(M) + TileM - 1) / TileM, tiles_n = (int(N) + TileN - 1) / TileN;
  const int64_t k = problem.k;
  for (int tm = 0; tm < tiles_m; ++tm) {
    for (int tn = 0; tn < tiles_n; ++tn) {
      auto gY = cute::local_tile(mY, tile, cute::make_coord(tm, tn, 0));
      // Every (m, n) of the tile: its TMA coordinate, turned into an address by the descriptor.
      for (int i = 0; i < TileM; ++i) {
        for (int j = 0; j < TileN; ++j) {
          const int64_t m = int64_t(tm) * TileM + i, n = int64_t(tn) * TileN + j;
          if (m >= int64_t(M) || n >= int64_t(N)) {
            continue;  // outside the tensor: TMA clips it
          }
          ++counts.elements;
          const int64_t expected = nhwc_offset(problem, m, n, int64_t(problem.p) * problem.q * k, problem.q * k, k,
                                               sizeof(Element));
          counts.address_mismatches += coordinate_offset(y, gY(i, j)) != expected;
        }
      }
      // Every TMA store of the tile writes one box at the coordinate of its first element: the box
      // must hold exactly the coordinates of its epilogue subtile.
      auto gY_epi = cute::flat_divide(gY, epi_tile);  // (EPI_TILE_M, EPI_TILE_N, EPI_M, EPI_N)
      auto bSG_gY = aux.tma_store_aux.get_slice(cute::Int<0>{}).partition_D(gY_epi);  // (TMA, TMA_M, TMA_N, EPI_M, EPI_N)
      for (int em = 0; em < int(cute::size<2>(gY_epi)); ++em) {
        for (int en = 0; en < int(cute::size<3>(gY_epi)); ++en) {
          std::set<std::vector<int64_t>> in_boxes, in_subtile;
          for (int a = 0; a < int(cute::size<1>(bSG_gY)); ++a) {
            for (int b = 0; b < int(cute::size<2>(bSG_gY)); ++b) {
              ++counts.boxes;
              const auto origin = bSG_gY(cute::_, a, b, em, en).data().coord_;
              std::vector<int64_t> at(y.rank, 0);
              // Every element of the box: origin + offset, offset < box size in each dimension.
              int64_t box_size = 1;
              for (unsigned d = 0; d < y.rank; ++d) box_size *= y.box[d];
              for (int64_t e = 0; e < box_size; ++e) {
                int64_t rest = e;
                cute::for_each(cute::make_seq<cute::rank_v<decltype(origin)>>{}, [&](auto d) {
                  at[d] = int64_t(cute::get<d>(origin)) + rest % y.box[d];
                  rest /= y.box[d];
                });
                in_boxes.insert(at);
              }
            }
          }
          for (int i = 0; i < int(cute::size<0>(gY_epi)); ++i) {
            for (int j = 0; j < int(cute::size<1>(gY_epi)); ++j) {
              const auto c = gY_epi(i, j, em, en);
              std::vector<int64_t> at(y.rank, 0);
              cute::for_each(cute::make_seq<cute::rank_v<decltype(c)>>{}, [&](auto d) { at[d] = cute::get<d>(c); });
              in_subtile.insert(at);
            }
          }
          counts.box_mismatches += in_boxes != in_subtile;
        }
      }
    }
  }
  std::printf("%s %dx%d residual=%d %s: y descriptor rank %u dims", type_name, TileM, TileN, Residual, layer.name,
              y.rank);
  for (unsigned d = 0; d < y.rank; ++d) std::printf(" %llu", (unsigned long long)y.dims[d]);
  std::printf(" byte strides");
  for (unsigned d = 0; d < y.rank; ++d) std::printf(" %llu", (unsigned long long)y.byte_strides[d]);
  std::printf(" box");
  for (unsigned d = 0; d < y.rank; ++d) std::printf(" %u", y.box[d]);
  std::printf("; shared memory %d B; elements %lld, address mismatches %lld, boxes %lld, box mismatches %lld\n",
              int(Kernel::SharedStorageSize), (long long)counts.elements, (long long)counts.address_mismatches, (long long)counts.boxes,
              (long long)counts.box_mismatches);
  return counts;
}

// The control: y's addresses as the register store computed them from CUTLASS's (Q, P, N) stride and
// the linearised M, for a y whose images are `pad` elements apart beyond the dense size.
int64_t control_mismatches(const Layer& layer, int64_t pad) {
  using Element = cutlass::half_t;
  using Stride = fused_resnet::sm90::OutputStride;
  const Conv2dProblem problem = problem_for(layer, false);
  const int64_t k = problem.k, image_stride = int64_t(problem.p) * problem.q * k + pad;
  Stride stride{};
  cute::get<0, 0>(stride) = k;
  cute::get<0, 1>(stride) = problem.q * k;
  cute::get<0, 2>(stride) = image_stride;
  const int M = problem.n * problem.p * problem.q;
  auto mY = cute::make_tensor(cute::make_gmem_ptr(reinterpret_cast<Element*>(kY)), cute::make_shape(M, problem.k, 1),
                              stride);
  int64_t mismatches = 0;
  const auto tile = cute::make_shape(cute::Int<128>{}, cute::Int<128>{});
  for (int tm = 0; tm * 128 < M; ++tm) {
    for (int tn = 0; tn * 128 < problem.k; ++tn) {
      auto gY = cute::local_tile(mY, tile, cute::make_coord(tm, tn, 0));
      for (int i = 0; i < 128; ++i) {
        for (int j = 0; j < 128; ++j) {
          const int64_t m = int64_t(tm) * 128 + i, n = int64_t(tn) * 128 + j;
          if (m < M && n < k) {
            const int64_t got = reinterpret_cast<const char*>(&gY(i, j)) - kY;
            mismatches += got != nhwc_offset(problem, m, n, image_stride, problem.q * k, k, sizeof(Element));
          }
        }
      }
    }
  }
  return mismatches;
}

}  // namespace

int main() {
  Counts total;
  auto add = [&](const Counts& c) {
    total.elements += c.elements;
    total.address_mismatches += c.address_mismatches;
    total.boxes += c.boxes;
    total.box_mismatches += c.box_mismatches;
  };
  for (const Layer& layer : kLayers) {
    add(check<cutlass::half_t, 128, 128, false>(layer, "fp16"));
    add(check<cutlass::half_t, 128, 128, true>(layer, "fp16"));
    add(check<cutlass::half_t, 128, 64, false>(layer, "fp16"));
    add(check<cutlass::half_t, 128, 64, true>(layer, "fp16"));
    add(check<cutlass::half_t, 64, 128, false>(layer, "fp16"));
    add(check<cutlass::half_t, 64, 128, true>(layer, "fp16"));
    add(check<cutlass::bfloat16_t, 128, 128, false>(layer, "bf16"));
    add(check<cutlass::bfloat16_t, 128, 128, true>(layer, "bf16"));
    add(check<cutlass::bfloat16_t, 128, 64, false>(layer, "bf16"));
    add(check<cutlass::bfloat16_t, 128, 64, true>(layer, "bf16"));
    add(check<cutlass::bfloat16_t, 64, 128, false>(layer, "bf16"));
    add(check<cutlass::bfloat16_t, 64, 128, true>(layer, "bf16"));
  }
  int64_t control_dense = 0, control_padded = 0;
  for (const Layer& layer : kLayers) {
    control_dense += control_mismatches(layer, 0);
    control_padded += control_mismatches(layer, 8 * layer.k);
  }
  std::printf("total: elements %lld, address mismatches %lld, boxes %lld, box mismatches %lld\n",
              (long long)total.elements, (long long)total.address_mismatches, (long long)total.boxes,
              (long long)total.box_mismatches);
  std::printf("control (old stride, register store): dense y mismatches %lld, padded y mismatches %lld\n",
              (long long)control_dense, (long long)control_padded);
  return total.address_mismatches == 0 && total.box_mismatches == 0 && control_padded > 0 ? 0 : 1;
}
