// GoogleTest under mpiexec: mpi_gtest_main.cc creates the MPI communicator before the tests are
// enumerated; every rank runs every test, rank 0 prints the report, the others their failures.
#pragma once

#include <memory>

#include "moekit/dist/communicator.h"

namespace moekit::test {
extern std::shared_ptr<Communicator> g_comm;  // MPI_COMM_WORLD
}
