#include "bench_report.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <fstream>
#include <functional>
#include <iomanip>
#include <ostream>
#include <sstream>
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

template <typename Get>
nlohmann::ordered_json per_rank(const EpRow& ep, Get get) {
  nlohmann::ordered_json values = nlohmann::ordered_json::array();
  for (const EpRankResult& r : ep.ranks) values.push_back(get(r));
  return values;
}

// The fields of an EP row beyond those of every row.
void add_ep_fields(const BenchRow& r, nlohmann::ordered_json& j) {
  const EpRow& ep = *r.ep;
  const CommPerForward& comm = ep.comm();
  j["ep_mode"] = ep.mode;
  j["placement"] = ep.placement;
  j["tokens_total"] = r.tokens * ep.ep;
  j["dispatch_us"] = number(comm.dispatch_us);
  j["combine_us"] = number(comm.combine_us);
  j["compute_us"] = number(r.compute_us());
  j["bytes_sent"] = ep.max_bytes_sent();
  j["rounds"] = comm.rounds;
  j["slowest_rank"] = ep.slowest_rank();
  j["roofline_rank"] = ep.roofline_rank();
  j["time_us_per_rank"] = per_rank(ep, [](const EpRankResult& x) { return number(x.time_us); });
  j["dispatch_us_per_rank"] =
      per_rank(ep, [](const EpRankResult& x) { return number(x.comm.dispatch_us); });
  j["combine_us_per_rank"] =
      per_rank(ep, [](const EpRankResult& x) { return number(x.comm.combine_us); });
  j["bytes_sent_per_rank"] =
      per_rank(ep, [](const EpRankResult& x) { return x.comm.bytes_sent(); });
  j["roofline_us_per_rank"] =
      per_rank(ep, [](const EpRankResult& x) { return number(x.cost.roofline_us()); });
  j["read_gbps_per_rank"] = per_rank(ep, [](const EpRankResult& x) { return number(x.read_gbps); });
  j["max_rel_err_per_rank"] =
      per_rank(ep, [](const EpRankResult& x) { return number(x.max_rel_err); });
}

nlohmann::ordered_json row_json(const BenchRow& r) {
  const LayerSpec& s = *r.spec;
  nlohmann::ordered_json j = {
      {"preset", s.preset},
      {"E", s.num_experts},
      {"H", s.hidden},
      {"I", s.intermediate},
      {"k", s.top_k},
      {"tokens", r.tokens},
      {"format", r.format.str()},
      {"device", r.device},
      {"ep", r.ep ? r.ep->ep : 1},
      {"experts_impl", r.experts_impl},
      {"time_us", number(r.time_us)},
      {"tflops", number(r.tflops())},
      {"gbps", number(r.gbps())},
      {"roofline_us", number(r.cost.roofline_us())},
      {"pct_roofline", number(r.pct_roofline())},
      {"max_rel_err", number(r.max_rel_err)},
      // Fields beyond DESIGN.md §7's list.
      {"shape_overridden", s.shape_overridden},
      {"cuda_graph", r.graph},
      {"routing", s.router.str()},
      {"activation", s.activation.str()},
      {"has_bias", s.has_bias},
      {"shared_experts", s.num_shared_experts},
      {"bytes_per_weight", number(double(s.expert_bytes(r.format)) / double(s.expert_elements()))},
      {"active_experts", r.cost.active_experts},
      {"weight_bytes", r.cost.weight_bytes},
      {"total_weight_bytes", s.total_weight_bytes(r.format)},
      {"flops", r.cost.flops},
      {"bound", r.cost.bound()},
      // The roofline's two terms ("compute_us" of an EP row is measured, see add_ep_fields).
      {"roofline_memory_us", number(r.cost.memory_us)},
      {"roofline_compute_us", number(r.cost.compute_us)},
      {"time_us_min", number(r.time_min_us)},
      {"time_us_max", number(r.time_max_us)},
      {"reps", r.reps},
      {"timing", r.ep ? "median of reps, ranks barrier and flush caches before each, routing "
                        "excluded; max over ranks"
                      : "median of reps, caches flushed before each, routing excluded"},
      {"routing_us", number(r.routing_us)},
      {"err_tokens_checked", r.err_tokens_checked},
      {"err_metric", kErrMetric},
      {"date", utc_now("%Y-%m-%d")},
  };
  if (r.ep) add_ep_fields(r, j);
  return j;
}

// ---- the table ----

struct Column {
  const char* name;
  int width;  // negative: left-aligned
  std::function<void(std::ostream&, const BenchRow&)> cell;
};

template <typename Get>
Column fixed(const char* name, int width, int precision, Get get) {
  return {name, width, [precision, get](std::ostream& os, const BenchRow& r) {
            os << std::fixed << std::setprecision(precision) << get(r);
          }};
}
template <typename Get>
Column plain(const char* name, int width, Get get) {
  return {name, width, [get](std::ostream& os, const BenchRow& r) { os << get(r); }};
}

std::pair<std::vector<Column>, std::vector<Column>> make_columns() {
  const Column preset = plain("preset", -16, [](const BenchRow& r) { return r.spec->preset; });
  const Column format = plain("format", 11, [](const BenchRow& r) { return r.format.str(); });
  const Column tokens = plain("tokens", 8, [](const BenchRow& r) { return r.tokens; });
  const Column experts =
      plain("experts", 8, [](const BenchRow& r) { return r.cost.active_experts; });
  const Column time = fixed("time_us", 12, 1, [](const BenchRow& r) { return r.time_us; });
  const Column tflops = fixed("TFLOP/s", 9, 3, [](const BenchRow& r) { return r.tflops(); });
  const Column roofline =
      fixed("roofline_us", 13, 1, [](const BenchRow& r) { return r.cost.roofline_us(); });
  const Column pct = fixed("%roof", 7, 1, [](const BenchRow& r) { return r.pct_roofline(); });
  const Column err = {"max_rel_err", 13, [](std::ostream& os, const BenchRow& r) {
                        os << std::scientific << std::setprecision(2) << r.max_rel_err;
                      }};
  std::vector<Column> single = {
      preset,
      format,
      tokens,
      experts,
      time,
      fixed("routing_us", 11, 1, [](const BenchRow& r) { return r.routing_us; }),
      tflops,
      fixed("GB/s", 9, 1, [](const BenchRow& r) { return r.gbps(); }),
      roofline,
      pct,
      plain("bound", 9, [](const BenchRow& r) { return r.cost.bound(); }),
      err};
  std::vector<Column> with_ep = {
      preset,
      format,
      plain("ep", 4, [](const BenchRow& r) { return r.ep->ep; }),
      tokens,
      experts,
      time,
      fixed("dispatch_us", 12, 1, [](const BenchRow& r) { return r.ep->comm().dispatch_us; }),
      fixed("combine_us", 11, 1, [](const BenchRow& r) { return r.ep->comm().combine_us; }),
      fixed("compute_us", 11, 1, [](const BenchRow& r) { return r.compute_us(); }),
      fixed("sent_KB", 10, 1, [](const BenchRow& r) { return r.ep->max_bytes_sent() * 1e-3; }),
      tflops,
      roofline,
      pct,
      err};
  return {std::move(single), std::move(with_ep)};
}

const std::vector<Column>& columns(bool ep) {
  static const auto tables = make_columns();
  return ep ? tables.second : tables.first;
}

void print_cell(std::ostream& os, int width, const std::function<void(std::ostream&)>& cell) {
  os << (width < 0 ? std::left : std::right) << std::setw(std::abs(width));
  cell(os);
  os << std::defaultfloat;
}

// One value of each rank's ceilings, as "a, b, c".
template <typename Get>
std::string list(const std::vector<MachineCeilings>& ranks, Get get) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(1);
  for (size_t r = 0; r < ranks.size(); ++r) os << (r ? ", " : "") << get(ranks[r]);
  return os.str();
}

}  // namespace

int EpRow::slowest_rank() const {
  return int(std::max_element(ranks.begin(), ranks.end(),
                              [](const EpRankResult& a, const EpRankResult& b) {
                                return a.time_us < b.time_us;
                              }) -
             ranks.begin());
}

int EpRow::roofline_rank() const {
  return int(std::max_element(ranks.begin(), ranks.end(),
                              [](const EpRankResult& a, const EpRankResult& b) {
                                return a.cost.roofline_us() < b.cost.roofline_us();
                              }) -
             ranks.begin());
}

int64_t EpRow::max_bytes_sent() const {
  int64_t m = 0;
  for (const EpRankResult& r : ranks) m = std::max(m, r.comm.bytes_sent());
  return m;
}

double BenchRow::compute_us() const {
  return ep ? time_us - ep->comm().dispatch_us - ep->comm().combine_us : time_us;
}

void print_machine(std::ostream& os, const BenchMachine& m) {
  const MachineCeilings& c = m.ceilings;
  const bool gpu = m.kind == "cuda";
  os << std::fixed << std::setprecision(1) << "machine: " << m.device;
  if (!gpu) os << ", " << m.threads << " threads, isa " << name(m.isa);
  os << "\nceilings: " << (gpu ? "device copy (read + write) " : "DRAM read ") << c.read_gbps
     << " GB/s, peak bf16 " << c.peak_gflops_bf16 << " GFLOP/s, fp32 " << c.peak_gflops_fp32
     << " GFLOP/s, int8 " << c.peak_gops_int8 << " GOP/s, fp8 " << c.peak_gflops_fp8
     << " GFLOP/s (measured in " << std::setprecision(2) << c.measure_seconds << " s); cache flush "
     << (m.flush_bytes >> 20) << " MiB between reps"
     << (m.flush_method.empty() ? "" : " (" + m.flush_method + ")") << "\n"
     << std::defaultfloat;
}

void print_ep_info(std::ostream& os, const BenchEpInfo& info) {
  os << "expert parallelism: " << info.world << " MPI ranks (" << info.ranks_per_host
     << " on this host), " << info.threads_per_rank
     << (info.threads_per_rank == 1 ? " thread" : " threads") << " each, " << info.mode
     << " dispatch, " << info.placement
     << " placement; a shared expert is replicated on every rank\n"
     << "ceilings per rank at each ep, measured by its ranks at once (ranks on one host share "
        "its bandwidth and cores; the roofline assumes they do so while they run):\n";
  for (const EpCeilings& step : info.steps)
    os << "  ep=" << step.ep << ": DRAM read GB/s "
       << list(step.ranks, [](const MachineCeilings& c) { return c.read_gbps; })
       << "; peak bf16 GFLOP/s "
       << list(step.ranks, [](const MachineCeilings& c) { return c.peak_gflops_bf16; }) << "\n";
}

void print_table_header(std::ostream& os, bool ep) {
  for (const Column& c : columns(ep))
    print_cell(os, c.width, [&](std::ostream& o) { o << c.name; });
  os << "\n";
}

void print_table_row(std::ostream& os, const BenchRow& row) {
  for (const Column& c : columns(row.ep.has_value()))
    print_cell(os, c.width, [&](std::ostream& o) { c.cell(o, row); });
  os << "\n";
}

void print_ep_scaling(std::ostream& os, const std::vector<BenchRow>& rows) {
  if (rows.empty()) return;
  const EpRow& first = *rows.front().ep;
  os << "EP scaling of " << rows.front().spec->preset << " (" << first.mode << ", "
     << first.placement << "; tokens per rank fixed: ep=n runs n times the tokens of ep=1)\n"
     << std::right << std::setw(8) << "tokens" << std::setw(5) << "ep" << std::setw(12) << "time_us"
     << std::setw(9) << "speedup" << std::setw(10) << "dispatch" << std::setw(9) << "combine"
     << std::setw(12) << "compute_us"
     << "\n";
  std::vector<int64_t> done;
  for (const BenchRow& base : rows) {
    if (std::find(done.begin(), done.end(), base.tokens) != done.end()) continue;
    done.push_back(base.tokens);
    for (const BenchRow& r : rows) {
      if (r.tokens != base.tokens) continue;
      const CommPerForward& comm = r.ep->comm();
      os << std::setw(8) << r.tokens << std::setw(5) << r.ep->ep << std::fixed
         << std::setprecision(1) << std::setw(12) << r.time_us << std::setprecision(2)
         << std::setw(9) << base.time_us / r.time_us << std::setprecision(1) << std::setw(9)
         << 100 * comm.dispatch_us / r.time_us << "%" << std::setw(8)
         << 100 * comm.combine_us / r.time_us << "%" << std::setw(12) << r.compute_us()
         << std::defaultfloat << "\n";
    }
  }
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
      {"peak_tflops",
       {{"bf16", c.peak_gflops_bf16 * 1e-3},
        {"fp32", c.peak_gflops_fp32 * 1e-3},
        {"int8", c.peak_gops_int8 * 1e-3},  // tera-ops of int8 dot products
        {"fp8", c.peak_gflops_fp8 * 1e-3}}},
      {"kind", m.kind},
      {"isa", name(m.isa)},
      {"last_level_cache_bytes", m.last_level_cache_bytes},
      {"flush_bytes", m.flush_bytes},
      {"ceilings_measure_s", c.measure_seconds},
      {"compiler", kCompiler},
  };
  if (!m.flush_method.empty()) doc_["machine"]["l2_flush"] = m.flush_method;
  write();
}

void BenchJsonFile::set_ep(const BenchEpInfo& info) {
  nlohmann::ordered_json steps = nlohmann::ordered_json::array();
  for (const EpCeilings& step : info.steps) {
    nlohmann::ordered_json read = nlohmann::ordered_json::array(),
                           bf16 = nlohmann::ordered_json::array(),
                           fp32 = nlohmann::ordered_json::array();
    for (const MachineCeilings& c : step.ranks) {
      read.push_back(c.read_gbps);
      bf16.push_back(c.peak_gflops_bf16 * 1e-3);
      fp32.push_back(c.peak_gflops_fp32 * 1e-3);
    }
    steps.push_back({{"ep", step.ep},
                     {"read_gbps_per_rank", read},
                     {"peak_tflops_bf16_per_rank", bf16},
                     {"peak_tflops_fp32_per_rank", fp32}});
  }
  doc_["ep"] = {
      {"world", info.world},
      {"ranks_per_host", info.ranks_per_host},
      {"threads_per_rank", info.threads_per_rank},
      {"ep_mode", info.mode},
      {"placement", info.placement},
      {"shared_experts", "replicated on every rank, run on its own tokens"},
      {"ceilings_assumption",
       "at each ep its ranks measured their ceilings at once, so each has its share of a shared "
       "host's bandwidth and cores; machine.read_gbps is rank 0's alone (ep=1)"},
      {"ceilings", steps},
      {"row_fields",
       {
           {"tokens", "per rank, every rank the same count of its own random tokens"},
           {"time_us",
            "the slowest rank's median; dispatch_us, combine_us and compute_us (= time_us - "
            "dispatch_us - combine_us) are that rank's medians"},
           {"bytes_sent", "max over ranks of one rank's dispatch + combine bytes per forward"},
           {"roofline_us",
            "max over ranks of that rank's active local experts' (and shared expert's) weight "
            "bytes / its read_gbps, or its flops / its peak; assumes the ranks of this ep share "
            "the host's bandwidth and cores as they did when they measured their ceilings at "
            "once"},
           {"tflops_gbps", "work of all ranks / time_us"},
           {"max_rel_err", "max over ranks, each checking its own sampled tokens"},
       }},
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
