#include "moekit/core/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace moekit {

std::string Device::str() const {
  return type == DeviceType::kCPU ? "cpu" : "cuda:" + std::to_string(id);
}

TensorView::TensorView(void* data_, DType dtype_, std::initializer_list<int64_t> shape_,
                       Device device_)
    : data(data_), dtype(dtype_), device(device_), ndim(static_cast<int>(shape_.size())) {
  MOEKIT_CHECK(ndim >= 1 && ndim <= kMaxDims, "TensorView: ", ndim, " dims (1..", kMaxDims,
               " supported)");
  std::copy(shape_.begin(), shape_.end(), shape.begin());
  int64_t s = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    MOEKIT_CHECK(shape[d] >= 0, "TensorView: negative extent ", shape[d], " in dim ", d);
    stride[d] = s;
    s *= shape[d];
  }
}

int64_t TensorView::numel() const {
  if (ndim == 0) return 0;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t s = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && stride[d] != s) return false;
    s *= shape[d];
  }
  return true;
}

TensorView TensorView::slice0(int64_t begin, int64_t end) const {
  MOEKIT_CHECK(ndim >= 1 && 0 <= begin && begin <= end && end <= shape[0], "slice0 [", begin, ", ",
               end, ") out of range for ", str());
  TensorView v = *this;
  v.data = static_cast<char*>(data) + byte_offset(begin * stride[0]);
  v.shape[0] = end - begin;
  return v;
}

TensorView TensorView::reshaped(std::initializer_list<int64_t> new_shape) const {
  MOEKIT_CHECK(is_contiguous(), "reshaped: ", str(), " is not contiguous");
  TensorView v(data, dtype, new_shape, device);
  MOEKIT_CHECK(v.numel() == numel(), "reshaped: ", str(), " has ", numel(), " elements, not ",
               v.numel());
  return v;
}

int64_t TensorView::byte_offset(int64_t elements) const {
  MOEKIT_CHECK(!is_packed(dtype) || elements % 2 == 0, "byte_offset: element ", elements, " of ",
               str(), " starts inside a byte (packed types address whole bytes)");
  return storage_bytes(dtype, elements);
}

std::string TensorView::str() const {
  std::ostringstream os;
  os << name(dtype) << "[";
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  os << "] " << device.str();
  return os.str();
}

bool TensorView::overlaps(const TensorView& o) const {
  if (!data || !o.data || numel() == 0 || o.numel() == 0 || !(device == o.device)) return false;
  // Byte span [first, last] covered by each view (conservative for strided views).
  auto span = [](const TensorView& t) {
    int64_t last = 0;
    for (int d = 0; d < t.ndim; ++d) last += (t.shape[d] - 1) * t.stride[d];
    const auto* b = static_cast<const char*>(t.data);
    return std::pair{b, b + storage_bytes(t.dtype, last + 1)};
  };
  auto [a0, a1] = span(*this);
  auto [b0, b1] = span(o);
  return a0 < b1 && b0 < a1;
}

void* aligned_alloc_bytes(int64_t bytes) {
  // Large buffers (weights, workspaces) are streamed end to end: back them with 2 MiB pages
  // where the kernel allows it, so the walk does not miss the TLB every 4 KiB.
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t want = static_cast<size_t>(std::max<int64_t>(bytes, 1));
  const size_t align = want >= 2 * kHuge ? kHuge : 64;
  const size_t n = (want + align - 1) & ~(align - 1);
  void* p = std::aligned_alloc(align, n);
  MOEKIT_CHECK(p != nullptr, "out of host memory allocating ", bytes, " bytes");
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(p, n, MADV_HUGEPAGE);  // advice only: failure changes nothing
#endif
  return p;
}

void aligned_free_bytes(void* p) { std::free(p); }

void Tensor::Free::operator()(void* p) const { aligned_free_bytes(p); }

Tensor::Tensor(DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v(nullptr, dtype, shape);
  storage_.reset(aligned_alloc_bytes(v.nbytes()));
  v.data = storage_.get();
  view_ = v;
}

Tensor Tensor::zeros(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t(dtype, shape);
  std::memset(t.view_.data, 0, t.view_.nbytes());
  return t;
}

namespace {
std::string shape_str(std::initializer_list<int64_t> shape) {
  std::ostringstream os;
  os << "[";
  int i = 0;
  for (int64_t s : shape) os << (i++ ? ", " : "") << s;
  return os.str() + "]";
}
}  // namespace

void check_shape(const TensorView& t, std::initializer_list<int64_t> shape, const char* what) {
  bool ok = t.ndim == static_cast<int>(shape.size());
  int d = 0;
  for (int64_t s : shape) ok = ok && t.shape[d++] == s;
  MOEKIT_CHECK(ok, what, ": expected shape ", shape_str(shape), ", got ", t.str());
}

void check_dtype(const TensorView& t, DType dtype, const char* what) {
  MOEKIT_CHECK(t.dtype == dtype, what, ": expected dtype ", name(dtype), ", got ", t.str());
}

void check_row_major(const TensorView& t, const char* what) {
  bool ok = t.ndim >= 1 && t.stride[t.ndim - 1] == 1;
  for (int d = t.ndim - 2; ok && d >= 0; --d)
    ok = t.shape[d] <= 1 || t.stride[d] >= t.shape[d + 1] * t.stride[d + 1];
  MOEKIT_CHECK(ok, what, ": last dimension must be contiguous and rows must not overlap, got ",
               t.str());
}

void check_data(const TensorView& t, const char* what) {
  MOEKIT_CHECK(t.data != nullptr || t.numel() == 0, what, ": null data pointer for ", t.str());
}

}  // namespace moekit
