// Device tensors, host <-> device copies and device queries.
#include <cuda_runtime_api.h>

#include "cuda/check.h"
#include "moekit/cuda.h"

namespace moekit {

int cuda_device_count() {
  int n = 0;
  // No driver or no device is not an error here: the answer is 0 (tests then skip).
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_device_name() {
  int dev = 0;
  MOEKIT_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp p{};
  MOEKIT_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return detail::concat(p.name, ", sm_", p.major, p.minor, ", ", p.multiProcessorCount, " SMs, ",
                        p.l2CacheSize >> 20, " MB L2");
}

void CudaTensor::Free::operator()(void* p) const {
  cudaFree(p);
}

CudaTensor::CudaTensor(DType dtype, std::initializer_list<int64_t> shape, int device) {
  if (device < 0) MOEKIT_CUDA_CHECK(cudaGetDevice(&device));
  view_ = TensorView(nullptr, dtype, shape, Device{DeviceType::kCUDA, device});
  void* p = nullptr;
  if (view_.nbytes() > 0) {
    int current = 0;
    MOEKIT_CUDA_CHECK(cudaGetDevice(&current));
    MOEKIT_CUDA_CHECK(cudaSetDevice(device));
    const cudaError_t rc = cudaMalloc(&p, static_cast<size_t>(view_.nbytes()));
    MOEKIT_CUDA_CHECK(cudaSetDevice(current));
    MOEKIT_CHECK(rc == cudaSuccess, "CudaTensor: cudaMalloc of ", view_.str(), " (", view_.nbytes(),
                 " bytes) failed: ", cudaGetErrorString(rc));
  }
  storage_.reset(p);
  view_.data = p;
}

CudaTensor CudaTensor::empty_like(const TensorView& like, int device) {
  // Allocate flat, then give the view like's shape with contiguous strides.
  CudaTensor t(like.dtype, {like.numel()}, device);
  TensorView v = t.view_;
  v.ndim = like.ndim;
  v.shape = like.shape;
  for (int64_t d = like.ndim - 1, s = 1; d >= 0; --d) {
    v.stride[d] = s;
    s *= like.shape[d];
  }
  t.view_ = v;
  return t;
}

CudaTensor CudaTensor::copy_of(const TensorView& host, int device) {
  CudaTensor t = empty_like(host, device);
  copy_to_device(host, t);
  return t;
}

Tensor CudaTensor::to_host() const {
  Tensor h(view_.dtype, {view_.numel()});
  TensorView v = h.view();
  copy_to_host(view_.reshaped({view_.numel()}), v);
  return h;
}

DeviceExpertWeights::DeviceExpertWeights(const ExpertWeights& host, int device) : view_(host) {
  for (TensorView* t :
       {&view_.w13, &view_.w2, &view_.b13, &view_.b2, &view_.s13.scale, &view_.s13.zero,
        &view_.s13.global, &view_.s2.scale, &view_.s2.zero, &view_.s2.global})
    if (t->present()) *t = copies_.emplace_back(CudaTensor::copy_of(*t, device)).view();
}

WorkspaceAllocator cuda_workspace_allocator(int device) {
  if (device < 0) MOEKIT_CUDA_CHECK(cudaGetDevice(&device));
  return [device](size_t bytes) {
    auto t = std::make_shared<CudaTensor>(
        DType::kU8, std::initializer_list<int64_t>{static_cast<int64_t>(bytes)}, device);
    return std::shared_ptr<void>(t, t->view().data);  // owns the tensor, points at its bytes
  };
}

namespace {

void check_copy(const TensorView& host, const TensorView& device, const char* what) {
  MOEKIT_CHECK(host.device.type == DeviceType::kCPU && device.device.type == DeviceType::kCUDA,
               what, ": expected a host and a CUDA tensor, got ", host.str(), " and ",
               device.str());
  MOEKIT_CHECK(host.dtype == device.dtype && host.numel() == device.numel(), what,
               ": dtype or size differ: ", host.str(), " vs ", device.str());
  MOEKIT_CHECK(host.is_contiguous() && device.is_contiguous(), what,
               ": both tensors must be contiguous, got ", host.str(), " and ", device.str());
}

}  // namespace

void copy_to_device(const TensorView& host, const TensorView& device) {
  check_copy(host, device, "copy_to_device");
  if (host.nbytes() > 0)
    MOEKIT_CUDA_CHECK(cudaMemcpy(device.data, host.data, host.nbytes(), cudaMemcpyHostToDevice));
}

void copy_to_host(const TensorView& device, const TensorView& host) {
  check_copy(host, device, "copy_to_host");
  if (host.nbytes() > 0)
    MOEKIT_CUDA_CHECK(cudaMemcpy(host.data, device.data, host.nbytes(), cudaMemcpyDeviceToHost));
}

}  // namespace moekit
