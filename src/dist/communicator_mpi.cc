// MPI communicator. Collectives are built from non-blocking point-to-point messages so that a
// wait can time out and name the ranks whose data never came (MPI's own collectives would
// just hang). Reductions sum in rank order, so results are deterministic.
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>
#include <sstream>
#include <thread>

#include "moekit/core/error.h"
#include "moekit/dist/communicator.h"

namespace moekit {

namespace {

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  MOEKIT_FAIL("mpi: ", what, " failed: ", std::string(msg, len));
}

// Initialises MPI on first use and finalizes it at exit if we were the ones to initialise it.
struct MpiRuntime {
  bool owned = false;
  MpiRuntime() {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      int provided = 0;
      mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init");
      owned = true;
    }
  }
  ~MpiRuntime() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned && !fin) MPI_Finalize();
  }
};

// One message of a collective: a peer and a byte range (split below MPI's int count limit).
struct Message {
  int peer;
  char* data;
  size_t bytes;
};

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`.
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Comm_free(&comm_);
  }

  std::string_view name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_gather_v(const void* send, size_t send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_gather(send_bytes, recv_bytes);
    std::vector<Message> sends, recvs;
    char* out = static_cast<char*>(recv);
    for (int r = 0; r < size_; ++r) {
      sends.push_back({r, const_cast<char*>(static_cast<const char*>(send)), send_bytes});
      recvs.push_back({r, out, recv_bytes[r]});
      out += recv_bytes[r];
    }
    exchange("all_gather_v", sends, recvs);
  }

  void all_to_all_v(const void* send, std::span<const size_t> send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_counts(send_bytes, "all_to_all_v");
    check_counts(recv_bytes, "all_to_all_v");
    std::vector<Message> sends, recvs;
    char* in = const_cast<char*>(static_cast<const char*>(send));
    char* out = static_cast<char*>(recv);
    for (int r = 0; r < size_; ++r) {
      sends.push_back({r, in, send_bytes[r]});
      recvs.push_back({r, out, recv_bytes[r]});
      in += send_bytes[r];
      out += recv_bytes[r];
    }
    exchange("all_to_all_v", sends, recvs);
  }

  void reduce_scatter_v(const float* send, float* recv,
                        std::span<const size_t> recv_counts) override {
    check_counts(recv_counts, "reduce_scatter_v");
    // Every rank sends block d to rank d; this rank then sums the size_ blocks it received in
    // rank order.
    const size_t mine = recv_counts[rank_];
    std::vector<float> blocks(mine * size_);
    std::vector<size_t> send_bytes(size_), recv_bytes(size_, mine * sizeof(float));
    for (int r = 0; r < size_; ++r) send_bytes[r] = recv_counts[r] * sizeof(float);
    all_to_all_v(send, send_bytes, blocks.data(), recv_bytes);
    for (size_t i = 0; i < mine; ++i) {
      float s = blocks[i];
      for (int r = 1; r < size_; ++r) s += blocks[r * mine + i];
      recv[i] = s;
    }
  }

  void barrier() override {
    char token = 0;
    std::vector<char> all(size_);
    std::vector<size_t> bytes(size_, 1);
    all_gather_v(&token, 1, all.data(), bytes);
  }

 private:
  // Posts every receive and send (self by copy), then waits with the timeout. Each message is
  // sent even when empty, so a missing peer is always visible.
  void exchange(const char* op, std::span<const Message> sends, std::span<const Message> recvs) {
    constexpr size_t kPiece = size_t(1) << 30;  // below MPI's int count limit
    const int tag = static_cast<int>(seq_++ % 32000);
    std::vector<MPI_Request> reqs;
    std::vector<int> req_peer;  // peer of each receive request, -1 for sends
    auto post = [&](const Message& m, bool is_recv) {
      size_t off = 0;
      do {
        const int n = static_cast<int>(std::min(kPiece, m.bytes - off));
        MPI_Request req;
        mpi_check(is_recv ? MPI_Irecv(m.data + off, n, MPI_BYTE, m.peer, tag, comm_, &req)
                          : MPI_Isend(m.data + off, n, MPI_BYTE, m.peer, tag, comm_, &req),
                  op);
        reqs.push_back(req);
        req_peer.push_back(is_recv ? m.peer : -1);
        off += n;
      } while (off < m.bytes);
    };
    for (const Message& m : recvs)
      if (m.peer != rank_) post(m, true);
    for (const Message& m : sends)
      if (m.peer != rank_) post(m, false);
    for (const Message& m : recvs)
      if (m.peer == rank_ && m.bytes) std::memmove(m.data, sends[rank_].data, m.bytes);
    wait_all(op, reqs, req_peer);
  }

  void wait_all(const char* op, std::vector<MPI_Request>& reqs, const std::vector<int>& peer) {
    const auto deadline = std::chrono::steady_clock::now() + timeout();
    for (int spins = 0;; ++spins) {
      int done = 0;
      mpi_check(MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE),
                op);
      if (done) return;
      if (std::chrono::steady_clock::now() > deadline) break;
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    std::set<int> missing;  // peers whose data never came
    for (size_t i = 0; i < reqs.size(); ++i) {
      int flag = 0;
      MPI_Test(&reqs[i], &flag, MPI_STATUS_IGNORE);
      if (flag) continue;
      if (peer[i] >= 0) missing.insert(peer[i]);
      MPI_Cancel(&reqs[i]);
      MPI_Request_free(&reqs[i]);
    }
    std::ostringstream names;
    for (int r : missing) names << (r == *missing.begin() ? " " : ", ") << r;
    MOEKIT_FAIL("mpi: ", op, " on rank ", rank_, " timed out after ", timeout().count(),
                " s; no data from rank(s)", missing.empty() ? " (sends pending)" : names.str());
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  uint64_t seq_ = 0;
};

// MPI_COMM_WORLD, MPI initialised on first use.
MPI_Comm world() {
  static MpiRuntime runtime;
  return MPI_COMM_WORLD;
}

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator() {
  MPI_Comm comm;
  mpi_check(MPI_Comm_dup(world(), &comm), "MPI_Comm_dup");
  return std::make_shared<MpiCommunicator>(comm);
}

std::shared_ptr<Communicator> make_mpi_communicator(int ranks) {
  int rank = 0, size = 0;
  MPI_Comm_rank(world(), &rank);
  MPI_Comm_size(world(), &size);
  MOEKIT_CHECK(ranks >= 1 && ranks <= size, "make_mpi_communicator: ", ranks,
               " ranks requested of a world of ", size);
  MPI_Comm comm;
  mpi_check(MPI_Comm_split(world(), rank < ranks ? 0 : MPI_UNDEFINED, rank, &comm),
            "MPI_Comm_split");
  if (comm == MPI_COMM_NULL) return nullptr;
  return std::make_shared<MpiCommunicator>(comm);
}

bool mpi_available() {
  return true;
}

}  // namespace moekit
