#!/usr/bin/env bash
# Installs what moekit needs from Debian's packages (when missing and we are root), then
# configures and builds into build/ (Release, Ninja). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# libopenmpi-dev/openmpi-bin: expert parallelism across processes (tests run under mpiexec).
packages=(cmake ninja-build g++ libgtest-dev libcli11-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing packages: ${missing[*]} (install them, e.g. sudo apt-get install ...)" >&2
    exit 1
  fi
fi

# The CUDA backend builds when nvcc is present (no GPU needed to compile); it needs the CUTLASS
# 4.2 headers of the PyPI wheel nvidia-cutlass (only the headers: --no-deps).
if command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  python3 -c 'import cutlass_library' 2>/dev/null ||
    python3 -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
fi

cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
