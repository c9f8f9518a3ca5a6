// moekit: benchmark, check and describe the MoE layers of this library from the command line.
#include <iostream>

#include "commands.h"

namespace {

// argv joined with spaces, single-quoting (for a POSIX shell) the arguments it would split,
// expand or drop.
std::string join_argv(int argc, char** argv) {
  std::string line;
  for (int i = 0; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i) line += ' ';
    if (!arg.empty() && arg.find_first_of(" \t\n\"'$`\\*?") == std::string::npos) {
      line += arg;
      continue;
    }
    line += '\'';
    for (char c : arg) line += c == '\'' ? std::string("'\\''") : std::string(1, c);
    line += '\'';
  }
  return line;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moekit: benchmark, check and describe Mixture-of-Experts layers"};
  // At most one command; with none, the help (a stray word is then reported as unexpected).
  app.require_subcommand(0, 1);
  using namespace moekit::cli;
  const Command commands[] = {add_info_command(app), add_bench_command(app, join_argv(argc, argv)),
                              add_check_command(app)};
  try {
    app.parse(argc, argv);
    for (const Command& c : commands)
      if (c.app->parsed()) return c.run();
    std::cerr << app.help();
    return 2;
  } catch (const CLI::ParseError& e) {
    // Also the CLI::ValidationErrors the commands throw for values that only make sense together.
    return app.exit(e);
  } catch (const std::exception& e) {  // moekit::Error names the library's file:line
    std::cerr << "moekit: error: " << e.what() << "\n";
  }
  return 1;
}
