// What `moekit bench` was asked to run, resolved and checked before anything is allocated;
// shared by the single-process sweep (bench_command.cc) and the expert-parallel one (bench_ep.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench_layer.h"
#include "ep_job.h"
#include "layer_spec.h"

namespace moekit::cli {

// The sweep of a plain `moekit bench`: under a minute on a 2-core machine, generation included.
inline constexpr const char* kDefaultPreset = "qwen3-30b-a3b";

struct BenchOptions {
  ShapeOptions shape;
  std::string tokens = "1,32,512";
  std::vector<std::string> formats = {"bf16"};
  std::string device = "cpu";
  int threads = 0;
  std::string isa;
  int reps = 0;  // 0: adaptive, see bench_row.h
  std::string json;
  uint64_t seed = 1;
  int err_tokens = 4;
  bool no_graph = false;  // --no-graph (GPU rows)
  int ep = 0;             // 0: one process, no expert parallelism
  EpMode ep_mode = EpMode::kAllToAll;
  EpPlacement placement = EpPlacement::kLinear;
};

struct BenchPlan {
  std::vector<LayerSpec> specs;
  std::vector<int64_t> token_counts;
  std::vector<QuantScheme> formats;  // --format's list; with several, the CPU rows interleave
  bool cuda = false;
  CpuIsa isa = CpuIsa::kScalar;
  int64_t max_tokens() const;
};

// The default preset when no shape is given. Throws CLI::ValidationError naming the option.
BenchPlan resolve_bench_plan(const BenchOptions& options);

// Refuses, before any allocation, layers this machine cannot hold: one per format, built in turn
// and kept (each one's weights twice while it is generated and prepacked; with EP split among
// the ranks, which share the host's memory), and per rank on this host the activations of
// `max_tokens` tokens and the cache-flush buffer.
void check_memory(const LayerSpec& spec, const std::vector<QuantScheme>& formats,
                  int64_t max_tokens, int64_t flush_bytes, int ranks_on_host);

std::string gigabytes(int64_t bytes);                              // "1.21 GB"
std::string format_list(const std::vector<QuantScheme>& formats);  // "bf16,w4a16:g128"

// Progress lines on stderr around make_bench_layer; `share` names the part generated.
void log_generating(const LayerSpec& spec, const QuantScheme& format, int64_t bytes,
                    const std::string& share);
void log_generated(const LayerSpec& spec, const BenchLayer& layer);

}  // namespace moekit::cli
