// DLPack interop: the DLTensor ABI (DLPack v0.8 field order, written from the public spec) and
// zero-copy conversion to and from TensorView.
#pragma once

#include <cstdint>

#include "moekit/core/tensor.h"

extern "C" {
typedef struct {
  int32_t device_type;
  int32_t device_id;
} DLDevice;
typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;
}

namespace moekit {

// Throws moekit::Error for dtypes moekit lacks, lanes != 1, ndim > kMaxDims or unknown devices.
TensorView from_dlpack(const DLTensor& t);
// The returned DLTensor points into `v` (shape/strides): keep `v` alive while it is used.
DLTensor to_dlpack(TensorView& v);

}  // namespace moekit
