#include "bench_report.h"

#include <cmath>
#include <ctime>
#include <fstream>
#include <iomanip>
#include <ostream>
#include <stdexcept>

#include "bench_oracle.h"
#include "build_info.h"

namespace moekit::cli {
namespace {

std::string utc_now(const char* format) {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[32];
  std::strftime(text, sizeof(text), format, &tm);
  return text;
}

// JSON has no NaN or infinity; a broken result is written as null, never as a number.
nlohmann::ordered_json number(double v) {
  return std::isfinite(v) ? nlohmann::ordered_json(v) : nullptr;
}

nlohmann::ordered_json row_json(const BenchRow& r) {
  const LayerSpec& s = *r.spec;
  return {
      {"preset", s.preset},
      {"E", s.num_experts},
      {"H", s.hidden},
      {"I", s.intermediate},
      {"k", s.top_k},
      {"tokens", r.tokens},
      {"format", name(r.dtype)},
      {"device", "cpu"},
      {"ep", 1},
      {"experts_impl", r.experts_impl},
      {"time_us", number(r.time_us)},
      {"tflops", number(r.tflops())},
      {"gbps", number(r.gbps())},
      {"roofline_us", number(r.cost.roofline_us())},
      {"pct_roofline", number(r.pct_roofline())},
      {"max_rel_err", number(r.max_rel_err)},
      // Fields beyond DESIGN.md §7's list.
      {"shape_overridden", s.shape_overridden},
      {"routing", s.router.str()},
      {"activation", s.activation.str()},
      {"has_bias", s.has_bias},
      {"shared_experts", s.num_shared_experts},
      {"bytes_per_weight", element_bytes(r.dtype)},
      {"active_experts", r.cost.active_experts},
      {"weight_bytes", r.cost.weight_bytes},
      {"total_weight_bytes", s.total_weight_bytes(r.dtype)},
      {"flops", r.cost.flops},
      {"bound", r.cost.bound()},
      {"memory_us", number(r.cost.memory_us)},
      {"compute_us", number(r.cost.compute_us)},
      {"time_us_min", number(r.time_min_us)},
      {"time_us_max", number(r.time_max_us)},
      {"reps", r.reps},
      {"timing", "median of reps, caches flushed before each, routing excluded"},
      {"routing_us", number(r.routing_us)},
      {"err_tokens_checked", r.err_tokens_checked},
      {"err_metric", kErrMetric},
      {"date", utc_now("%Y-%m-%d")},
  };
}

}  // namespace

void print_machine(std::ostream& os, const BenchMachine& m) {
  const MachineCeilings& c = m.ceilings;
  os << std::fixed << std::setprecision(1) << "machine: " << m.device << ", " << m.threads
     << " threads, isa " << name(m.isa) << "\nceilings: DRAM read " << c.read_gbps
     << " GB/s, peak bf16 " << c.peak_gflops_bf16 << " GFLOP/s, fp32 " << c.peak_gflops_fp32
     << " GFLOP/s (measured in " << std::setprecision(2) << c.measure_seconds << " s); cache flush "
     << (m.flush_bytes >> 20) << " MiB between reps\n";
}

void print_table_header(std::ostream& os) {
  os << std::left << std::setw(16) << "preset" << std::right << std::setw(6) << "dtype"
     << std::setw(8) << "tokens" << std::setw(8) << "experts" << std::setw(12) << "time_us"
     << std::setw(11) << "routing_us" << std::setw(9) << "TFLOP/s" << std::setw(9) << "GB/s"
     << std::setw(13) << "roofline_us" << std::setw(7) << "%roof" << std::setw(9) << "bound"
     << std::setw(13) << "max_rel_err"
     << "\n";
}

void print_table_row(std::ostream& os, const BenchRow& r) {
  os << std::left << std::setw(16) << r.spec->preset << std::right << std::setw(6) << name(r.dtype)
     << std::setw(8) << r.tokens << std::setw(8) << r.cost.active_experts << std::fixed
     << std::setprecision(1) << std::setw(12) << r.time_us << std::setw(11) << r.routing_us
     << std::setprecision(3) << std::setw(9) << r.tflops() << std::setprecision(1) << std::setw(9)
     << r.gbps() << std::setw(13) << r.cost.roofline_us() << std::setw(7) << r.pct_roofline()
     << std::setw(9) << r.cost.bound() << std::scientific << std::setprecision(2) << std::setw(13)
     << r.max_rel_err << std::defaultfloat << "\n";
}

BenchJsonFile::BenchJsonFile(std::string path, const std::string& command)
    : path_(std::move(path)),
      doc_{{"command", command},
           {"date", utc_now("%Y-%m-%dT%H:%M:%SZ")},
           {"moekit_version", kMoekitVersion},
           {"machine", nlohmann::ordered_json::object()},
           {"rows", nlohmann::ordered_json::array()}} {
  write();
}

void BenchJsonFile::set_machine(const BenchMachine& m) {
  const MachineCeilings& c = m.ceilings;
  doc_["machine"] = {
      {"device", m.device},
      {"threads", m.threads},
      {"read_gbps", c.read_gbps},
      {"peak_tflops", {{"bf16", c.peak_gflops_bf16 * 1e-3}, {"fp32", c.peak_gflops_fp32 * 1e-3}}},
      {"kind", "cpu"},
      {"isa", name(m.isa)},
      {"last_level_cache_bytes", m.last_level_cache_bytes},
      {"flush_bytes", m.flush_bytes},
      {"ceilings_measure_s", c.measure_seconds},
      {"compiler", kCompiler},
  };
  write();
}

void BenchJsonFile::add(const BenchRow& row) {
  doc_["rows"].push_back(row_json(row));
  write();
}

void BenchJsonFile::write() const {
  std::ofstream out(path_, std::ios::trunc);
  out << doc_.dump(2) << "\n";
  if (!out.good()) throw std::runtime_error("--json: cannot write '" + path_ + "'");
}

}  // namespace moekit::cli
