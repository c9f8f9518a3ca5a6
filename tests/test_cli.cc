// End-to-end tests of the `moekit` command: runs the built binary (its path comes from CMake as
// MOEKIT_CLI) and checks its exit codes, messages and bench JSON.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace {

#ifndef MOEKIT_CLI
TEST(Cli, Skipped) {
  GTEST_SKIP() << "the moekit tool is not built (MOEKIT_BUILD_TOOLS=OFF)";
}
#else

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr
};

// Runs `moekit args` (under `launcher` when given, e.g. mpiexec -n 2).
RunResult run_cli(const std::string& args, const std::string& launcher = "") {
  const std::string command =
      (launcher.empty() ? "" : launcher + " ") + std::string(MOEKIT_CLI) + " " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return {};
  RunResult r;
  char buffer[4096];
  for (size_t n; (n = fread(buffer, 1, sizeof(buffer), pipe)) > 0;) r.output.append(buffer, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// A per-process file name, removed when the test ends.
class TempFile {
 public:
  explicit TempFile(const std::string& stem)
      : path_(std::filesystem::temp_directory_path() /
              (stem + "_" + std::to_string(getpid()) + ".json")) {}
  ~TempFile() { std::filesystem::remove(path_); }
  std::string str() const { return path_.string(); }
  nlohmann::json read() const {
    std::ifstream in(path_);
    return nlohmann::json::parse(in);
  }

 private:
  std::filesystem::path path_;
};

void expect_positive(const nlohmann::json& j, const char* key) {
  ASSERT_TRUE(j.contains(key)) << key << " missing in " << j.dump();
  ASSERT_TRUE(j[key].is_number()) << key << " is " << j[key].dump();
  EXPECT_GT(j[key].get<double>(), 0) << key;
}

// Checks the fields DESIGN.md §7 promises, with sane values.
void expect_bench_json(const nlohmann::json& doc, double max_err) {
  const nlohmann::json& m = doc.at("machine");
  EXPECT_FALSE(m.at("device").get<std::string>().empty());
  expect_positive(m, "threads");
  expect_positive(m, "read_gbps");
  expect_positive(m.at("peak_tflops"), "bf16");
  expect_positive(m.at("peak_tflops"), "fp32");
  EXPECT_NE(doc.at("command").get<std::string>().find("bench"), std::string::npos);
  for (const nlohmann::json& row : doc.at("rows")) {
    for (const char* key : {"preset", "format", "device", "experts_impl"})
      EXPECT_FALSE(row.at(key).get<std::string>().empty()) << key;
    for (const char* key : {"E", "H", "I", "k", "tokens", "ep", "time_us", "tflops", "gbps",
                            "roofline_us", "pct_roofline", "err_tokens_checked"})
      expect_positive(row, key);
    ASSERT_TRUE(row.at("max_rel_err").is_number()) << row.dump();
    EXPECT_LT(row["max_rel_err"].get<double>(), max_err) << row.dump();
    EXPECT_GE(row["max_rel_err"].get<double>(), 0);
  }
}

// `moekit bench <args> --json FILE` in one process: its output, and the JSON (checked by
// expect_bench_json at max_err). A failed run is reported and gives a JSON without rows, so that
// the caller's row assertions fail instead of reading a missing file.
struct BenchRun {
  RunResult result;
  nlohmann::json doc;
};
BenchRun run_bench_json(const std::string& args, double max_err) {
  const TempFile json("moekit_test_cli_bench");
  BenchRun run{run_cli("bench " + args + " --json " + json.str()),
               {{"rows", nlohmann::json::array()}}};
  EXPECT_EQ(run.result.exit_code, 0) << run.result.output;
  if (run.result.exit_code != 0) return run;
  run.doc = json.read();
  expect_bench_json(run.doc, max_err);
  return run;
}

TEST(Cli, InfoShowsBuildCpuAndPresets) {
  const RunResult r = run_cli("info");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* text :
       {"moekit ", "x86 kernels", "CUDA", "isa:", "chosen", "qwen3-30b-a3b", "llama4-scout"})
    EXPECT_NE(r.output.find(text), std::string::npos) << text << " not in\n" << r.output;
}

TEST(Cli, EveryCommandHasHelp) {
  for (const char* cmd : {"--help", "info --help", "bench --help", "check --help"}) {
    const RunResult r = run_cli(cmd);
    EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << cmd << "\n" << r.output;
  }
}

TEST(Cli, BenchWritesTheDesignJson) {
  // bf16 output: a few bf16 roundings per value
  const auto [r, doc] =
      run_bench_json("--preset qwen3-30b-a3b -E 8 -H 64 -I 32 -k 2 --tokens 1,7 --reps 2", 0.05);
  EXPECT_NE(r.output.find("[2/2] qwen3-30b-a3b tokens=7"), std::string::npos) << r.output;
  ASSERT_EQ(doc["rows"].size(), 2u);
  const nlohmann::json& row = doc["rows"][1];
  EXPECT_EQ(row["preset"], "qwen3-30b-a3b");
  EXPECT_EQ(row["E"], 8);
  EXPECT_EQ(row["H"], 64);
  EXPECT_EQ(row["I"], 32);
  EXPECT_EQ(row["k"], 2);
  EXPECT_EQ(row["tokens"], 7);
  EXPECT_EQ(row["format"], "bf16");
  EXPECT_LE(row["active_experts"].get<int>(), 8);
}

// Shared experts, biases with the interleaved SwiGLU-OAI and weight-on-input routing all pass
// through the bench's own oracle check; fp32 leaves only summation-order differences.
TEST(Cli, BenchOracleCoversEveryPresetFeature) {
  const nlohmann::json doc = run_bench_json(
                                 "--preset deepseek-v3,gpt-oss-20b,llama4-scout -E 16 -H 48 -I 24 "
                                 "--tokens 5 --format fp32 --reps 1",
                                 1e-3)
                                 .doc;
  ASSERT_EQ(doc["rows"].size(), 3u);
  EXPECT_EQ(doc["rows"][0]["shared_experts"], 1);
  EXPECT_EQ(doc["rows"][1]["has_bias"], true);
  EXPECT_EQ(doc["rows"][2]["k"], 1);
}

// A quantized format: the JSON names it, the roofline counts its bytes (int4 codes plus a bf16
// scale per 64 weights: 0.53 bytes a weight), and the oracle check passes at the format's error.
TEST(Cli, BenchRunsAQuantizedFormat) {
  // The oracle dequantizes the same int4 weights.
  const nlohmann::json doc =
      run_bench_json("-E 8 -H 256 -I 128 -k 2 --tokens 1,9 --format w4a16:g64 --reps 1", 0.05).doc;
  ASSERT_EQ(doc["rows"].size(), 2u);
  EXPECT_EQ(doc["rows"][0]["format"], "w4a16:g64");
  EXPECT_NEAR(doc["rows"][0]["bytes_per_weight"].get<double>(), 0.5 + 2.0 / 64, 1e-6);
}

// A list of formats: one layer each, every row of every format on the same routing (so the same
// active experts), rows in the order tokens x formats, each format checked against the oracle.
TEST(Cli, BenchRunsAListOfFormatsSideBySide) {
  const nlohmann::json doc =
      run_bench_json(
          "-E 8 -H 256 -I 128 -k 2 --tokens 1,9 --format bf16,w4a16:g64,fp8-token --reps 2", 0.05)
          .doc;
  const char* const formats[] = {"bf16", "w4a16:g64", "fp8-token"};
  ASSERT_EQ(doc["rows"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    const nlohmann::json& row = doc["rows"][i];
    EXPECT_EQ(row["format"], formats[i % 3]) << i;
    EXPECT_EQ(row["tokens"], i < 3 ? 1 : 9) << i;
    EXPECT_EQ(row["reps"], 2) << i;
    EXPECT_EQ(row["active_experts"], doc["rows"][i / 3 * 3]["active_experts"]) << i;
  }
}

TEST(Cli, CheckPassesOnATinyShape) {
  const RunResult r = run_cli("check --device cpu -E 8 -H 33 -I 17 -k 2 --tokens 1,7 --ranks 1,2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(" passed, 0 failed\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS "), std::string::npos) << r.output;
}

TEST(Cli, CheckRunsQuantizedFormats) {
  const RunResult r = run_cli(
      "check -E 8 -H 34 -I 18 -k 2 --tokens 1,7 --ranks 1,2 --placement linear "
      "--format fp8-token,w4a16:g32:zp");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("fp8-token"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("w4a16:g32:zp"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find(" passed, 0 failed"), std::string::npos) << r.output;
}

TEST(Cli, BadArgumentsFailWithAMessage) {
  const std::string shape = " -E 8 -H 64 -I 32 -k 2";
  const struct {
    std::string args, message;
  } cases[] = {
      {"bench --preset no-such-model", "qwen3-30b-a3b"},  // lists the known presets
      {"bench --tokens 0" + shape, "--tokens"},
      {"bench --tokens 1,,2" + shape, "--tokens"},
      {"bench --tokens abc" + shape, "--tokens"},
      {"bench -E 8 -H 64 -I 32 -k 9", "9"},
      {"bench --format int9" + shape, "--format"},
      {"bench --format bf16,int9" + shape, "int9"},
      {"bench --ep 2 --format bf16,w4a16" + shape, "one format at a time with --ep"},
      {"bench --isa sse9" + shape, "--isa"},
      {"bench -E 8 -H 64", "-k"},  // an incomplete explicit shape
      {"check --preset no-such-model", "qwen3-30b-a3b"},
      {"check --format w4a16:g48" + shape, "group"},
      {"frobnicate", "frobnicate"},
  };
  for (const auto& c : cases) {
    const RunResult r = run_cli(c.args);
    EXPECT_NE(r.exit_code, 0) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.message), std::string::npos)
        << c.args << ": expected '" << c.message << "' in\n"
        << r.output;
  }
}

// --ep needs one process per rank, started by mpiexec: anything else is refused up front.
TEST(Cli, EpWithoutMpiexecFailsWithTheCommandToRun) {
  for (const char* args : {"bench --ep 2 -E 8 -H 64 -I 32 -k 2", "check --ep 2"}) {
    const RunResult r = run_cli(args);
    EXPECT_NE(r.exit_code, 0) << args << "\n" << r.output;
#ifdef MOEKIT_MPIEXEC
    EXPECT_NE(r.output.find("--ep: 2 needs one process per rank, started by mpiexec"),
              std::string::npos)
        << args << "\n"
        << r.output;
    EXPECT_NE(r.output.find("mpiexec -n 2 moekit"), std::string::npos) << r.output;
#else
    EXPECT_NE(r.output.find("built without MPI"), std::string::npos) << r.output;
#endif
  }
  // The EP options mean nothing without --ep.
  const RunResult r = run_cli("bench --ep-mode naive -E 8 -H 64 -I 32 -k 2");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--ep-mode requires --ep"), std::string::npos) << r.output;
}

#ifdef MOEKIT_MPIEXEC
const std::string kTwoRanks = std::string(MOEKIT_MPIEXEC) + " -n 2";

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(CliMpi, CheckAcrossTwoRanks) {
  const RunResult r = run_cli(
      "check --ep 2 -E 8 -H 33 -I 17 -k 2 --tokens 1,7 --impl reference,fallback", kTwoRanks);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // Rank 0 alone prints the cases and the total over both ranks; 24 cases, each on 2 ranks.
  EXPECT_EQ(count(r.output, "contract suite:"), 1u) << r.output;
  EXPECT_NE(r.output.find("over 2 MPI ranks"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS fallback/all_to_all/linear x2/"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS reference/low_latency/round_robin x2/"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("\n48 passed, 0 failed"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("FAIL"), std::string::npos) << r.output;
}

TEST(CliMpi, EpMustEqualTheNumberOfProcesses) {
  const RunResult r = run_cli("check --ep 3 -E 6 -H 33 -I 17 -k 2", kTwoRanks);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--ep: 3 but mpiexec started 2 processes"), std::string::npos)
      << r.output;
}

TEST(CliMpi, BenchAcrossTwoRanksWritesEveryStep) {
  const TempFile json("moekit_test_cli_ep");
  const RunResult r = run_cli(
      "bench --ep 2 -E 8 -H 64 -I 32 -k 2 --tokens 1,7 --reps 2 --json " + json.str(), kTwoRanks);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count(r.output, "EP scaling of custom"), 1u) << r.output;  // rank 0 alone prints
  EXPECT_NE(r.output.find("[4/4] custom ep=2 tokens=7"), std::string::npos) << r.output;
  const nlohmann::json doc = json.read();
  expect_bench_json(doc, 0.05);
  EXPECT_EQ(doc.at("ep").at("world"), 2);
  EXPECT_EQ(doc["ep"].at("ceilings").size(), 2u);  // measured at ep = 1 and 2
  // ep = 1 and 2, tokens 1 and 7 per rank.
  ASSERT_EQ(doc["rows"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    const nlohmann::json& row = doc["rows"][i];
    const int ep = i < 2 ? 1 : 2;
    EXPECT_EQ(row["ep"], ep) << row.dump();
    EXPECT_EQ(row["tokens"], i % 2 ? 7 : 1) << row.dump();
    EXPECT_EQ(row["ep_mode"], "all_to_all");
    EXPECT_EQ(row["placement"], "linear");
    EXPECT_EQ(row["tokens_total"], row["tokens"].get<int>() * ep);
    for (const char* key : {"dispatch_us", "combine_us", "compute_us"}) expect_positive(row, key);
    EXPECT_NEAR(row["dispatch_us"].get<double>() + row["combine_us"].get<double>() +
                    row["compute_us"].get<double>(),
                row["time_us"].get<double>(), 1e-6 * row["time_us"].get<double>());
    ASSERT_TRUE(row.at("bytes_sent").is_number_integer()) << row.dump();
    // One rank sends to itself only (nothing counted); two ranks exchange tokens and results.
    if (ep == 2) EXPECT_GT(row["bytes_sent"].get<int64_t>(), 0) << row.dump();
    EXPECT_EQ(row.at("time_us_per_rank").size(), size_t(ep));
    EXPECT_EQ(row["err_tokens_checked"], std::min(4, row["tokens"].get<int>()) * ep);
  }
}
#endif

#endif

}  // namespace
