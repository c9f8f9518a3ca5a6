// `moekit bench --ep N`: expert parallelism across the N processes of an MPI job. Each rank
// builds only its own experts' weights and an EP layer over an MPI communicator, and times the
// forward of its own tokens; rank 0 prints and writes the rows. The sweep runs ep = 1, 2, 4, ...
// and N on sub-communicators of the first ranks (the others wait) for a scaling table.
#pragma once

#include <string>

#include "bench_plan.h"

namespace moekit::cli {

int run_ep_bench(const BenchOptions& options, const std::string& command_line);

}  // namespace moekit::cli
