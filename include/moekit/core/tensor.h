// TensorView: a non-owning strided view, laid out like DLPack's DLTensor (shape and strides in
// elements, device type codes of DLPack) so that a DLTensor maps onto it without a copy.
// Tensor: owning, 64-byte aligned host storage (device storage comes with the CUDA backend).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>

#include "moekit/core/dtype.h"
#include "moekit/core/error.h"

namespace moekit {

enum class DeviceType : int32_t { kCPU = 1, kCUDA = 2 };  // DLPack's kDLCPU, kDLCUDA

struct Device {
  DeviceType type = DeviceType::kCPU;
  int32_t id = 0;
  bool operator==(const Device&) const = default;
  std::string str() const;
};

inline constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};  // in elements (packed 4-bit types: even, but the last)

  TensorView() = default;
  // Contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});

  // An optional argument (bias, scale) is absent when its view has no dimensions.
  bool present() const { return ndim > 0; }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t numel() const;
  int64_t nbytes() const { return storage_bytes(dtype, numel()); }
  // Bytes from data to element `elements` (an offset in elements); for packed 4-bit types the
  // offset must be even (throws otherwise).
  int64_t byte_offset(int64_t elements) const;
  bool is_contiguous() const;
  // Row r of a view whose last dimension is contiguous.
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
  template <typename T>
  T* row(int64_t r) const {
    return static_cast<T*>(data) + r * stride[0];
  }
  // [a, b) along dim 0, same strides.
  TensorView slice0(int64_t begin, int64_t end) const;
  // Same data, new contiguous shape (requires a contiguous view).
  TensorView reshaped(std::initializer_list<int64_t> new_shape) const;
  // "bf16[4, 2048] cpu" — for error messages.
  std::string str() const;
  // True when the byte ranges of the two views intersect.
  bool overlaps(const TensorView& other) const;
};

// Owning, 64-byte aligned, contiguous host tensor.
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::initializer_list<int64_t> shape);
  static Tensor zeros(DType dtype, std::initializer_list<int64_t> shape);

  const TensorView& view() const { return view_; }
  operator const TensorView&() const { return view_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(view_.data);
  }
  int64_t numel() const { return view_.numel(); }
  int64_t size(int d) const { return view_.size(d); }
  DType dtype() const { return view_.dtype; }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> storage_;
  TensorView view_;
};

// Checks used by every host layer: they throw moekit::Error naming `what` and the mismatch.
void check_shape(const TensorView& t, std::initializer_list<int64_t> shape, const char* what);
void check_dtype(const TensorView& t, DType dtype, const char* what);
void check_row_major(const TensorView& t, const char* what);  // last dim contiguous, rows ordered
void check_data(const TensorView& t, const char* what);       // non-null unless empty

// 64-byte aligned host allocation (throws on failure).
void* aligned_alloc_bytes(int64_t bytes);
void aligned_free_bytes(void* p);

}  // namespace moekit
