// Option checks shared by the subcommands, with messages that state the rule
// ("-E: must be a positive whole number, got 0") and name the option.
#pragma once

#include <CLI/CLI.hpp>
#include <charconv>
#include <map>
#include <string>

#include "moekit/core/error.h"

namespace moekit::cli {

// A whole number >= min (CLI11's own PositiveNumber prints its range as a 300-digit double).
inline CLI::Validator at_least(long long min, const std::string& rule, const std::string& tag) {
  return CLI::Validator(
      [min, rule](std::string& text) -> std::string {
        long long v = 0;
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
        if (ec != std::errc() || end != text.data() + text.size() || v < min)
          return "must be " + rule + ", got '" + text + "'";
        return {};
      },
      tag);
}
inline CLI::Validator positive() {
  return at_least(1, "a positive whole number", "POSITIVE");
}
inline CLI::Validator non_negative() {
  return at_least(0, "a whole number >= 0", "NONNEGATIVE");
}

// Maps the names of `choices` to their enum values; shown in the help as TEXT:{name,...}.
template <typename Enum>
CLI::Validator one_of(const std::map<std::string, Enum>& choices) {
  std::string names;
  for (const auto& choice : choices) names += (names.empty() ? "" : ", ") + choice.first;
  return CLI::Validator(
      [choices, names](std::string& text) -> std::string {
        const auto it = choices.find(text);
        if (it == choices.end()) return "must be one of " + names + ", got '" + text + "'";
        text = std::to_string(static_cast<int>(it->second));  // CLI11 reads enums as integers
        return {};
      },
      "{" + names + "}");
}

// Runs a library parser (they throw moekit::Error naming the bad value and the valid ones) and
// reports its failure as a CLI::ValidationError of `option`.
template <typename Parse>
auto parse_option(const std::string& option, Parse&& parse) {
  try {
    return parse();
  } catch (const moekit::Error& e) {
    throw CLI::ValidationError(option, e.message());
  }
}

}  // namespace moekit::cli
