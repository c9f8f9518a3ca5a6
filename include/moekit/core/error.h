// One exception type at the C++ boundary, carrying file:line and a message.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace moekit {

class Error : public std::runtime_error {
 public:
  Error(const char* file, int line, const std::string& message);
  const std::string& message() const { return message_; }
  const char* file() const { return file_; }
  int line() const { return line_; }

 private:
  std::string message_;
  const char* file_;
  int line_;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace moekit

// MOEKIT_CHECK(cond, "part: ", detail...) throws moekit::Error naming file:line when cond is false.
#define MOEKIT_CHECK(cond, ...)                                                              \
  do {                                                                                       \
    if (!(cond)) [[unlikely]]                                                                \
      throw ::moekit::Error(__FILE__, __LINE__, ::moekit::detail::concat(__VA_ARGS__));      \
  } while (0)

#define MOEKIT_FAIL(...) throw ::moekit::Error(__FILE__, __LINE__, ::moekit::detail::concat(__VA_ARGS__))
