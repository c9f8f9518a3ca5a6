// The CUDA side of `moekit bench --device cuda`: the card's ceilings, the layer's weights on the
// device, and a row timed as CUDA-graph replays with CUDA events, L2 flushed before each rep.
// Built into every moekit; without CUDA each entry throws CLI::ValidationError for --device.
#pragma once

#include <cstdint>
#include <memory>

#include "bench_layer.h"
#include "bench_report.h"
#include "bench_row.h"

namespace moekit::cli {

// Device copy bandwidth (2 GiB device-to-device, bytes read + written), cuBLAS bf16 and
// cuBLASLt fp8 e4m3 GEMM rates at 8192^3 (medians), of the current device.
BenchMachine measure_cuda_machine();

// The layer `config` describes, on the current device: the host weights are copied there (the
// copies are owned by the returned pointer, which must outlive the layer).
std::unique_ptr<MoELayer> make_cuda_bench_layer(const MoELayerConfig& config,
                                                const ExpertWeights& routed,
                                                const ExpertWeights* shared,
                                                const TensorView& correction_bias,
                                                std::shared_ptr<void>& device_copies);

// One row on the device: inputs drawn on the host and copied, routing timed on its own, the
// forward captured once in a CUDA graph and replayed (settings.cuda_graph; else launched afresh
// each rep), median of settings.reps (default 30), then the sampled oracle check on the host.
RowRun run_cuda_row(const RowSettings& settings, const LayerSpec& spec, BenchLayer& layer,
                    int64_t tokens);

}  // namespace moekit::cli
