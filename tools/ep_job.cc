#include "ep_job.h"

#include <unistd.h>

#include <algorithm>
#include <functional>

#include "machine.h"
#include "option_checks.h"

namespace moekit::cli {

std::string_view name(EpMode mode) {
  switch (mode) {
    case EpMode::kAllToAll:
      return "all_to_all";
    case EpMode::kNaive:
      return "naive";
    case EpMode::kLowLatency:
      return "low_latency";
  }
  return "?";
}

std::string_view name(EpPlacement placement) {
  return placement == EpPlacement::kLinear ? "linear" : "round_robin";
}

const std::map<std::string, EpMode>& ep_modes() {
  static const std::map<std::string, EpMode> modes = {{"all_to_all", EpMode::kAllToAll},
                                                      {"naive", EpMode::kNaive},
                                                      {"low_latency", EpMode::kLowLatency}};
  return modes;
}

const std::map<std::string, EpPlacement>& ep_placements() {
  static const std::map<std::string, EpPlacement> placements = {
      {"linear", EpPlacement::kLinear}, {"round_robin", EpPlacement::kRoundRobin}};
  return placements;
}

CLI::Option* add_ep_option(CLI::App& cmd, int& ep, const std::string& what) {
  return cmd
      .add_option("--ep", ep,
                  "expert parallelism over N MPI ranks, started as `mpiexec -n N moekit " +
                      cmd.get_name() + " --ep N ...`: " + what)
      ->check(positive());
}

int EpJob::threads(int requested) const {
  return requested > 0 ? requested : std::max(1, resolve_threads(0) / ranks_on_host);
}

EpJob join_ep_job(int ep, std::string_view command) {
  const std::string usage = "run it as `mpiexec -n " + std::to_string(ep) + " moekit " +
                            std::string(command) + " --ep " + std::to_string(ep) + " ...`";
  if (!mpi_available())
    throw CLI::ValidationError("--ep",
                               "this moekit was built without MPI (MOEKIT_MPI=OFF or no "
                               "MPI found), so it cannot run expert parallelism");
  // Checked before MPI starts: a process started without mpiexec would become a job of one.
  if (!launched_by_mpi())
    throw CLI::ValidationError(
        "--ep", std::to_string(ep) + " needs one process per rank, started by mpiexec; " + usage);
  EpJob job{make_mpi_communicator()};
  if (job.size() != ep)
    throw CLI::ValidationError("--ep", std::to_string(ep) + " but mpiexec started " +
                                           std::to_string(job.size()) + " processes; " + usage);
  // Ranks on one machine share it: count those whose host name is this one's.
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  const uint64_t mine = std::hash<std::string_view>{}(host);
  const std::vector<uint64_t> hosts = job.world->all_gather(mine);
  job.ranks_on_host = int(std::count(hosts.begin(), hosts.end(), mine));
  return job;
}

std::shared_ptr<DistributedPrepareFinalize> make_ep_prepare_finalize(
    EpMode mode, std::shared_ptr<Communicator> comm, ExpertMap map, int64_t max_tokens) {
  switch (mode) {
    case EpMode::kNaive:
      return make_naive_prepare_finalize(std::move(comm), std::move(map));
    case EpMode::kLowLatency:
      return make_low_latency_prepare_finalize(std::move(comm), std::move(map), max_tokens);
    case EpMode::kAllToAll:
      break;
  }
  return make_all_to_all_prepare_finalize(std::move(comm), std::move(map));
}

ExpertMap make_ep_placement(EpPlacement placement, int num_experts, int ranks) {
  return placement == EpPlacement::kLinear ? ExpertMap::linear(num_experts, ranks)
                                           : ExpertMap::round_robin(num_experts, ranks);
}

}  // namespace moekit::cli
