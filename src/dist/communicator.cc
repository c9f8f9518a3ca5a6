// Communicator conveniences, the single-process communicator and the start-up consistency check.
#include "moekit/dist/communicator.h"

#include <cstring>
#include <sstream>

#include "moekit/core/error.h"

namespace moekit {

int64_t Communicator::all_reduce_max(int64_t value) {
  int64_t m = value;
  for (int64_t v : all_gather(value)) m = std::max(m, v);
  return m;
}

void Communicator::check_counts(std::span<const size_t> counts, const char* op) const {
  MOEKIT_CHECK(counts.size() == static_cast<size_t>(size()), op, ": ", counts.size(),
               " counts for ", size(), " ranks");
}

void Communicator::check_gather(size_t send_bytes, std::span<const size_t> recv_bytes) const {
  check_counts(recv_bytes, "all_gather_v");
  MOEKIT_CHECK(recv_bytes[rank()] == send_bytes, "all_gather_v: recv_bytes[", rank(),
               "] = ", recv_bytes[rank()], " but this rank sends ", send_bytes);
}

namespace {

class SingleCommunicator final : public Communicator {
 public:
  std::string_view name() const override { return "single"; }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_gather_v(const void* send, size_t send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_gather(send_bytes, recv_bytes);
    if (send_bytes) std::memmove(recv, send, send_bytes);
  }
  void all_to_all_v(const void* send, std::span<const size_t> send_bytes, void* recv,
                    std::span<const size_t> recv_bytes) override {
    check_counts(send_bytes, "all_to_all_v");
    check_counts(recv_bytes, "all_to_all_v");
    MOEKIT_CHECK(send_bytes[0] == recv_bytes[0], "all_to_all_v: sends ", send_bytes[0],
                 " bytes to itself but expects ", recv_bytes[0]);
    if (send_bytes[0]) std::memmove(recv, send, send_bytes[0]);
  }
  void reduce_scatter_v(const float* send, float* recv,
                        std::span<const size_t> recv_counts) override {
    check_counts(recv_counts, "reduce_scatter_v");
    if (recv_counts[0]) std::memmove(recv, send, recv_counts[0] * sizeof(float));
  }
  void barrier() override {}
};

}  // namespace

std::shared_ptr<Communicator> make_single_communicator() {
  return std::make_shared<SingleCommunicator>();
}

std::string LayerSignature::str() const {
  std::ostringstream os;
  os << "E=" << num_experts << " H=" << hidden << " I=" << intermediate << " k=" << top_k
     << " act_dtype=" << act_dtype << " weight_dtype=" << weight_dtype << " activation#" << std::hex
     << activation_hash << " format#" << format_hash << " placement#" << placement_fingerprint;
  return os.str();
}

void check_consistent(Communicator& comm, const LayerSignature& mine) {
  const std::vector<LayerSignature> all = comm.all_gather(mine);
  std::ostringstream bad;
  for (int r = 1; r < comm.size(); ++r) {
    const LayerSignature &a = all[0], &b = all[r];
    std::string fields;
    auto cmp = [&](const char* f, auto x, auto y) {
      if (x != y) fields += (fields.empty() ? "" : ", ") + std::string(f);
    };
    cmp("E", a.num_experts, b.num_experts);
    cmp("H", a.hidden, b.hidden);
    cmp("I", a.intermediate, b.intermediate);
    cmp("k", a.top_k, b.top_k);
    cmp("activation dtype", a.act_dtype, b.act_dtype);
    cmp("weight dtype / format", a.weight_dtype, b.weight_dtype);
    cmp("activation", a.activation_hash, b.activation_hash);
    cmp("format", a.format_hash, b.format_hash);
    cmp("placement", a.placement_fingerprint, b.placement_fingerprint);
    if (!fields.empty())
      bad << "\n  rank " << r << " differs from rank 0 in " << fields << " (rank 0: " << a.str()
          << "; rank " << r << ": " << b.str() << ")";
  }
  MOEKIT_CHECK(bad.str().empty(), "ranks disagree on the layer (seen on rank ", comm.rank(),
               "):", bad.str());
}

}  // namespace moekit
