// Results of `moekit bench`: one BenchRow per (layer, token count[, EP ranks]), printed as a
// table on stdout and written as the JSON of DESIGN.md §7 (a stable interface: never rename its
// fields).
#pragma once

#include <cstdint>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "bench_roofline.h"
#include "layer_spec.h"
#include "machine.h"

namespace moekit::cli {

// An EP layer's data movement per forward, as its prepare/finalize counts it: medians over the
// timed reps for times; bytes and rounds (the same every rep) per forward.
struct CommPerForward {
  double dispatch_us = 0, combine_us = 0;
  int64_t dispatch_bytes = 0, combine_bytes = 0, rounds = 0;
  int64_t bytes_sent() const { return dispatch_bytes + combine_bytes; }
};

// What one EP rank measured of a row (trivially copyable: the ranks gather theirs).
struct EpRankResult {
  double time_us = 0, time_min_us = 0, time_max_us = 0;  // median, fastest, slowest rep
  double routing_us = 0;
  int reps = 0;
  CommPerForward comm;
  RowCost cost;          // of its local experts, with the slots every rank sent them
  double read_gbps = 0;  // its share of the host's bandwidth, that cost's memory_us is from
  double max_rel_err = 0;
  int64_t err_tokens_checked = 0;
};

struct EpRow {
  int ep = 1;
  std::string mode, placement;
  std::vector<EpRankResult> ranks;  // by rank

  int slowest_rank() const;   // the largest median time: the row's time and its breakdown
  int roofline_rank() const;  // the largest roofline time: the row's roofline
  int64_t max_bytes_sent() const;
  const CommPerForward& comm() const { return ranks[slowest_rank()].comm; }
};

struct BenchRow {
  const LayerSpec* spec = nullptr;
  QuantScheme format;
  int64_t tokens = 0;  // with EP: per rank
  std::string experts_impl;
  // With EP: flops, slots and bytes summed over ranks; memory_us and compute_us of the
  // roofline rank.
  RowCost cost;
  double time_us = 0;  // median over reps (EP: of the slowest rank)
  double time_min_us = 0, time_max_us = 0;
  std::string device = "cpu";  // "cpu" or "cuda"
  bool graph = false;          // timed as CUDA-graph replays
  int reps = 0;
  double routing_us = 0;  // route() alone, not part of time_us
  double max_rel_err = 0;
  int64_t err_tokens_checked = 0;
  std::optional<EpRow> ep;

  double tflops() const { return cost.flops / time_us * 1e-6; }
  double gbps() const { return double(cost.weight_bytes) / time_us * 1e-3; }
  double pct_roofline() const { return 100.0 * cost.roofline_us() / time_us; }
  // EP: the slowest rank's time outside dispatch and combine.
  double compute_us() const;
};

struct BenchMachine {
  std::string device;  // CPU model, or the GPU's name
  std::string kind = "cpu";  // "cpu" or "cuda"
  int threads = 0;     // with EP: per rank
  CpuIsa isa = CpuIsa::kScalar;
  MachineCeilings ceilings;  // with EP: rank 0's, measured alone
  int64_t last_level_cache_bytes = 0, flush_bytes = 0;
  std::string flush_method;  // GPU: how L2 is flushed between reps (empty on the CPU)
};

// The EP setting of a sweep, and each rank's ceilings measured while the ranks of each step
// measured at once (ranks on one host share its bandwidth and cores).
struct EpCeilings {
  int ep = 1;
  std::vector<MachineCeilings> ranks;
};
struct BenchEpInfo {
  int world = 1, ranks_per_host = 1, threads_per_rank = 1;
  std::string mode, placement;
  std::vector<EpCeilings> steps;
};

void print_machine(std::ostream& os, const BenchMachine& m);
void print_ep_info(std::ostream& os, const BenchEpInfo& info);
// Columns differ with EP: ep, dispatch_us, combine_us, compute_us and sent_KB replace
// routing_us, GB/s and bound.
void print_table_header(std::ostream& os, bool ep);
void print_table_row(std::ostream& os, const BenchRow& row);
// Per token count: the rows of each EP step against ep = 1 (`rows`: one layer's, every step).
void print_ep_scaling(std::ostream& os, const std::vector<BenchRow>& rows);

// Writes {"command", "date", "moekit_version", "machine", "rows"[, "ep"]} to `path`, rewritten
// after every row so that an interrupted sweep leaves the rows done so far. Writes the file at
// construction, so that a bad path fails before any measurement (throws moekit::Error).
class BenchJsonFile {
 public:
  BenchJsonFile(std::string path, const std::string& command);
  void set_machine(const BenchMachine& machine);
  void set_ep(const BenchEpInfo& info);
  void add(const BenchRow& row);

 private:
  void write() const;
  std::string path_;
  nlohmann::ordered_json doc_;
};

}  // namespace moekit::cli
