#!/usr/bin/env bash
# Session 10's verification on the GPU machine (carry .deps): build, the six GPU test suites,
# the bench at 1-64 tokens (four presets, bf16 and fp8-token), then compute-sanitizer memcheck and
# racecheck over the experts' small-batch, fallback and 700-token fp8 cases and memcheck over the
# layer suite, each step bounded so that the call ends within its limit. Logs and JSON in $OUT.
set -uo pipefail
out=${OUT:-/tmp}
exec > >(tee "$out/log.txt") 2>&1
S=$(date +%s); nvidia-smi --query-gpu=name --format=csv,noheader
el() { echo $(( $(date +%s) - S )); }
tests=(test_cuda_router test_cuda_layer test_cuda_experts test_cuda_batched test_cuda_batched_pf
       test_cuda_contracts)
cmake -S . -B build-n -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_MPI=OFF \
  -DCMAKE_PREFIX_PATH=$PWD/.deps >/dev/null 2>&1 &&
  cmake --build build-n -j16 --target moekit_cli "${tests[@]}" > /tmp/build.log 2>&1 ||
  { echo "BUILD FAILED"; grep error -A3 /tmp/build.log | head -20; exit 1; }
echo "built at $(el) s"
for t in "${tests[@]}"; do
  timeout 120 build-n/tests/$t --gtest_brief=1 > /tmp/$t.log 2>&1
  echo "$t rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' /tmp/$t.log | tr '\n' ' ')"
  grep -E '^\[  FAILED  \]' /tmp/$t.log | head -5
done
echo "tested at $(el) s"
timeout 300 build-n/tools/moekit bench --device cuda \
  --preset qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b,deepseek-v3 --tokens 1,2,4,8,16,32,64 \
  --format bf16,fp8-token --reps 20 --err-tokens 2 --json $out/bench.json 2>&1 |
  grep -E " (bf16|fp8)|ceilings" | cut -c1-110
echo "benched at $(el) s"
f='Sweep/*small_batch*:Sweep/*fallback*:Sweep/*fp8*M700*:CudaExperts.*'
for tool in memcheck racecheck; do
  left=$(( 540 - $(el) )); (( left < 20 )) && { echo "no time for $tool"; continue; }
  extra=(); [[ $tool == racecheck ]] && extra=(--racecheck-report all)
  timeout $left compute-sanitizer --tool $tool "${extra[@]}" --error-exitcode 9 \
    build-n/tests/test_cuda_experts --gtest_brief=1 --gtest_filter="$f" > /tmp/s.log 2>&1
  echo "$tool experts rc=$? $(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY|RACECHECK SUMMARY' /tmp/s.log | tr '\n' ' ') at $(el) s"
done
left=$(( 570 - $(el) ))
(( left > 20 )) && { timeout $left compute-sanitizer --tool memcheck --error-exitcode 9 \
  build-n/tests/test_cuda_layer --gtest_brief=1 > /tmp/s.log 2>&1
  echo "memcheck layer rc=$? $(grep -E '^\[  (PASSED|FAILED) |ERROR SUMMARY' /tmp/s.log | tr '\n' ' ') at $(el) s"; }
echo "done at $(el) s"
