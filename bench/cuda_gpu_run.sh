#!/usr/bin/env bash
# On the GPU machine: configure and build the CUDA backend, run its tests, then the benchmark
# (`moekit bench --device cuda`). Needs .deps (scripts/gather_deps.sh) carried along. Logs and
# JSON go to $OUT (default ./out).
#   bench/cuda_gpu_run.sh [test|sanitize|bench|all] [moekit bench args...]
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
tests=(test_cuda_router test_cuda_layer test_cuda_experts test_cuda_batched test_cuda_batched_pf
       test_cuda_contracts)
if [[ -n ${PREBUILT:-} ]] && "$PREBUILT/tests/test_cuda_experts" --gtest_list_tests >/dev/null 2>&1; then
  build=$PREBUILT
  echo "using the prebuilt $build"
else
  cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_MPI=OFF \
    -DCMAKE_PREFIX_PATH="$PWD/.deps" >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
  time cmake --build $build -j16 --target moekit_cli "${tests[@]}" \
    >"$out/build.log" 2>&1 || { grep -E "error|Error" -A5 "$out/build.log" | head -60; exit 1; }
  grep -E "spill|stack frame" "$out/build.log" | grep -v " 0 bytes spill" | head -5
fi
if [[ $what == test || $what == all ]]; then
  for t in "${tests[@]}"; do
    $build/tests/$t --gtest_brief=1 2>&1 | tee "$out/$t.log" | tail -25
  done
fi
if [[ $what == sanitize ]]; then
  # memcheck over every GPU test; racecheck over the router, the layer, of the experts every
  # small-batch case plus M = 1 and 19 of all kinds, of the batched experts the N = 5 cases and
  # the edge tests (whole suites take too long; the contract suite runs the same kernels).
  for t in "${tests[@]}"; do
    compute-sanitizer --tool memcheck --error-exitcode 9 $build/tests/$t --gtest_brief=1 2>&1 |
      tee "$out/memcheck_$t.log" | tail -2
  done
  for t in test_cuda_router test_cuda_layer test_cuda_batched_pf; do
    compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 $build/tests/$t \
      --gtest_brief=1 2>&1 | tee "$out/racecheck_$t.log" | tail -2
  done
  compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 \
    $build/tests/test_cuda_experts --gtest_brief=1 \
    --gtest_filter='Sweep/*_M1_*:Sweep/*_M19_*:Sweep/*small_batch*:CudaExperts.*:CudaPrepare.*:CudaModularKernel.*:Placements/*M19' \
    2>&1 | tee "$out/racecheck_test_cuda_experts.log" | tail -2
  compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 \
    $build/tests/test_cuda_batched --gtest_brief=1 --gtest_filter='Sweep/*_N5_*:CudaBatched.*' \
    2>&1 | tee "$out/racecheck_test_cuda_batched.log" | tail -2
fi
if [[ $what == bench || $what == all ]]; then
  $build/tools/moekit bench --device cuda --json "$out/cuda_bench.json" "$@" 2>&1 |
    grep -v '^\[' | tee "$out/bench.log"
fi
