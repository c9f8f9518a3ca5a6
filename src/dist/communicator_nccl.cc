// NCCL communicator: grouped point-to-point messages on the caller's stream over a non-blocking
// NCCL communicator, so that initialisation and every wait can time out: the communicator is
// then aborted, and (when MPI bootstrapped it) a short host probe names the missing ranks.
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "moekit/core/error.h"
#include "moekit/dist/communicator.h"

namespace moekit {

namespace detail {
cudaError_t launch_sum_blocks(const float* blocks, int ranks, size_t n, float* out,
                              cudaStream_t stream);
}

namespace {

void cuda_check(cudaError_t rc, const char* what) {
  MOEKIT_CHECK(rc == cudaSuccess, "nccl communicator: ", what, ": ", cudaGetErrorString(rc));
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(const NcclOptions& options)
      : stream_(static_cast<cudaStream_t>(options.stream)) {
    ncclUniqueId id;
    if (launched_by_mpi() && mpi_available()) {
      bootstrap_ = make_mpi_communicator();
      rank_ = bootstrap_->rank();
      size_ = bootstrap_->size();
      if (rank_ == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      id = bootstrap_->all_gather(id)[0];
    } else {
      rank_ = env_int("MOEKIT_RANK", -1);
      size_ = env_int("MOEKIT_WORLD_SIZE", -1);
      const char* file = std::getenv("MOEKIT_NCCL_ID_FILE");
      MOEKIT_CHECK(rank_ >= 0 && size_ > rank_ && file,
                   "nccl communicator: not launched by mpiexec; set MOEKIT_RANK, "
                   "MOEKIT_WORLD_SIZE and MOEKIT_NCCL_ID_FILE");
      id = exchange_id_by_file(file);
    }
    int devices = 0;
    cuda_check(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
    MOEKIT_CHECK(devices > 0, "nccl communicator: no CUDA device on rank ", rank_);
    const int local = env_int("OMPI_COMM_WORLD_LOCAL_RANK", env_int("MOEKIT_LOCAL_RANK", rank_));
    device_ = options.device >= 0 ? options.device : local % devices;
    cuda_check(cudaSetDevice(device_), "cudaSetDevice");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // returns at once; progress is polled below, under the timeout
    nccl_check(ncclCommInitRankConfig(&comm_, size_, id, rank_, &config), "ncclCommInitRank");
    wait_nccl("ncclCommInitRank");
  }

  ~NcclCommunicator() override {
    if (scratch_) cudaFree(scratch_);
    if (comm_) ncclCommDestroy(comm_);
  }

  std::string_view name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_gather_v(const void* send, size_t send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_gather(send_bytes, recv_bytes);
    std::vector<size_t> sends(size_, send_bytes);
    exchange("all_gather_v", send, sends, /*same_send=*/true, recv, recv_bytes);
  }

  void all_to_all_v(const void* send, std::span<const size_t> send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_counts(send_bytes, "all_to_all_v");
    check_counts(recv_bytes, "all_to_all_v");
    exchange("all_to_all_v", send, send_bytes, /*same_send=*/false, recv, recv_bytes);
  }

  void reduce_scatter_v(const float* send, float* recv,
                        std::span<const size_t> recv_counts) override {
    check_counts(recv_counts, "reduce_scatter_v");
    const size_t mine = recv_counts[rank_];
    float* blocks = static_cast<float*>(scratch(mine * size_ * sizeof(float)));
    std::vector<size_t> send_bytes(size_), recv_bytes(size_, mine * sizeof(float));
    for (int r = 0; r < size_; ++r) send_bytes[r] = recv_counts[r] * sizeof(float);
    exchange("reduce_scatter_v", send, send_bytes, false, blocks, recv_bytes);
    cuda_check(detail::launch_sum_blocks(blocks, size_, mine, recv, stream_), "sum of blocks");
    wait_stream("reduce_scatter_v");
  }

  void barrier() override {
    float* one = static_cast<float*>(scratch(sizeof(float)));
    nccl_check(ncclAllReduce(one, one, 1, ncclFloat, ncclSum, comm_, stream_), "barrier");
    wait_nccl("barrier");
    wait_stream("barrier");
  }

 private:
  void nccl_check(ncclResult_t rc, const char* what) const {
    if (rc == ncclSuccess || rc == ncclInProgress) return;
    MOEKIT_FAIL("nccl: ", what, " on rank ", rank_, " failed: ", ncclGetErrorString(rc),
                comm_ ? std::string(" (") + ncclGetLastError(comm_) + ")" : std::string());
  }

  // Rank 0 writes the id to `file` (atomically, by rename); the others wait for it.
  ncclUniqueId exchange_id_by_file(const char* file) {
    ncclUniqueId id;
    if (rank_ == 0) {
      nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
      const std::string tmp = std::string(file) + ".tmp";
      std::ofstream(tmp, std::ios::binary).write(id.internal, sizeof id.internal);
      std::filesystem::rename(tmp, file);
      return id;
    }
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    while (!std::filesystem::exists(file)) {
      MOEKIT_CHECK(std::chrono::steady_clock::now() < deadline, "nccl communicator: rank ", rank_,
                   " waited ", timeout().count(), " s for rank 0's id file ", file);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::ifstream(file, std::ios::binary).read(id.internal, sizeof id.internal);
    return id;
  }

  // Grouped sends and receives; self by device copy. Empty messages are skipped.
  void exchange(const char* op, const void* send, std::span<const size_t> send_bytes,
                bool same_send, void* recv, std::span<const size_t> recv_bytes) {
    const char* in = static_cast<const char*>(send);
    char* out = static_cast<char*>(recv);
    nccl_check(ncclGroupStart(), op);
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) {
        if (recv_bytes[r])
          cuda_check(cudaMemcpyAsync(out, in, recv_bytes[r], cudaMemcpyDeviceToDevice, stream_),
                     op);
      } else {
        if (send_bytes[r])
          nccl_check(ncclSend(in, send_bytes[r], ncclUint8, r, comm_, stream_), op);
        if (recv_bytes[r])
          nccl_check(ncclRecv(out, recv_bytes[r], ncclUint8, r, comm_, stream_), op);
      }
      if (!same_send) in += send_bytes[r];
      out += recv_bytes[r];
    }
    nccl_check(ncclGroupEnd(), op);
    wait_nccl(op);
    wait_stream(op);
  }

  // Until NCCL has finished the call it accepted in non-blocking mode.
  void wait_nccl(const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    for (;;) {
      ncclResult_t state = ncclSuccess;
      nccl_check(ncclCommGetAsyncError(comm_, &state), op);
      if (state == ncclSuccess) return;
      nccl_check(state, op);
      if (std::chrono::steady_clock::now() > deadline) fail_timeout(op);
      std::this_thread::yield();
    }
  }

  // Until the stream has drained, polling NCCL for asynchronous errors.
  void wait_stream(const char* op) {
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      MOEKIT_CHECK(q == cudaErrorNotReady, "nccl: ", op, ": ", cudaGetErrorString(q));
      ncclResult_t state = ncclSuccess;
      nccl_check(ncclCommGetAsyncError(comm_, &state), op);
      nccl_check(state, op);
      if (std::chrono::steady_clock::now() > deadline) fail_timeout(op);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  [[noreturn]] void fail_timeout(const char* op) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
    std::string missing = "unknown (no host bootstrap to ask)";
    if (bootstrap_) {
      // The ranks stuck like us reach this probe too; the missing ones never do.
      bootstrap_->set_timeout(std::chrono::seconds(2));
      try {
        bootstrap_->barrier();
        missing = "none at the host probe (a GPU-side stall)";
      } catch (const Error& e) {
        missing = e.message();
      }
    }
    MOEKIT_FAIL("nccl: ", op, " on rank ", rank_, " timed out after ", timeout().count(),
                " s; communicator aborted; missing ranks: ", missing);
  }

  void* scratch(size_t bytes) {
    if (bytes > scratch_bytes_) {
      if (scratch_) cuda_check(cudaFree(scratch_), "cudaFree");
      cuda_check(cudaMalloc(&scratch_, bytes), "cudaMalloc");
      scratch_bytes_ = bytes;
    }
    return scratch_;
  }

  std::shared_ptr<Communicator> bootstrap_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_;
  int rank_ = 0, size_ = 1, device_ = 0;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl_communicator(const NcclOptions& options) {
  return std::make_shared<NcclCommunicator>(options);
}

bool nccl_available() {
  return true;
}

}  // namespace moekit
