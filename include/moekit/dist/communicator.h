// Communicator: the collectives expert parallelism needs, over bytes, with a timeout on every
// call. A rank that never arrives ends the call on the others with moekit::Error naming it.
//
// Layouts: "v" collectives take one byte count per rank; the data of rank r sits at the prefix
// sum of the counts of ranks < r (no gaps). Every rank must make the same sequence of calls.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moekit {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string_view name() const = 0;  // "single", "mpi", "nccl"
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // recv gets every rank's send (rank order); recv_bytes[r] is rank r's send_bytes.
  virtual void all_gather_v(const void* send, size_t send_bytes, void* recv,
                            std::span<const size_t> recv_bytes) = 0;
  // Rank r sends send_bytes[d] bytes to rank d and receives recv_bytes[s] bytes from rank s.
  virtual void all_to_all_v(const void* send, std::span<const size_t> send_bytes, void* recv,
                            std::span<const size_t> recv_bytes) = 0;
  // fp32 sum over ranks of send (laid out by destination rank, recv_counts[d] floats each);
  // recv gets this rank's block. Summed in rank order 0..size-1, so results are deterministic.
  virtual void reduce_scatter_v(const float* send, float* recv,
                                std::span<const size_t> recv_counts) = 0;
  virtual void barrier() = 0;

  // Seconds a call waits for the slowest rank before it throws.
  std::chrono::duration<double> timeout() const { return timeout_; }
  void set_timeout(std::chrono::duration<double> t) { timeout_ = t; }

  // Conveniences over the primitives.
  template <typename T>
  std::vector<T> all_gather(const T& value) {
    std::vector<T> out(size());
    std::vector<size_t> bytes(size(), sizeof(T));
    all_gather_v(&value, sizeof(T), out.data(), bytes);
    return out;
  }
  int64_t all_reduce_max(int64_t value);

 protected:
  // Argument checks every implementation makes: one count per rank; in all_gather_v, this
  // rank's slot of recv_bytes equals what it sends.
  void check_counts(std::span<const size_t> counts, const char* op) const;
  void check_gather(size_t send_bytes, std::span<const size_t> recv_bytes) const;

 private:
  std::chrono::duration<double> timeout_ = std::chrono::seconds(60);
};

// One rank, no communication (the collectives copy).
std::shared_ptr<Communicator> make_single_communicator();

// MPI over MPI_COMM_WORLD (initialising MPI with MPI_THREAD_FUNNELED when nobody has). Returns
// null when moekit was built without MPI. Finalizes MPI at exit if it initialised it.
std::shared_ptr<Communicator> make_mpi_communicator();
// MPI over the first `ranks` ranks of MPI_COMM_WORLD (for scaling sweeps inside one job): a
// collective over the world; the other ranks get null.
std::shared_ptr<Communicator> make_mpi_communicator(int ranks);
bool mpi_available();
// True when this process was started by mpiexec/mpirun (OMPI_/PMI_ environment).
bool launched_by_mpi();

// NCCL over one GPU per rank (built with the CUDA backend when the toolkit ships NCCL; null
// otherwise). Buffers are device pointers of this rank's GPU; each call enqueues on `stream`
// (null: the legacy default stream) and waits for it, up to the timeout, after which the NCCL
// communicator is aborted and the error names the ranks a host probe found missing.
// Bootstrap: under mpiexec (and with MPI built in) rank 0's NCCL id travels over MPI; otherwise
// MOEKIT_RANK, MOEKIT_WORLD_SIZE and MOEKIT_NCCL_ID_FILE (rank 0 writes the id there, the
// others wait for the file). The GPU is `device`, or the node-local rank modulo the GPU count.
struct NcclOptions {
  int device = -1;
  void* stream = nullptr;  // cudaStream_t
};
std::shared_ptr<Communicator> make_nccl_communicator(const NcclOptions& options = {});
bool nccl_available();

// What every rank must agree on before a distributed layer runs.
struct LayerSignature {
  int64_t num_experts = 0, hidden = 0, intermediate = 0, top_k = 0;
  int64_t act_dtype = 0, weight_dtype = 0;
  uint64_t activation_hash = 0;
  uint64_t format_hash = 0;  // of the weights' QuantScheme::str()
  uint64_t placement_fingerprint = 0;
  std::string str() const;
};

// All-gathers the signatures; on any mismatch throws moekit::Error on every rank, naming the
// ranks and fields that differ from rank 0.
void check_consistent(Communicator& comm, const LayerSignature& mine);

}  // namespace moekit
