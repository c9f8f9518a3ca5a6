#!/usr/bin/env bash
# On the GPU machine, after bench/cuda_gpu_run.sh built build-cuda: per-kernel times and
# throughput of one layer (Nsight Compute), for the preset and token count given.
#   bench/cuda_profile.sh qwen3-30b-a3b 1
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
ncu --clock-control none --section SpeedOfLight --section Occupancy \
  -k regex:'gemm1|gemm2|map_ids|weight_and_reduce|cutlass|scatter|activation_kernel|unpermute' \
  --launch-skip 0 --launch-count 12 \
  build-cuda/tools/moekit bench --device cuda --preset "$1" --tokens "$2" --reps 1 \
  --err-tokens 1 >"$out/ncu_$1_$2.txt" 2>&1
grep -E "^\s+[a-z_:<>0-9A-Z]+.*\(|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per" \
  "$out/ncu_$1_$2.txt" | head -80
