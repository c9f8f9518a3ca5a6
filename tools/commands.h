// The subcommands of `moekit`: each registers its options on the app and returns how to run it
// once the command line has been parsed.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace moekit::cli {

struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;  // the process exit code
};

Command add_info_command(CLI::App& app);
// `command_line` is the whole argv, recorded in the JSON so that results can be reproduced.
Command add_bench_command(CLI::App& app, std::string command_line);
Command add_check_command(CLI::App& app);

}  // namespace moekit::cli
