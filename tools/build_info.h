// How this binary was built, for `moekit info` and the machine block of bench JSON.
#pragma once

#include <string_view>

namespace moekit::cli {

inline constexpr std::string_view kMoekitVersion = MOEKIT_VERSION;  // the CMake project version
#if defined(__clang__)
inline constexpr std::string_view kCompiler = "clang " __clang_version__;
#elif defined(__GNUC__)
inline constexpr std::string_view kCompiler = "GCC " __VERSION__;
#else
inline constexpr std::string_view kCompiler = "unknown compiler";
#endif
// CMakeLists.txt compiles the x86 micro-kernel families exactly when it targets x86-64.
#if defined(__x86_64__)
inline constexpr bool kX86Kernels = true;
#else
inline constexpr bool kX86Kernels = false;
#endif
// moekit defines MOEKIT_HAS_CUDA for its users when built with the CUDA backend.
#if defined(MOEKIT_HAS_CUDA)
inline constexpr bool kCudaBackend = true;
#else
inline constexpr bool kCudaBackend = false;
#endif

}  // namespace moekit::cli
