// Results of `moekit bench`: one BenchRow per (layer, token count), printed as a table on
// stdout and written as the JSON of DESIGN.md §7 (a stable interface: never rename its fields).
#pragma once

#include <cstdint>
#include <iosfwd>
#include <nlohmann/json.hpp>
#include <string>

#include "bench_roofline.h"
#include "layer_spec.h"
#include "machine.h"

namespace moekit::cli {

struct BenchRow {
  const LayerSpec* spec = nullptr;
  DType dtype = DType::kBF16;
  int64_t tokens = 0;
  std::string experts_impl;
  RowCost cost;
  double time_us = 0;  // median over reps
  double time_min_us = 0, time_max_us = 0;
  int reps = 0;
  double routing_us = 0;  // route() alone, not part of time_us
  double max_rel_err = 0;
  int64_t err_tokens_checked = 0;

  double tflops() const { return cost.flops / time_us * 1e-6; }
  double gbps() const { return double(cost.weight_bytes) / time_us * 1e-3; }
  double pct_roofline() const { return 100.0 * cost.roofline_us() / time_us; }
};

struct BenchMachine {
  std::string device;  // CPU model
  int threads = 0;
  CpuIsa isa = CpuIsa::kScalar;
  MachineCeilings ceilings;
  int64_t last_level_cache_bytes = 0, flush_bytes = 0;
};

void print_machine(std::ostream& os, const BenchMachine& m);
void print_table_header(std::ostream& os);
void print_table_row(std::ostream& os, const BenchRow& row);

// Writes {"machine", "command", "date", "rows"} to `path`, rewritten after every row so that an
// interrupted sweep leaves the rows done so far. Writes the file at construction, so that a bad
// path fails before any measurement (throws moekit::Error).
class BenchJsonFile {
 public:
  BenchJsonFile(std::string path, const std::string& command);
  void set_machine(const BenchMachine& machine);
  void add(const BenchRow& row);

 private:
  void write() const;
  std::string path_;
  nlohmann::ordered_json doc_;
};

}  // namespace moekit::cli
