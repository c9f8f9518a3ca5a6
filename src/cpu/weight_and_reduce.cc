// CpuWeightAndReduce: y[t] = sum over valid slots, in slot order, of w[t, s] * fused_out[t, s]
// (fp32), cast to y's dtype with round-to-nearest-even. Threads split the tokens.
#include <algorithm>

#include "cpu/thread_pool.h"
#include "moekit/cpu.h"

namespace moekit {
namespace {

// y element store per dtype (the only dtype switch: which of these to instantiate).
template <DType D>
struct YStore;
template <>
struct YStore<DType::kF32> {
  static void put(void* row, int64_t i, float v) { static_cast<float*>(row)[i] = v; }
};
template <>
struct YStore<DType::kBF16> {
  static void put(void* row, int64_t i, float v) {
    static_cast<uint16_t*>(row)[i] = float_to_bf16(v);
  }
};
template <>
struct YStore<DType::kF16> {
  static void put(void* row, int64_t i, float v) {
    static_cast<uint16_t*>(row)[i] = float_to_f16(v);
  }
};

class CpuWeightAndReduce final : public WeightAndReduce {
 public:
  explicit CpuWeightAndReduce(int threads) : pool_(cpu::shared_thread_pool(threads)) {}
  std::string_view name() const override { return "cpu-weight-and-reduce"; }

  void apply(const TensorView& fused_out, const TensorView& topk_ids,
             const TensorView& topk_weights, TopKWeightApplied applied, const TensorView& y,
             const ExecContext&) const override {
    MOEKIT_CHECK(y.ndim == 2, "weight_and_reduce: y must be [M, H], got ", y.str());
    const int64_t M = y.size(0), H = y.size(1);
    check_row_major(y, "y");
    check_dtype(fused_out, DType::kF32, "fused_out");
    const bool reduced = applied == TopKWeightApplied::kWeightedAndReduced;
    int64_t k = 1;
    if (reduced) {
      check_shape(fused_out, {M, H}, "fused_out");
    } else {
      MOEKIT_CHECK(topk_ids.ndim == 2 && topk_ids.size(0) == M, "weight_and_reduce: topk_ids ",
                   "must be [", M, ", k], got ", topk_ids.str());
      k = topk_ids.size(1);
      check_dtype(topk_ids, DType::kI32, "topk_ids");
      check_row_major(topk_ids, "topk_ids");
      check_shape(fused_out, {M, k, H}, "fused_out");
      if (applied == TopKWeightApplied::kNone) {
        check_shape(topk_weights, {M, k}, "topk_weights");
        check_dtype(topk_weights, DType::kF32, "topk_weights");
        check_row_major(topk_weights, "topk_weights");
      }
    }
    MOEKIT_CHECK(fused_out.stride[fused_out.ndim - 1] == 1,
                 "weight_and_reduce: fused_out rows must be contiguous");
    MOEKIT_CHECK(!y.overlaps(fused_out), "weight_and_reduce: y overlaps fused_out");
    switch (y.dtype) {
      case DType::kF32:
        return run<DType::kF32>(fused_out, topk_ids, topk_weights, applied, y, k);
      case DType::kBF16:
        return run<DType::kBF16>(fused_out, topk_ids, topk_weights, applied, y, k);
      case DType::kF16:
        return run<DType::kF16>(fused_out, topk_ids, topk_weights, applied, y, k);
      default:
        MOEKIT_FAIL("weight_and_reduce: y must be fp32, bf16 or fp16, got ", y.str());
    }
  }

 private:
  template <DType D>
  void run(const TensorView& f, const TensorView& ids, const TensorView& w,
           TopKWeightApplied applied, const TensorView& y, int64_t k) const {
    const int64_t M = y.size(0), H = y.size(1);
    const int64_t elem = element_bytes(D);
    const bool reduced = applied == TopKWeightApplied::kWeightedAndReduced;
    const bool weighted = applied == TopKWeightApplied::kNone;
    pool_->run([&](int t) {
      const int n = pool_->size();
      constexpr int64_t kChunk = 512;  // columns summed at once (fp32 sums on the stack)
      float acc[kChunk];
      for (int64_t m = M * t / n; m < M * (t + 1) / n; ++m) {
        void* yrow = static_cast<std::byte*>(y.data) + m * y.stride[0] * elem;
        const float* fm = static_cast<const float*>(f.data) + m * f.stride[0];
        if (reduced) {
          for (int64_t h = 0; h < H; ++h) YStore<D>::put(yrow, h, fm[h]);
          continue;
        }
        const int32_t* idr = ids.row<int32_t>(m);
        for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
          const int64_t len = std::min(kChunk, H - h0);
          std::fill(acc, acc + len, 0.f);
          for (int64_t s = 0; s < k; ++s) {
            if (idr[s] < 0) continue;
            const float ws = weighted ? w.row<float>(m)[s] : 1.f;
            const float* fs = fm + s * f.stride[1] + h0;
            for (int64_t h = 0; h < len; ++h) acc[h] = acc[h] + ws * fs[h];
          }
          for (int64_t h = 0; h < len; ++h) YStore<D>::put(yrow, h0 + h, acc[h]);
        }
      }
    });
  }

  std::shared_ptr<cpu::ThreadPool> pool_;
};

}  // namespace

std::shared_ptr<WeightAndReduce> make_cpu_weight_and_reduce(int num_threads) {
  return std::make_shared<CpuWeightAndReduce>(num_threads);
}

}  // namespace moekit
