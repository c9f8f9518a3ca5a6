// What the single-rank CUDA PrepareFinalize implementations share (internal header): cuda-local
// (standard format, parts.cc) and cuda-batched-local (batched format,
// batched_prepare_finalize.cc). Both map global ids to this rank's local ids through a device
// copy of the expert map's routes, count ids outside [-1, E) in a device counter instead of
// stopping the stream, check a prepare request on the host (shapes, dtypes, devices; never the
// data), and bring x into the experts' activation spec on the device.
#pragma once

#include <cuda_runtime_api.h>

#include <optional>
#include <string>

#include "cuda/kernels.h"
#include "moekit/cuda.h"

namespace moekit::cuda {

// Throws "<part>: <what> must be a CUDA tensor" (or a layout / null-data error naming `what`).
void check_device_tensor(const TensorView& t, const char* part, const char* what);

// x in the experts' activation spec: a1 [M, H] (x itself, rows strided as x's, when it already
// is in the spec's dtype and no weight is applied on the input; else a contiguous buffer) and
// its typed scale (e4m3: kTensor [1] or kToken [M] fp32; float: kNone).
struct SpecRows {
  TensorView a1;
  ActivationScale scale;
  uint32_t* amax = nullptr;  // scratch [1] of a dynamic per-tensor scale
  bool is_x = false;         // a1 is x: nothing to compute
};

class LocalPrepareFinalize : public PrepareFinalize {
 public:
  const ExpertMap& expert_map() const override { return map_; }
  int rank() const override { return rank_; }
  std::optional<std::string> can_implement(const MoEProblem& p) const override;
  // bf16 or fp16 activations (converted from x), or e4m3 with a per-tensor (static or dynamic)
  // or per-token fp32 scale (quantized from x on the device).
  std::optional<std::string> can_dispatch(const ActivationSpec& spec) const override;
  // What the device counter holds since the last call (synchronizes); resets it.
  int64_t take_bad_count() const;

 protected:
  // Throws "<name>: rank ... not in [0, ranks)" for a rank the map lacks.
  LocalPrepareFinalize(ExpertMap map, int rank, std::string name);

  // The request's sizes once it is checked: x [M, H] and the caller's ids and weights [M, k] on
  // the device, the spec one can_dispatch takes, weight_on_input only with k = 1. Throws
  // "<name> prepare: <what is wrong>" before anything is enqueued.
  struct Sizes {
    int64_t M, H, k;
  };
  Sizes check_request(const PrepareRequest& req) const;

  // Bytes of what take_local takes for `rows` rows of p.
  static size_t local_workspace(const MoEProblem& p, int64_t rows);

  // The local ids and weights [M, k] contiguous (map_ids: -1 for experts served elsewhere and
  // for padding; weights 1 when applied on the input), and x in the spec. Taken from ws before
  // anything is enqueued (take_local), then computed on the stream (map_local).
  struct Local {
    TensorView ids, weights;
    SpecRows rows;
  };
  Local take_local(const PrepareRequest& req, Workspace& ws) const;
  void map_local(const PrepareRequest& req, const Local& local, cudaStream_t stream) const;

  int32_t* bad_count() const { return bad_count_.data<int32_t>(); }

  ExpertMap map_;
  int rank_;
  std::string name_;

 private:
  CudaTensor routes_;     // [E, 3] ExpertRoute
  CudaTensor bad_count_;  // [1] ids outside [-1, E) seen by prepare (and pairs it dropped)
};

}  // namespace moekit::cuda
