#!/usr/bin/env bash
# Session 10: the final chunk rule (few_pairs, small_batch.cu) on the GPU machine (carry .deps):
# build, the experts' small-batch and fallback tests, the bench at 2-8 tokens where the rule
# differs from bench/session10_final.sh's run. Logs and JSON in $OUT.
set -uo pipefail
S=$(date +%s); el() { echo $(( $(date +%s) - S )); }
cmake -S . -B build-n -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOEKIT_MPI=OFF \
  -DCMAKE_PREFIX_PATH=$PWD/.deps >/dev/null 2>&1 &&
  cmake --build build-n -j16 --target moekit_cli test_cuda_experts > /tmp/build.log 2>&1 ||
  { echo "BUILD FAILED"; grep error -A3 /tmp/build.log | head; exit 1; }
echo "built at $(el) s"
build-n/tests/test_cuda_experts --gtest_brief=1 --gtest_filter='Sweep/*small_batch*:Sweep/*fallback*:CudaExperts.*' 2>&1 | grep -E '^\[  (PASSED|FAILED)'
timeout 150 build-n/tools/moekit bench --device cuda --preset qwen3-30b-a3b,gpt-oss-20b,deepseek-v3 \
  --tokens 2,4,8 --format bf16,fp8-token --reps 20 --err-tokens 1 --json ${OUT:-/tmp}/rule_check.json 2>&1 |
  grep -E " (bf16|fp8)" | cut -c1-110
echo "done at $(el) s"
