// The NCCL communicator across MPI ranks, one GPU each (run under mpiexec with 2 ranks): every
// collective against the same collective computed on the host. Skips, loudly, where the ranks
// find fewer GPUs than ranks.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "moekit/cuda.h"
#include "mpi/mpi_gtest.h"

namespace moekit::test {
namespace {

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() < g_comm->size())
      GTEST_SKIP() << "no CUDA device for each of the " << g_comm->size()
                   << " ranks: the NCCL communicator is not exercised here";
    nccl_ = make_nccl_communicator();
    ASSERT_TRUE(nccl_) << "moekit was built without NCCL";
    ASSERT_EQ(nccl_->rank(), g_comm->rank());
    ASSERT_EQ(nccl_->size(), g_comm->size());
  }

  // A device buffer holding `host`, and back.
  template <typename T>
  T* to_device(const std::vector<T>& host) {
    void* p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(host.size(), 1) * sizeof(T)), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
    buffers_.push_back(p);
    return static_cast<T*>(p);
  }
  template <typename T>
  std::vector<T> to_host(const T* p, size_t n) {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  void TearDown() override {
    for (void* p : buffers_) cudaFree(p);
  }

  std::shared_ptr<Communicator> nccl_;
  std::vector<void*> buffers_;
};

// Rank r's value i: distinct per rank and position.
int32_t value(int r, size_t i) { return 1000 * r + static_cast<int32_t>(i); }

TEST_F(Nccl, AllGatherVWithUnevenAndEmptyParts) {
  const int R = nccl_->size(), me = nccl_->rank();
  auto count = [](int r) { return r == 1 ? size_t(0) : size_t(3 + 5 * r); };  // rank 1 sends none
  std::vector<int32_t> mine(count(me));
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = value(me, i);
  std::vector<size_t> bytes(R);
  size_t total = 0;
  for (int r = 0; r < R; ++r) {
    total += count(r);
    bytes[r] = count(r) * 4;
  }
  int32_t* recv = to_device(std::vector<int32_t>(total, -1));
  nccl_->all_gather_v(to_device(mine), mine.size() * 4, recv, bytes);
  const auto got = to_host(recv, total);
  size_t at = 0;
  for (int r = 0; r < R; ++r)
    for (size_t i = 0; i < count(r); ++i, ++at) ASSERT_EQ(got[at], value(r, i)) << r << "," << i;
}

TEST_F(Nccl, AllToAllVMatchesTheHostExchange) {
  const int R = nccl_->size(), me = nccl_->rank();
  auto count = [](int src, int dst) { return size_t((src * 7 + dst * 3) % 5); };  // some zero
  std::vector<size_t> send_bytes(R), recv_bytes(R);
  std::vector<int32_t> send;
  for (int d = 0; d < R; ++d) {
    for (size_t i = 0; i < count(me, d); ++i) send.push_back(value(me, 100 * d + i));
    send_bytes[d] = count(me, d) * 4;
    recv_bytes[d] = count(d, me) * 4;
  }
  const size_t total = std::accumulate(recv_bytes.begin(), recv_bytes.end(), size_t{0}) / 4;
  int32_t* recv = to_device(std::vector<int32_t>(total, -1));
  nccl_->all_to_all_v(to_device(send), send_bytes, recv, recv_bytes);
  const auto got = to_host(recv, total);
  size_t at = 0;
  for (int s = 0; s < R; ++s)
    for (size_t i = 0; i < count(s, me); ++i, ++at) ASSERT_EQ(got[at], value(s, 100 * me + i));
}

TEST_F(Nccl, ReduceScatterVSumsInRankOrderBitExactly) {
  const int R = nccl_->size(), me = nccl_->rank();
  auto count = [](int r) { return size_t(1 + 4 * r); };
  auto term = [](int src, size_t i) { return 1.0f / float(3 + src) + 1e-7f * float(i); };
  std::vector<size_t> counts(R);
  std::vector<float> send;
  for (int d = 0; d < R; ++d) {
    counts[d] = count(d);
    for (size_t i = 0; i < count(d); ++i) send.push_back(term(me, i) * float(d + 1));
  }
  float* recv = to_device(std::vector<float>(count(me), -1.0f));
  nccl_->reduce_scatter_v(to_device(send), recv, counts);
  const auto got = to_host(recv, count(me));
  for (size_t i = 0; i < count(me); ++i) {
    float want = term(0, i) * float(me + 1);
    for (int r = 1; r < R; ++r) want += term(r, i) * float(me + 1);
    ASSERT_EQ(got[i], want) << i;  // same order, same fp32 rounding
  }
}

TEST_F(Nccl, BarrierReturnsOnEveryRank) { EXPECT_NO_THROW(nccl_->barrier()); }

}  // namespace
}  // namespace moekit::test
