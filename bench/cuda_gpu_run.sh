#!/usr/bin/env bash
# On the GPU machine: configure and build the CUDA backend, run its tests, then the benchmark.
# Needs .deps (scripts/gather_deps.sh) carried along. Logs and JSON go to $OUT (default ./out).
#   bench/cuda_gpu_run.sh [test|sanitize|bench|all] [bench args...]
# PREBUILT=<build dir>: a build made on another x86-64 machine and carried along (its test and
# bench binaries); used as it is when its test binary starts there, else the script builds.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
shift || true
out=${OUT:-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$out/gpu.txt"
build=build-cuda
tests=(test_cuda_experts test_cuda_layer)
if [[ -n ${PREBUILT:-} ]] && "$PREBUILT/tests/test_cuda_experts" --gtest_list_tests >/dev/null 2>&1; then
  build=$PREBUILT
  echo "using the prebuilt $build"
else
  cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_MPI=OFF \
    -DCMAKE_PREFIX_PATH="$PWD/.deps" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  time cmake --build $build -j16 --target moekit "${tests[@]}" cuda_experts_bench \
    >"$out/build.log" 2>&1 || { grep -E "error|Error" -A5 "$out/build.log" | head -60; exit 1; }
  grep -E "spill|stack frame" "$out/build.log" | grep -v " 0 bytes spill" | head -5
fi
if [[ $what == test || $what == all ]]; then
  for t in "${tests[@]}"; do
    $build/tests/$t --gtest_brief=1 2>&1 | tee "$out/$t.log" | tail -25
  done
fi
if [[ $what == sanitize ]]; then
  # racecheck: every small-batch case plus M = 1 and 19 of all kinds; memcheck: M = 7 and the
  # ModularKernel graph and refusal tests (whole suites take too long under the sanitizers).
  compute-sanitizer --tool racecheck --racecheck-report all $build/tests/test_cuda_experts \
    --gtest_brief=1 --gtest_filter='Sweep/*_M1_*:Sweep/*_M19_*:Sweep/*small_batch*:CudaExperts.*:CudaPrepare.*:Placements/*M19' \
    2>&1 | tee "$out/racecheck.log" | tail -3
  compute-sanitizer --tool memcheck $build/tests/test_cuda_experts --gtest_brief=1 \
    --gtest_filter='Sweep/*_M7_*:CudaModular*:Placements/*replicated*' 2>&1 | tee "$out/memcheck.log" | tail -3
fi
if [[ $what == bench || $what == all ]]; then
  $build/cuda_experts_bench --out "$out/cuda_bench.json" "$@" 2>&1 | tee "$out/bench.log"
fi
