#include <gtest/gtest.h>

#include <cstdio>

#include "mpi/mpi_gtest.h"

namespace moekit::test {
std::shared_ptr<Communicator> g_comm;
}

namespace {

// Ranks other than 0 print only their failures, prefixed with the rank.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: %s\n", rank_, r.file_name() ? r.file_name() : "?",
                   r.line_number(), r.message());
  }

 private:
  int rank_;
};

}  // namespace

// The exit code is non-zero on any failing rank, which mpiexec passes on.
int main(int argc, char** argv) {
  // Before InitGoogleTest: parameterized cases may be enumerated over the communicator.
  moekit::test::g_comm = moekit::make_mpi_communicator();
  moekit::test::g_comm->set_timeout(std::chrono::seconds(120));
  ::testing::InitGoogleTest(&argc, argv);
  const int rank = moekit::test::g_comm->rank();
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter(rank));
  }
  const int rc = RUN_ALL_TESTS();
  moekit::test::g_comm.reset();
  return rc;
}
