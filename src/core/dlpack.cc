#include "moekit/core/dlpack.h"

namespace moekit {

TensorView from_dlpack(const DLTensor& t) {
  MOEKIT_CHECK(t.ndim >= 1 && t.ndim <= kMaxDims, "from_dlpack: ndim ", t.ndim, " (1..", kMaxDims,
               " supported)");
  MOEKIT_CHECK(t.dtype.lanes == 1, "from_dlpack: vector dtypes (lanes ", t.dtype.lanes,
               ") are not supported");
  MOEKIT_CHECK(t.device.device_type == 1 || t.device.device_type == 2,
               "from_dlpack: device type ", t.device.device_type, " is neither CPU nor CUDA");
  const DTypeTraits* found = nullptr;
  for (const auto& tr : kDTypeTraits)
    if (tr.dlpack_code == t.dtype.code && tr.bits == t.dtype.bits) found = &tr;
  MOEKIT_CHECK(found, "from_dlpack: dtype code ", int(t.dtype.code), " bits ", int(t.dtype.bits),
               " has no moekit dtype");
  TensorView v;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  v.dtype = found->dtype;
  v.device = {static_cast<DeviceType>(t.device.device_type), t.device.device_id};
  v.ndim = t.ndim;
  int64_t s = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    v.shape[d] = t.shape[d];
    v.stride[d] = t.strides ? t.strides[d] : s;
    s *= t.shape[d];
  }
  return v;
}

DLTensor to_dlpack(TensorView& v) {
  DLTensor t{};
  t.data = v.data;
  t.device = {static_cast<int32_t>(v.device.type), v.device.id};
  t.ndim = v.ndim;
  t.dtype = {traits(v.dtype).dlpack_code, static_cast<uint8_t>(traits(v.dtype).bits), 1};
  t.shape = v.shape.data();
  t.strides = v.stride.data();
  t.byte_offset = 0;
  return t;
}

}  // namespace moekit
