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

RunResult run_cli(const std::string& args) {
  const std::string command = std::string(MOEKIT_CLI) + " " + args + " 2>&1";
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
  const TempFile json("moekit_test_cli_bench");
  const RunResult r =
      run_cli("bench --preset qwen3-30b-a3b -E 8 -H 64 -I 32 -k 2 --tokens 1,7 --reps 2 --json " +
              json.str());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("[2/2] qwen3-30b-a3b tokens=7"), std::string::npos) << r.output;
  const nlohmann::json doc = json.read();
  expect_bench_json(doc, 0.05);  // bf16 output: a few bf16 roundings per value
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
  const TempFile json("moekit_test_cli_features");
  const RunResult r = run_cli(
      "bench --preset deepseek-v3,gpt-oss-20b,llama4-scout -E 16 -H 48 -I 24 --tokens 5 "
      "--dtype fp32 --reps 1 --json " +
      json.str());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json doc = json.read();
  expect_bench_json(doc, 1e-3);
  ASSERT_EQ(doc["rows"].size(), 3u);
  EXPECT_EQ(doc["rows"][0]["shared_experts"], 1);
  EXPECT_EQ(doc["rows"][1]["has_bias"], true);
  EXPECT_EQ(doc["rows"][2]["k"], 1);
}

TEST(Cli, CheckPassesOnATinyShape) {
  const RunResult r = run_cli("check -E 8 -H 33 -I 17 -k 2 --tokens 1,7 --ranks 1,2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(" passed, 0 failed\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("PASS "), std::string::npos) << r.output;
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
      {"bench --dtype int8" + shape, "--dtype"},
      {"bench --isa sse9" + shape, "--isa"},
      {"bench -E 8 -H 64", "-k"},  // an incomplete explicit shape
      {"check --preset no-such-model", "qwen3-30b-a3b"},
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

#endif

}  // namespace
