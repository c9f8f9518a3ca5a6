#include "moekit/core/error.h"

#include <cstring>

namespace moekit {

namespace {
// "src/modular/kernel.cc" rather than the build machine's absolute path.
const char* short_path(const char* file) {
  const char* p = std::strstr(file, "/src/");
  if (!p) p = std::strstr(file, "/include/");
  if (!p) p = std::strstr(file, "/tools/");
  return p ? p + 1 : file;
}
}  // namespace

Error::Error(const char* file, int line, const std::string& message)
    : std::runtime_error(std::string(short_path(file)) + ":" + std::to_string(line) + ": " +
                         message),
      message_(message),
      file_(short_path(file)),
      line_(line) {}

}  // namespace moekit
