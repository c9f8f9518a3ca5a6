// The MPI job of a `--ep N` command: one process per expert-parallel rank, started by mpiexec,
// and the EP parts (prepare/finalize mode, placement) a command line can name.
#pragma once

#include <CLI/CLI.hpp>
#include <map>
#include <memory>
#include <string>
#include <string_view>

#include "moekit/dist/ep.h"

namespace moekit::cli {

enum class EpMode { kAllToAll, kNaive, kLowLatency };
enum class EpPlacement { kLinear, kRoundRobin };
std::string_view name(EpMode mode);
std::string_view name(EpPlacement placement);
// Command-line names to values, for CLI::CheckedTransformer.
const std::map<std::string, EpMode>& ep_modes();
const std::map<std::string, EpPlacement>& ep_placements();

// Registers --ep on `cmd` (0: no expert parallelism); `what` says what the ranks do.
CLI::Option* add_ep_option(CLI::App& cmd, int& ep, const std::string& what);

struct EpJob {
  std::shared_ptr<Communicator> world;  // every process of the job
  int ranks_on_host = 1;                // ranks sharing this machine's cores, memory and bandwidth

  int rank() const { return world->rank(); }
  int size() const { return world->size(); }
  bool leader() const { return world->rank() == 0; }
  // `requested` threads, or (0) this host's hardware threads split evenly among its ranks, so
  // that ranks do not oversubscribe the cores they share.
  int threads(int requested) const;
};

// Joins the MPI job that `--ep ep` of `moekit <command>` runs in. Throws CLI::ValidationError
// naming --ep, with the command line to use, when this process was not started by mpiexec, this
// build has no MPI, or the job has another number of processes than `ep`.
EpJob join_ep_job(int ep, std::string_view command);

// The distributed prepare/finalize of `mode` for this communicator's rank. max_tokens: the most
// rows a rank passes to one forward (low_latency sizes its receive buffers for it).
std::shared_ptr<DistributedPrepareFinalize> make_ep_prepare_finalize(
    EpMode mode, std::shared_ptr<Communicator> comm, ExpertMap map, int64_t max_tokens);
ExpertMap make_ep_placement(EpPlacement placement, int num_experts, int ranks);

}  // namespace moekit::cli
