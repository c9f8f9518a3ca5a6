// Launcher detection, independent of whether MPI was built in.
#include <cstdlib>

#include "moekit/dist/communicator.h"

namespace moekit {

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v)) return true;
  return false;
}

#ifndef MOEKIT_HAVE_MPI
std::shared_ptr<Communicator> make_mpi_communicator() {
  return nullptr;
}
std::shared_ptr<Communicator> make_mpi_communicator(int) {
  return nullptr;
}
bool mpi_available() {
  return false;
}
#endif

#ifndef MOEKIT_HAVE_NCCL
std::shared_ptr<Communicator> make_nccl_communicator(const NcclOptions&) {
  return nullptr;
}
bool nccl_available() {
  return false;
}
#endif

}  // namespace moekit
