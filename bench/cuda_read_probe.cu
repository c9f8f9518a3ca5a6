// Read probe (dev tool, not built by CMake): how fast this GPU reads the weights of a decode step
// -- qwen3-30b-a3b's 8 active experts, W13 50 MB, W2 25 MB, at scattered 8 MB-aligned places --
// by (a) per-warp 16-byte loads (like src/cuda/small_batch.cu), (b) bulk copies (TMA) into a ring
// of shared memory stages, as one or two kernels; and how the L2 flush before each timed run
// changes that: 0 memset of a 256 MB buffer (dirty lines left in L2), 1 a read of it through
// ld.global.nc, 2 memset then a plain read of a second buffer, 3 a plain read only. Times are
// CUDA-event medians of 15 runs, launch included (the "empty kernel" row).
//   nvcc -O3 -arch=sm_90a -std=c++20 -Isrc -Iinclude -o cuda_read_probe bench/cuda_read_probe.cu
//   ./cuda_read_probe
// Output of 2026-11-28 on an H100: bench/results/2026-11-28_h100_read_probe.txt.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/device.cuh"  // load_stream: the small-batch kernels' weight load

#define CK(x)                                                          \
  do {                                                                 \
    cudaError_t e = (x);                                               \
    if (e != cudaSuccess) {                                            \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      exit(1);                                                         \
    }                                                                  \
  } while (0)

struct Segs {
  const char* p[32];
  long long bytes[32];
  int n;
};

__global__ void plain_read(const uint4* p, long long n, unsigned* out) {
  unsigned acc = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    uint4 v = p[i];
    acc ^= v.x + v.w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}

template <int U>
__global__ void __launch_bounds__(256, 2) ldg_kernel(Segs s, long long item_bytes, unsigned* out) {
  long long total = 0;
  for (int i = 0; i < s.n; ++i) total += s.bytes[i] / item_bytes;
  const int lane = threadIdx.x % 32;
  const long long warps = (long long)gridDim.x * 8;
  unsigned acc = 0;
  for (long long it = blockIdx.x * 8LL + threadIdx.x / 32; it < total; it += warps) {
    long long r = it;
    int seg = 0;
    while (r >= s.bytes[seg] / item_bytes) {
      r -= s.bytes[seg] / item_bytes;
      ++seg;
    }
    const char* base = s.p[seg] + r * item_bytes;
    for (long long off = lane * 16; off < item_bytes; off += 32 * 16 * U) {
      uint4 v[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        v[u] = off + u * 512 < item_bytes ? moekit::cuda::load_stream(base + off + u * 512)
                                          : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u) acc ^= v[u].x + v[u].y * 3 + v[u].z * 5 + v[u].w * 7;
    }
  }
  if (acc == 0x12345678u) out[0] = acc;
}

// TMA: one producer thread per block, S stages of C bytes, 8 consumer warps.
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
  asm volatile(
      "mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"((unsigned)__cvta_generic_to_shared(b)),
      "r"(count));
}
__device__ __forceinline__ void mbar_expect(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                   (unsigned)__cvta_generic_to_shared(b)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile(
      "mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"((unsigned)__cvta_generic_to_shared(b))
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra "
      "W;\n}" ::"r"((unsigned)__cvta_generic_to_shared(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, unsigned bytes, uint64_t* b) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"((unsigned)__cvta_generic_to_shared(dst)),
      "l"(src), "r"(bytes), "r"((unsigned)__cvta_generic_to_shared(b))
      : "memory");
}

template <int S, int C>
__global__ void __launch_bounds__(288, 1) tma_kernel(Segs s, unsigned* out) {
  extern __shared__ __align__(128) char smem[];
  __shared__ uint64_t full[S], empty[S];
  long long total = 0;
  for (int i = 0; i < s.n; ++i) total += s.bytes[i] / C;
  if (threadIdx.x == 0) {
    for (int i = 0; i < S; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;");
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp == 8) {
    if (lane == 0) {
      int k = 0;
      for (long long it = blockIdx.x; it < total; it += gridDim.x, ++k) {
        const int st = k % S;
        if (k >= S) mbar_wait(&empty[st], ((k / S) - 1) & 1);
        long long r = it;
        int seg = 0;
        while (r >= s.bytes[seg] / C) {
          r -= s.bytes[seg] / C;
          ++seg;
        }
        mbar_expect(&full[st], C);
        bulk_g2s(smem + st * C, s.p[seg] + r * C, C, &full[st]);
      }
    }
    return;
  }
  unsigned acc = 0;
  int k = 0;
  for (long long it = blockIdx.x; it < total; it += gridDim.x, ++k) {
    const int st = k % S;
    mbar_wait(&full[st], (k / S) & 1);
    const uint4* p = reinterpret_cast<const uint4*>(smem + st * C) + warp * (C / 16 / 8);
    for (int i = lane; i < C / 16 / 8; i += 32) {
      uint4 v = p[i];
      acc ^= v.x + v.y * 3 + v.z * 5 + v.w * 7;
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[st]);
  }
  if (acc == 0x12345678u) out[0] = acc;
}

int main() {
  int sms;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("device %s sms %d\n", prop.name, sms);
  const size_t pool = 2ull << 30;
  char* buf;
  CK(cudaMalloc(&buf, pool));
  CK(cudaMemset(buf, 1, pool));
  char* flush;
  CK(cudaMalloc(&flush, 256 << 20));
  char* flush2;
  CK(cudaMalloc(&flush2, 256 << 20));
  CK(cudaMemset(flush2, 3, 256 << 20));
  char* dst;
  CK(cudaMalloc(&dst, 1ull << 30));
  unsigned* out;
  CK(cudaMalloc(&out, 4));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  int flush_mode = 0;
  auto timeit = [&](auto f) {
    std::vector<float> t;
    for (int r = 0; r < 15; ++r) {
      if (flush_mode == 0 || flush_mode == 2) CK(cudaMemsetAsync(flush, r, 256 << 20));
      if (flush_mode == 1) {
        Segs fs{};
        fs.n = 1;
        fs.p[0] = flush;
        fs.bytes[0] = 256 << 20;
        ldg_kernel<4><<<sms * 2, 256>>>(fs, 8192, out);
      }
      if (flush_mode >= 2)
        plain_read<<<sms * 4, 512>>>((const uint4*)flush2, (256 << 20) / 16, out);
      CK(cudaEventRecord(a));
      f();
      CK(cudaEventRecord(b));
      CK(cudaEventSynchronize(b));
      float ms;
      CK(cudaEventElapsedTime(&ms, a, b));
      t.push_back(ms * 1000);
    }
    CK(cudaGetLastError());
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  float cp = timeit([&] { CK(cudaMemcpyAsync(dst, buf, 1ull << 30, cudaMemcpyDeviceToDevice)); });
  const double copy_gbs = 2.0 * (1ull << 30) / cp / 1e3;
  printf("copy 1 GiB: %.1f us = %.0f GB/s (r+w)\n", cp, copy_gbs);
  std::mt19937 rng(7);
  std::vector<int> perm(256);
  for (int i = 0; i < 256; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  auto segs = [&](int n, long long bytes, int first) {
    Segs s{};
    s.n = n;
    for (int i = 0; i < n; ++i) {
      s.p[i] = buf + (long long)perm[first + i] * (8 << 20);
      s.bytes[i] = bytes;
    }
    return s;
  };
  struct Case {
    const char* name;
    Segs s;
  };
  Segs w13 = segs(8, 1536LL * 2048 * 2, 0), w2 = segs(8, 2048LL * 768 * 2, 8), both{};
  both.n = 16;
  for (int i = 0; i < 8; ++i) {
    both.p[i] = w13.p[i];
    both.bytes[i] = w13.bytes[i];
    both.p[8 + i] = w2.p[i];
    both.bytes[8 + i] = w2.bytes[i];
  }
  Segs big = segs(2, 234881024LL / 4, 16);  // two 58.7 MB pieces
  big.p[0] = buf;
  big.p[1] = buf + (512 << 20);
  Case cases[] = {{"qwen W13 50MB", w13},
                  {"qwen W2 25MB", w2},
                  {"qwen W13+W2 75MB one kernel", both},
                  {"2x58.7MB", big}};
  auto bytes_of = [](const Segs& s) {
    long long t = 0;
    for (int i = 0; i < s.n; ++i) t += s.bytes[i];
    return t;
  };
  auto report = [&](const char* how, const char* name, long long bytes, float us) {
    printf("%-28s %-30s %8.1f us %7.0f GB/s  %5.1f%% of copy\n", how, name, us, bytes / us / 1e3,
           100.0 * bytes / us / 1e3 / copy_gbs);
  };
  for (flush_mode = 0; flush_mode < 4; ++flush_mode) {
    printf(
        "--- flush mode %d (0 memset, 1 nc-read, 2 memset A then plain read B, 3 plain read B)\n",
        flush_mode);
    for (auto& c : cases) {
      long long bytes = bytes_of(c.s);
      report("ldg U4 item8K 2blk", c.name, bytes,
             timeit([&] { ldg_kernel<4><<<sms * 2, 256>>>(c.s, 8192, out); }));
      report("ldg U8 item16K 2blk", c.name, bytes,
             timeit([&] { ldg_kernel<8><<<sms * 2, 256>>>(c.s, 16384, out); }));
      auto tma = [&](auto kern, int S, int C, const char* how) {
        CK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, S * C));
        report(how, c.name, bytes, timeit([&] { kern<<<sms, 288, S * C>>>(c.s, out); }));
      };
      tma(tma_kernel<8, 16384>, 8, 16384, "tma S8 C16K");
    }
    // Two kernels back to back (W13 then W2), as the two GEMMs are today.
    report("ldg two kernels", "W13 then W2", bytes_of(both), timeit([&] {
             ldg_kernel<4><<<sms * 2, 256>>>(w13, 8192, out);
             ldg_kernel<4><<<sms * 2, 256>>>(w2, 8192, out);
           }));
    CK(cudaFuncSetAttribute(tma_kernel<12, 16384>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            12 * 16384));
    report("tma two kernels", "W13 then W2", bytes_of(both), timeit([&] {
             tma_kernel<12, 16384><<<sms, 288, 12 * 16384>>>(w13, out);
             tma_kernel<12, 16384><<<sms, 288, 12 * 16384>>>(w2, out);
           }));
    report("empty kernel", "-", 0,
           timeit([&] { ldg_kernel<4><<<sms * 2, 256>>>(Segs{}, 8192, out); }));
  }
  return 0;
}
