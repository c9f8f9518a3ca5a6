// The CUDA router behind moekit::route() (router.h) for device tensors: host side validated by
// route(); this enqueues one kernel on `stream` and never synchronizes.
#pragma once

#include <optional>
#include <string>

#include "moekit/router.h"

namespace moekit::cuda {

// Why the CUDA router cannot run `config` (E > 1024, grouped top-k with n_group > 32), or nullopt.
std::optional<std::string> route_unsupported(const RouterConfig& config);

void route(const RouterConfig& config, const TensorView& logits, const TensorView& correction_bias,
           const TensorView& topk_ids, const TensorView& topk_weights, void* stream);

}  // namespace moekit::cuda
