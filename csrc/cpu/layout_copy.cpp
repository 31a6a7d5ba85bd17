// The fused_resnet_cpu operator library: copies between NCHW and channels_last on the CPU (the library is
// defined here; csrc/cpu/bn_fold.cpp adds the BatchNorm fold to it).
//
// An image in NCHW is a (C, H*W) matrix and in channels_last its transpose, so each conversion is one
// transposed copy per image. ATen copies a transposed matrix in blocks on one thread, element by
// element; here 8x8 tiles of 4-byte elements are transposed in AVX2 registers where the CPU has AVX2
// (asked at run time, so that one build runs on any x86-64 CPU), and the tiles are spread over ATen's
// threads. Elements are moved as bits, never computed on: every value, NaN payloads included, is kept.
// fused_resnet/memory_format.py calls these ops and falls back to ATen's copies without them.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FUSED_RESNET_X86 1
#endif

// `import fused_resnet._cpu` loads this library, which runs the registrations below. The module itself
// has no functions: everything is reached through torch.ops.fused_resnet_cpu.
extern "C" PyObject* PyInit__cpu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fused_resnet {
namespace {

constexpr int64_t kTile = 8;
// Rows of a source matrix per parallel task, and the fewest elements worth a thread of their own (ATen's
// grain size for elementwise loops).
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kElementsPerThread = 32768;
// Copies of at least this many bytes into NCHW are stored past the caches (see store()).
constexpr size_t kStreamBytes = 1 << 20;

// dst (cols x rows) = the transpose of src (rows x cols), for the block [row_begin, row_end) x
// [col_begin, col_end) of src, element by element in strips of kTile columns.
template <typename T>
void transpose_block_scalar(const T* src, T* dst, int64_t rows, int64_t cols, int64_t row_begin, int64_t row_end,
                            int64_t col_begin, int64_t col_end) {
  for (int64_t c0 = col_begin; c0 < col_end; c0 += kTile) {
    const int64_t c1 = std::min(c0 + kTile, col_end);
    for (int64_t r = row_begin; r < row_end; ++r) {
      for (int64_t c = c0; c < c1; ++c) {
        dst[c * rows + r] = src[r * cols + c];
      }
    }
  }
}

#ifdef FUSED_RESNET_X86
// How a tile's rows are stored. A copy that leaves the network (a returned feature map) is not read again
// soon: stored past the caches it does not evict what the next layers read, and its lines are not read
// in to be written. That takes dst rows aligned to the store's width: 32 bytes (an NCHW image whose H*W
// is a multiple of 8), else two 16-byte halves (H*W a multiple of 4).
enum class Store { kCached, kStream32, kStream16 };

template <Store kStore>
__attribute__((target("avx2"))) inline void store(float* p, __m256 v) {
  if constexpr (kStore == Store::kStream32) {
    _mm256_stream_ps(p, v);
  } else if constexpr (kStore == Store::kStream16) {
    _mm_stream_ps(p, _mm256_castps256_ps128(v));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps(v, 1));
  } else {
    _mm256_storeu_ps(p, v);
  }
}

// Rows i and i + 4 of a tile's source, their first halves in one register and their second halves in
// another: loaded as 16-byte halves, which costs no shuffle (the standard transpose's last stage).
__attribute__((target("avx2"))) inline void load_halves(const float* row, const float* row4, __m256& lo, __m256& hi) {
  lo = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(row)), _mm_loadu_ps(row4), 1);
  hi = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(row + 4)), _mm_loadu_ps(row4 + 4), 1);
}

// One 8x8 tile of 4-byte elements: rows of src `src_stride` elements apart, rows of dst likewise.
template <Store kStore>
__attribute__((target("avx2"))) inline void transpose_tile_8x8(const float* src, int64_t src_stride, float* dst,
                                                                int64_t dst_stride) {
  // a_i holds columns 0-3 of rows i and i+4, b_i columns 4-7; within each 128-bit lane this is a 4x4
  // transpose (interleave pairs of rows, then pairs of pairs), which leaves column j of rows 0-3 in the
  // low lane and of rows 4-7 in the high lane: dst row j.
  __m256 a0, a1, a2, a3, b0, b1, b2, b3;
  load_halves(src + 0 * src_stride, src + 4 * src_stride, a0, b0);
  load_halves(src + 1 * src_stride, src + 5 * src_stride, a1, b1);
  load_halves(src + 2 * src_stride, src + 6 * src_stride, a2, b2);
  load_halves(src + 3 * src_stride, src + 7 * src_stride, a3, b3);
  __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
  __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
  __m256 t4 = _mm256_unpacklo_ps(b0, b1), t5 = _mm256_unpackhi_ps(b0, b1);
  __m256 t6 = _mm256_unpacklo_ps(b2, b3), t7 = _mm256_unpackhi_ps(b2, b3);
  store<kStore>(dst + 0 * dst_stride, _mm256_shuffle_ps(t0, t2, 0x44));
  store<kStore>(dst + 1 * dst_stride, _mm256_shuffle_ps(t0, t2, 0xEE));
  store<kStore>(dst + 2 * dst_stride, _mm256_shuffle_ps(t1, t3, 0x44));
  store<kStore>(dst + 3 * dst_stride, _mm256_shuffle_ps(t1, t3, 0xEE));
  store<kStore>(dst + 4 * dst_stride, _mm256_shuffle_ps(t4, t6, 0x44));
  store<kStore>(dst + 5 * dst_stride, _mm256_shuffle_ps(t4, t6, 0xEE));
  store<kStore>(dst + 6 * dst_stride, _mm256_shuffle_ps(t5, t7, 0x44));
  store<kStore>(dst + 7 * dst_stride, _mm256_shuffle_ps(t5, t7, 0xEE));
}

// The tiles of rows [row_begin, full_rows) and columns [0, full_cols), in blocks of 2x2 tiles: each block
// reads 16 source rows by one 64-byte line each, whole, and writes 16 destination rows by 16 elements,
// the tiles that share destination lines one after the other. (Tile by tile down a column of tiles, a
// wide source's rows, as many kilobytes apart, would evict each other from the cache before their
// lines' second halves were read.)
template <Store kStore>
__attribute__((target("avx2"))) void transpose_tiles(const float* src, float* dst, int64_t rows, int64_t cols, int64_t row_begin,
                                                     int64_t full_rows, int64_t full_cols) {
  for (int64_t r = row_begin; r < full_rows; r += 2 * kTile) {
    const bool second_row = r + kTile < full_rows;
    for (int64_t c = 0; c < full_cols; c += 2 * kTile) {
      const bool second_col = c + kTile < full_cols;
      for (int64_t cc = c; cc < (second_col ? c + 2 * kTile : c + kTile); cc += kTile) {
        transpose_tile_8x8<kStore>(src + r * cols + cc, cols, dst + cc * rows + r, rows);
        if (second_row) transpose_tile_8x8<kStore>(src + (r + kTile) * cols + cc, cols, dst + cc * rows + r + kTile, rows);
      }
    }
  }
  if constexpr (kStore != Store::kCached) _mm_sfence();  // streamed stores are ordered before the task ends
}

__attribute__((target("avx2"))) void transpose_rows_avx2(const float* src, float* dst, int64_t rows, int64_t cols,
                                                         int64_t row_begin, int64_t row_end, bool stream) {
  const int64_t full_rows = row_begin + (row_end - row_begin) / kTile * kTile;
  const int64_t full_cols = cols / kTile * kTile;
  // Every tile's rows start as aligned as the image's when `rows` is a multiple of the store's width
  // (row_begin is a multiple of 8).
  const auto address = reinterpret_cast<uintptr_t>(dst);
  if (stream && rows % 8 == 0 && address % 32 == 0) {
    transpose_tiles<Store::kStream32>(src, dst, rows, cols, row_begin, full_rows, full_cols);
  } else if (stream && rows % 4 == 0 && address % 16 == 0) {
    transpose_tiles<Store::kStream16>(src, dst, rows, cols, row_begin, full_rows, full_cols);
  } else {
    transpose_tiles<Store::kCached>(src, dst, rows, cols, row_begin, full_rows, full_cols);
  }
  // The edges: the last columns of every row, and the last rows' first columns.
  transpose_block_scalar(src, dst, rows, cols, row_begin, row_end, full_cols, cols);
  transpose_block_scalar(src, dst, rows, cols, full_rows, row_end, 0, full_cols);
}

bool has_avx2() {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2;
}
#endif

// dst[image] = the transpose of src[image], each a (rows x cols) matrix, on ATen's threads.
template <typename T>
void transpose_images(const T* src, T* dst, int64_t images, int64_t rows, int64_t cols, bool stream) {
  const int64_t tasks_per_image = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t image_size = rows * cols;
  const int64_t grain = std::max<int64_t>(1, kElementsPerThread / std::max<int64_t>(1, kRowsPerTask * cols));
  at::parallel_for(0, images * tasks_per_image, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t image = task / tasks_per_image;
      const int64_t row_begin = task % tasks_per_image * kRowsPerTask;
      const int64_t row_end = std::min(row_begin + kRowsPerTask, rows);
      const T* image_src = src + image * image_size;
      T* image_dst = dst + image * image_size;
#ifdef FUSED_RESNET_X86
      if constexpr (sizeof(T) == 4) {
        if (has_avx2() && rows >= kTile && cols >= kTile) {
          transpose_rows_avx2(reinterpret_cast<const float*>(image_src), reinterpret_cast<float*>(image_dst), rows, cols,
                              row_begin, row_end, stream);
          continue;
        }
      }
#endif
      transpose_block_scalar(image_src, image_dst, rows, cols, row_begin, row_end, 0, cols);
    }
  });
}

// Elements as unsigned integers of their size: copied as bits.
void transpose_images_of_size(const void* src, void* dst, int64_t element_size, int64_t images, int64_t rows,
                              int64_t cols, bool stream) {
  switch (element_size) {
    case 1:
      return transpose_images(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), images, rows, cols, stream);
    case 2:
      return transpose_images(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), images, rows, cols, stream);
    case 4:
      return transpose_images(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), images, rows, cols, stream);
    case 8:
      return transpose_images(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), images, rows, cols, stream);
    default:
      TORCH_CHECK(false, "fused_resnet_cpu: elements of ", element_size, " bytes are not supported (1, 2, 4 or 8)");
  }
}

// Whether x's elements lie densely in `format`'s order. A dimension of size 1 is never stepped along,
// so its stride does not matter (PyTorch gives such dimensions either layout's stride).
bool dense_in(const at::Tensor& x, c10::MemoryFormat format) {
  const int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  const bool channels_last = format == c10::MemoryFormat::ChannelsLast;
  const int64_t expected[4] = {c * h * w, channels_last ? 1 : h * w, channels_last ? w * c : w, channels_last ? c : 1};
  for (int64_t d = 0; d < 4; ++d) {
    if (x.size(d) != 1 && x.stride(d) != expected[d]) return false;
  }
  return true;
}

// x (N, C, H, W), dense in layout `from`, copied into a new tensor dense in the other layout.
at::Tensor copy_into_other_layout(const at::Tensor& x, c10::MemoryFormat from, const char* op) {
  const bool from_channels_last = from == c10::MemoryFormat::ChannelsLast;
  const char* layout = from_channels_last ? "channels_last" : "contiguous (NCHW)";
  TORCH_CHECK(x.device().is_cpu(), "fused_resnet_cpu::", op, ": expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 4, "fused_resnet_cpu::", op, ": expected a 4-D tensor, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.layout() == c10::kStrided && !x.is_conj() && !x.is_neg(), "fused_resnet_cpu::", op,
              ": expected a plain strided tensor");
  TORCH_CHECK(x.numel() == 0 || dense_in(x, from), "fused_resnet_cpu::", op, ": expected a dense ", layout,
              " tensor, got strides ", x.strides(), " for sizes ", x.sizes());
  const auto to = from_channels_last ? c10::MemoryFormat::Contiguous : c10::MemoryFormat::ChannelsLast;
  at::Tensor out = at::empty(x.sizes(), x.options(), to);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  // Per image: channels_last is a (H*W, C) matrix, NCHW a (C, H*W) one.
  const int64_t rows = from_channels_last ? hw : c, cols = from_channels_last ? c : hw;
  // An NCHW copy is what the network returns (a feature map), read after the rest of it ran; a
  // channels_last one is read at once by the next conv.
  const bool stream = from_channels_last && out.nbytes() >= kStreamBytes;
  if (out.numel() != 0) transpose_images_of_size(x.const_data_ptr(), out.data_ptr(), x.element_size(), n, rows, cols, stream);
  return out;
}

at::Tensor channels_last_to_contiguous(const at::Tensor& x) {
  return copy_into_other_layout(x, c10::MemoryFormat::ChannelsLast, "channels_last_to_contiguous");
}

at::Tensor contiguous_to_channels_last(const at::Tensor& x) {
  return copy_into_other_layout(x, c10::MemoryFormat::Contiguous, "contiguous_to_channels_last");
}

}  // namespace

TORCH_LIBRARY(fused_resnet_cpu, m) {
  m.def("channels_last_to_contiguous(Tensor x) -> Tensor");
  m.def("contiguous_to_channels_last(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_resnet_cpu, CPU, m) {
  m.impl("channels_last_to_contiguous", &channels_last_to_contiguous);
  m.impl("contiguous_to_channels_last", &contiguous_to_channels_last);
}

}  // namespace fused_resnet
