// Fault injection for expert parallelism under mpiexec (3 ranks). Modes:
//   exit:   rank 1 exits before its first collective;
//   hang:   rank 1 never arrives (sleeps 10 s, past the others' 3 s timeout);
//   config: rank 2 builds a layer with another E.
// The healthy ranks must end with an error naming the culprit; none may finish the forward.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <thread>

#include "moekit/cpu.h"
#include "moekit/dist/ep.h"

using namespace moekit;

namespace {

void run_layer(std::shared_ptr<Communicator> comm, int num_experts) {
  const int64_t H = 32, I = 16, M = 4;
  const int k = 2;
  Tensor w13 = Tensor::zeros(DType::kBF16, {num_experts, 2 * I, H});
  Tensor w2 = Tensor::zeros(DType::kBF16, {num_experts, H, I});
  const ExpertMap map = ExpertMap::round_robin(num_experts, comm->size());
  const ExpertWeights global{w13, w2, {}, {}, std::nullopt};
  ModularKernel kernel(make_all_to_all_prepare_finalize(comm, map),
                       make_cpu_experts(ExpertWeights::local_view(global, map, comm->rank()),
                                        Activation{}, {1}),
                       make_cpu_weight_and_reduce(1), {k, DType::kBF16, 16});
  Tensor x = Tensor::zeros(DType::kBF16, {M, H}), y(DType::kBF16, {M, H});
  Tensor ids(DType::kI32, {M, k}), w(DType::kF32, {M, k});
  for (int i = 0; i < M * k; ++i) {
    ids.data<int32_t>()[i] = i % num_experts;
    w.data<float>()[i] = 0.5f;
  }
  kernel.forward({x, ids, w, y});
}

}  // namespace

int main(int argc, char** argv) {
  const std::string_view mode = argc > 1 ? argv[1] : "";
  auto comm = make_mpi_communicator();
  comm->set_timeout(std::chrono::seconds(3));
  const int rank = comm->rank();
  try {
    if (mode == "exit" && rank == 1) std::_Exit(3);
    if (mode == "hang" && rank == 1) std::this_thread::sleep_for(std::chrono::seconds(10));
    run_layer(comm, mode == "config" && rank == 2 ? 9 : 6);
  } catch (const Error& e) {
    std::fprintf(stderr, "[rank %d] error: %s\n", rank, e.what());
    std::fflush(stderr);
    return 1;
  }
  if (rank != 1 || mode == "config") std::printf("[rank %d] fault not detected\n", rank);
  return 0;
}
