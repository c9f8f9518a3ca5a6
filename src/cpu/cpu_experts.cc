// CpuExperts: the standard-format experts of the CPU backend.
//
// apply() for a1 [M', H], local ids [M', k] -> out [M', k, H] fp32:
//   1. counting sort of the (token, slot) pairs by local expert (stable: pair order within an
//      expert is token-major), ids checked on the way, before anything is written;
//   2. phase 0, on every thread: zero the out rows of id -1 pairs; bf16 a1 rows are widened to
//      fp32 (exact) so that the kernels broadcast A straight into FMAs (kernels.h); quantized
//      weights get A records instead (quant_rows.h: values or int8 codes, and their scales);
//   3. phase 1: GEMM1 tiles (expert, panel) read A rows through row pointers (no gather copy),
//      fuse b13 and the activation, and write the intermediate [pairs, I] (fp32, holding bf16
//      values for bf16 activations: the intermediate is rounded to bf16 as on other backends);
//   4. quantized activations (fp8, int8): the intermediate is requantized as the format
//      quantizes activations, per token, per block or per tensor (quant_rows.h);
//   5. phase 2: GEMM2 tiles (expert, panel) read the intermediate and write out rows with b2.
// Each output element is computed by one tile, in one fixed order, so results are
// bit-identical whatever the thread count. Tiles are split between threads by an estimate of
// their cost (weight bytes streamed vs. flops), in expert-then-panel order so that each thread
// streams a contiguous range of packed weights; idle threads take tiles left by slow ones
// (schedule.h).
#include <algorithm>
#include <cstring>
#include <string>

#include "cpu/kernels.h"
#include "cpu/pack.h"
#include "cpu/quant_rows.h"
#include "cpu/schedule.h"
#include "cpu/thread_pool.h"
#include "moekit/cpu.h"
#include "moekit/quant/encodings.h"

namespace moekit {
namespace {

using cpu::PackedGemm;

// Cost of one tile, to split tiles between threads: time ~ max(bytes / bandwidth, flops / peak);
// with ~20 flops per byte of DRAM read on the machines we target, in flop units.
constexpr int64_t kFlopsPerByte = 20;

// The first row tile of a panel streams it from DRAM; prefetching 8 K-steps (2 KiB) ahead
// measured ~10-15% faster for decode than the hardware prefetchers alone (bench/notes_cpu.md).
constexpr int64_t kPrefetchBytes = 2048;
constexpr int64_t kPrefetchNextMaxBytes = 512 << 10;
// Quantized panels also prefetch 8 KiB ahead into L2 in every row tile: decode of one expert
// from DRAM, 1 thread, 14-18% faster than L1 prefetch alone (w4a16, fp8; bench/notes_cpu.md).
constexpr int64_t kQuantPrefetchL2Bytes = 8192;

// Scratch of one apply(), carved from the caller's workspace.
struct Scratch {
  int32_t* offsets;       // [E_local + 2] start of each expert's pairs; bucket E_local: id -1
  int32_t* active;        // [E_local] experts with pairs, ascending
  int32_t* order;         // [P] pair index t * k + s, grouped by expert
  const float** a_rows;   // [P] A rows of GEMM1 for the sorted pairs
  float** mid_rows;       // [P] intermediate rows (GEMM1 output)
  const float** a2_rows;  // [P] A rows of GEMM2 (the intermediate, or its int8 records)
  float** out_rows;       // [P] out rows
  float* mid;             // [P, mid_stride] intermediate
  float* a_wide;          // [M, a1_stride] GEMM1's A rows (none for fp32 weights: a1 itself)
  float* a2;              // [P, a2_stride] int8 records of the intermediate (w8a8 only)
  float* amax;            // [threads] per-thread amax of the intermediate (per-tensor scales)
  void* schedule;         // TileSchedule storage
  int64_t* bounds;        // [threads + 1] first tile of each thread
};

class CpuExperts final : public Experts {
 public:
  CpuExperts(const ExpertWeights& w, const Activation& act, const CpuExpertsConfig& config)
      : act_(act), isa_(config.isa), pool_(cpu::shared_thread_pool(config.num_threads)) {
    if (auto reason = validate_weights(w, act)) MOEKIT_FAIL("cpu experts: ", *reason);
    MOEKIT_CHECK(w.quant || w.w13.dtype == DType::kBF16 || w.w13.dtype == DType::kF32,
                 "cpu experts: float weights must be bf16 or fp32, got ",
                 moekit::name(w.w13.dtype));
    MOEKIT_CHECK(w.w2.dtype == w.w13.dtype, "cpu experts: w2 dtype ", moekit::name(w.w2.dtype),
                 " differs from w13 dtype ", moekit::name(w.w13.dtype));
    MOEKIT_CHECK(!w.quant || !w.quant->static_act, "cpu experts: format ", w.quant->str(),
                 ": static activation scales are not supported (dynamic ones are)");
    MOEKIT_CHECK(w.w13.device.type == DeviceType::kCPU && w.w2.device.type == DeviceType::kCPU,
                 "cpu experts: weights must be in host memory");
    MOEKIT_CHECK(act.gated || act.fn != ActivationFn::kSwigluOai,
                 "cpu experts: swiglu_oai must be gated");
    MOEKIT_CHECK(cpu_supports(isa_), "cpu experts: this CPU cannot run the ", moekit::name(isa_),
                 " kernels");
    kernels_ = &cpu::kernels_for(isa_);
    info_ = ExpertsInfo::of(w, act);
    name_ = "cpu-" + std::string(moekit::name(isa_));
    gemm_fn_ = info_.weight_dtype == DType::kBF16 ? kernels_->gemm_bf16 : kernels_->gemm_f32;
    spec_ = ActivationSpec::of(info_.quant);  // float formats: a1 of the weights' dtype
    g1_ = cpu::pack_w13(w, act, *pool_);
    g2_ = cpu::pack_w2(w, *pool_);
    mid_stride_ = g1_.panels * g1_.cols_per_panel;
    if (!w.quant) return;
    l1_ = cpu::RowLayout::of(g1_, l1_codes() ? g1_.k_padded() / 4 : g1_.k_padded());
    if (g2_.quant->family == cpu::QFamily::kInt8Dot) {  // int8 records apart from the fp32 rows
      l2_ = cpu::RowLayout::of(g2_, g2_.k_padded() / 4);
    } else {  // records in place: meta after the intermediate's columns
      l2_ = cpu::RowLayout::of(g2_, mid_stride_);
      mid_stride_ = l2_.stride;
    }
    if (spec_.scale == ScaleKind::kBlock)
      for (const cpu::RowLayout* l : {&l1_, &l2_})
        MOEKIT_CHECK(l->group == spec_.group, "cpu experts: format ", w.quant->str(),
                     ": activation blocks of ", spec_.group, " differ from weight groups of ",
                     l->group);
  }

  std::string_view name() const override { return name_; }
  ActivationFormat activation_format() const override { return ActivationFormat::kStandard; }
  ActivationSpec activation_spec() const override { return spec_; }
  TopKWeightApplied weight_application() const override { return TopKWeightApplied::kNone; }
  const ExpertsInfo& info() const override { return info_; }

  std::optional<std::string> can_implement(const MoEProblem& p) const override {
    auto mismatch = [this](const char* what, auto want, auto got) {
      return detail::concat(name_, ": ", what, " is ", got, ", built for ", want);
    };
    if (p.num_local_experts != info_.num_local_experts)
      return mismatch("num_local_experts", info_.num_local_experts, p.num_local_experts);
    if (p.hidden != info_.hidden) return mismatch("hidden", info_.hidden, p.hidden);
    if (p.intermediate != info_.intermediate)
      return mismatch("intermediate", info_.intermediate, p.intermediate);
    if (p.weight_dtype != info_.weight_dtype)
      return mismatch("weight dtype", moekit::name(info_.weight_dtype),
                      moekit::name(p.weight_dtype));
    if (g1_.quant && !(p.quant == info_.quant))
      return mismatch("format", info_.quant.str(), p.quant.str());
    if (p.activation.str() != act_.str())
      return mismatch("activation", act_.str(), p.activation.str());
    if (p.has_bias13 != info_.has_bias13 || p.has_bias2 != info_.has_bias2)
      return name_ + ": biases differ from the weights'";
    if (p.top_k < 1) return mismatch("top_k", ">= 1", p.top_k);
    if (p.tokens < 0) return mismatch("tokens", ">= 0", p.tokens);
    return std::nullopt;
  }

  size_t workspace_size(const MoEProblem& p) const override {
    return scratch_bytes(p.tokens, std::max(p.top_k, 1));
  }

  void apply(const DispatchedBatch& batch, const TensorView& out, Workspace& ws,
             const ExecContext&) const override {
    const TensorView& a1 = batch.a1;
    const TensorView& ids = batch.topk_ids;
    MOEKIT_CHECK(batch.format == ActivationFormat::kStandard, name_,
                 ": needs the standard activation format");
    MOEKIT_CHECK(a1.ndim == 2 && a1.size(1) == info_.hidden, name_, ": a1 must be [M, ",
                 info_.hidden, "], got ", a1.str());
    check_dtype(a1, spec_.dtype, "a1");
    check_row_major(a1, "a1");
    const int64_t M = a1.size(0);
    check_a1_scale(batch.a1_scale, M);
    MOEKIT_CHECK(ids.ndim == 2 && ids.size(0) == M && ids.size(1) >= 1, name_,
                 ": topk_ids must be [", M, ", k], got ", ids.str());
    check_dtype(ids, DType::kI32, "topk_ids");
    check_row_major(ids, "topk_ids");
    const int64_t k = ids.size(1);
    check_shape(out, {M, k, info_.hidden}, "out");
    check_dtype(out, DType::kF32, "out");
    MOEKIT_CHECK(out.stride[2] == 1, name_, ": out rows must be contiguous, got ", out.str());
    MOEKIT_CHECK(!out.overlaps(a1) && !out.overlaps(ids), name_, ": out overlaps the inputs");
    if (M == 0) return;
    const int64_t P = M * k;
    Scratch s = take_scratch(ws, M, k);
    const int64_t E = info_.num_local_experts;
    sort_pairs(ids, s);  // throws on bad ids, before out is touched

    // Row pointers of the sorted pairs.
    const bool dot2 = l2_.codes;
    for (int64_t i = 0; i < P; ++i) {
      const int64_t q = s.order[i], t = q / k, slot = q % k;
      s.a_rows[i] = s.a_wide ? s.a_wide + t * a1_stride() : a1.row<const float>(t);
      s.mid_rows[i] = s.mid + i * mid_stride_;
      s.a2_rows[i] = dot2 ? s.a2 + i * l2_.stride : s.mid_rows[i];
      if (g2_.quant && !dot2) s.mid_rows[i][l2_.meta] = 1.0f;  // the row scale, unless requantized
      s.out_rows[i] = out.ptr<float>() + t * out.stride[0] + slot * out.stride[1];
    }
    int64_t num_active = 0;
    for (int64_t e = 0; e < E; ++e)
      if (s.offsets[e + 1] > s.offsets[e]) s.active[num_active++] = int32_t(e);

    const int64_t H = info_.hidden, skip_begin = s.offsets[E], skip_end = s.offsets[E + 1];
    pool_->run([&](int t) {
      const int n = pool_->size();
      const int64_t z0 = skip_begin + (skip_end - skip_begin) * t / n;
      const int64_t z1 = skip_begin + (skip_end - skip_begin) * (t + 1) / n;
      for (int64_t i = z0; i < z1; ++i) std::fill(s.out_rows[i], s.out_rows[i] + H, 0.f);
      const int64_t r0 = M * t / n, r1 = M * (t + 1) / n;
      if (g1_.quant) {
        cpu::build_a1_rows(a1, batch.a1_scale, l1_, g1_.quant->zero_point, r0, r1, s.a_wide);
      } else if (s.a_wide) {
        for (int64_t r = r0; r < r1; ++r) {
          const uint16_t* src = a1.row<const uint16_t>(r);
          float* dst = s.a_wide + r * a1_stride();
          for (int64_t h = 0; h < H; ++h) dst[h] = bf16_to_float(src[h]);
          if (H & 1) dst[H] = 0.f;  // bf16 kernels read whole K-pairs
        }
      }
    });
    run_phase(g1_, s, num_active, s.a_rows, s.mid_rows, mid_columns(), l1_.meta);
    if (needs_a2_pass()) finish_a2(s, skip_begin);
    run_phase(g2_, s, num_active, s.a2_rows, s.out_rows, info_.hidden, l2_.meta);
  }

 private:
  bool l1_codes() const { return g1_.quant && g1_.quant->family == cpu::QFamily::kInt8Dot; }
  bool needs_a2_pass() const {
    return g2_.quant && (spec_.scale != ScaleKind::kNone || g2_.quant->zero_point);
  }
  // Floats per GEMM1 A row: quantized records, bf16 a1 widened (H rounded up to even: the bf16
  // kernels read whole K-pairs), none for fp32 weights (a1 itself).
  int64_t a1_stride() const {
    if (g1_.quant) return l1_.stride;
    return info_.weight_dtype == DType::kBF16 ? info_.hidden + (info_.hidden & 1) : 0;
  }
  // Intermediate columns GEMM1 writes: I; I rounded up to GEMM2's unit of K for FMA-decoded
  // quantized panels (act(0) = 0 from zero weights and biases fills the padding) and to even
  // for bf16 ones (their K-pairs).
  int64_t mid_columns() const {
    const int64_t I = info_.intermediate;
    if (!g2_.quant) return I + (info_.weight_dtype == DType::kBF16 ? I & 1 : 0);
    return l2_.codes ? I : l2_.kp;
  }

  // The typed scale of a1 (contract 4) against the activation spec, before anything is written.
  void check_a1_scale(const ActivationScale& sc, int64_t M) const {
    MOEKIT_CHECK(sc.kind == spec_.scale, name_, ": a1 scale must be ", moekit::name(spec_.scale),
                 " (format ", info_.quant.str(), "), got ", moekit::name(sc.kind));
    if (spec_.scale == ScaleKind::kNone) return;
    const TensorView& t = sc.scale;
    MOEKIT_CHECK(t.present() && t.device.type == DeviceType::kCPU, name_,
                 ": a1 scale missing or not in host memory (", t.str(), ")");
    switch (spec_.scale) {
      case ScaleKind::kTensor:
        check_shape(t, {1}, "a1 scale");
        break;
      case ScaleKind::kToken:
        check_shape(t, {M}, "a1 scale");
        break;
      default:
        MOEKIT_CHECK(sc.group == spec_.group, name_, ": a1 scale blocks of ", sc.group,
                     ", the format's are ", spec_.group);
        check_shape(t, {M, (info_.hidden + spec_.group - 1) / spec_.group}, "a1 scale");
        break;
    }
    check_dtype(t, spec_.scale_dtype, "a1 scale");
    check_row_major(t, "a1 scale");
    check_data(t, "a1 scale");
  }

  // GEMM2's A records from the intermediate rows [0, pairs) (quant_rows.h); a per-tensor scale
  // first takes the amax of every row.
  void finish_a2(const Scratch& s, int64_t pairs) const {
    const int n = pool_->size();
    const int64_t I = info_.intermediate;
    float tensor_scale = 1.0f;
    if (spec_.scale == ScaleKind::kTensor) {
      pool_->run([&](int t) {
        float m = 0;
        for (int64_t i = pairs * t / n; i < pairs * (t + 1) / n; ++i)
          m = std::max(m, cpu::finite_amax(s.mid_rows[i], I));
        s.amax[t] = m;
      });
      // Per-tensor activation scales are e4m3's (fp8-tensor, w4a8).
      tensor_scale = cpu::dynamic_scale(*std::max_element(s.amax, s.amax + n),
                                        traits(MiniFloat::kE4M3).max_finite, DType::kF32);
    }
    pool_->run([&](int t) {
      for (int64_t i = pairs * t / n; i < pairs * (t + 1) / n; ++i) {
        if (l2_.codes) {
          float* rec = const_cast<float*>(s.a2_rows[i]);
          kernels_->requant_int8(
              {s.mid_rows[i], reinterpret_cast<int8_t*>(rec), rec + l2_.meta, I, l2_.kp});
        } else {
          cpu::finish_a2_row(s.mid_rows[i], l2_, spec_, g2_.quant->zero_point, tensor_scale);
        }
      }
    });
  }

  // Bytes of the scratch of M tokens x k slots (P = M * k pairs); take_scratch's order.
  size_t scratch_bytes(int64_t M, int64_t k) const {
    const int64_t E = info_.num_local_experts, P = M * k;
    auto al = [](int64_t b) { return Workspace::aligned(size_t(b)); };
    return al((E + 2) * 4) + al(E * 4) + al(P * 4) + 4 * al(P * 8) + al(P * mid_stride_ * 4) +
           al(M * a1_stride() * 4) + al(P * a2_stride() * 4) + al(pool_->size() * 4) +
           al(int64_t(cpu::TileSchedule::bytes(pool_->size()))) + al((pool_->size() + 1) * 8);
  }
  int64_t a2_stride() const { return l2_.codes ? l2_.stride : 0; }

  Scratch take_scratch(Workspace& ws, int64_t M, int64_t k) const {
    const int64_t E = info_.num_local_experts, P = M * k;
    auto take = [&](int64_t bytes) { return ws.take_bytes(size_t(bytes)); };
    Scratch s;
    s.offsets = static_cast<int32_t*>(take((E + 2) * 4));
    s.active = static_cast<int32_t*>(take(E * 4));
    s.order = static_cast<int32_t*>(take(P * 4));
    s.a_rows = static_cast<const float**>(take(P * 8));
    s.mid_rows = static_cast<float**>(take(P * 8));
    s.a2_rows = static_cast<const float**>(take(P * 8));
    s.out_rows = static_cast<float**>(take(P * 8));
    s.mid = static_cast<float*>(take(P * mid_stride_ * 4));
    s.a_wide = a1_stride() ? static_cast<float*>(take(M * a1_stride() * 4)) : nullptr;
    s.a2 = a2_stride() ? static_cast<float*>(take(P * a2_stride() * 4)) : nullptr;
    s.amax = static_cast<float*>(take(pool_->size() * 4));
    s.schedule = take(int64_t(cpu::TileSchedule::bytes(pool_->size())));
    s.bounds = static_cast<int64_t*>(take((pool_->size() + 1) * 8));
    return s;
  }

  // Counting sort of pairs by local id; bucket E holds the -1 pairs.
  void sort_pairs(const TensorView& ids, Scratch& s) const {
    const int64_t E = info_.num_local_experts, M = ids.size(0), k = ids.size(1);
    int32_t* count = s.offsets + 1;  // count[e] lands in offsets[e + 1]
    std::fill(s.offsets, s.offsets + E + 2, 0);
    for (int64_t t = 0; t < M; ++t) {
      const int32_t* row = ids.row<int32_t>(t);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t id = row[j];
        MOEKIT_CHECK(id >= -1 && id < E, name_, ": local expert id ", id, " at [", t, ", ", j,
                     "] is outside [-1, ", E, ")");
        ++count[id < 0 ? E : id];
      }
    }
    for (int64_t e = 0; e <= E; ++e) s.offsets[e + 1] += s.offsets[e];
    // Second pass: offsets[e] advances as pairs are placed, then is restored by the shift.
    for (int64_t t = 0; t < M; ++t) {
      const int32_t* row = ids.row<int32_t>(t);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t b = row[j] < 0 ? E : row[j];
        s.order[s.offsets[b]++] = int32_t(t * k + j);
      }
    }
    for (int64_t e = E; e > 0; --e) s.offsets[e] = s.offsets[e - 1];
    s.offsets[0] = 0;
  }

  // One GEMM over every active expert: tiles (active expert i, panel p), numbered
  // i * panels + p, split between the threads by estimated cost (TileSchedule).
  // n_store: columns of C written (kernels.h c_valid); a_meta: the quantized A records' meta.
  void run_phase(const PackedGemm& g, const Scratch& s, int64_t num_active,
                 const float* const* a_rows, float* const* c_rows, int64_t n_store,
                 int64_t a_meta) const {
    const int n = pool_->size();
    auto cost = [&](int64_t i) {
      const int64_t e = s.active[i], rows = s.offsets[e + 1] - s.offsets[e];
      return std::max(kFlopsPerByte * g.panel_bytes, 2 * rows * g.k * cpu::kPanel);
    };
    int64_t total = 0;
    for (int64_t i = 0; i < num_active; ++i) total += cost(i) * g.panels;
    // bounds[t]: the first tile whose cost-weighted start is at or past total * t / n.
    int64_t before = 0, i = 0;
    for (int t = 0; t <= n; ++t) {
      const int64_t target = total * t / n;
      while (i < num_active && before + cost(i) * g.panels <= target)
        before += cost(i++) * g.panels;
      const int64_t p = i < num_active ? (target - before + cost(i) - 1) / cost(i) : 0;
      s.bounds[t] = t == n ? num_active * g.panels : i * g.panels + std::min(p, g.panels);
    }
    cpu::TileSchedule schedule(s.schedule, n);
    schedule.assign(s.bounds);

    cpu::PanelJob base;
    base.k = g.k;
    base.epilogue = g.epilogue;
    base.fn = act_.fn;
    base.alpha = act_.alpha;
    base.limit = act_.limit;
    base.prefetch = kPrefetchBytes;
    // The owner of a tile usually runs panel p + 1 next, which follows in memory. Not for panels
    // too big to share L2 with the current one (Mixtral's W2: 1.8 MB).
    base.prefetch_next = g.panel_bytes <= kPrefetchNextMaxBytes ? g.panel_bytes : 0;
    base.round_bf16 = spec_.dtype == DType::kBF16;
    pool_->run([&](int t) {
      schedule.run(t, [&](int64_t tile) {
        const int64_t i = tile / g.panels, p = tile % g.panels, e = s.active[i];
        const int64_t r0 = s.offsets[e];
        cpu::PanelJob job = base;
        job.a_rows = a_rows + r0;
        job.c_rows = c_rows + r0;
        job.rows = s.offsets[e + 1] - r0;
        job.b = g.panel(e, p);
        job.bias = g.panel_bias(e, p);
        job.c_col = p * g.cols_per_panel;
        job.c_valid = std::min(g.cols_per_panel, n_store - job.c_col);
        if (!g.quant) return gemm_fn_(job);
        kernels_->gemm_quant[int(g.quant->family)](
            {job, *g.quant, a_meta, g.post[size_t(e)], kQuantPrefetchL2Bytes});
      });
    });
  }

  Activation act_;
  CpuIsa isa_;
  std::shared_ptr<cpu::ThreadPool> pool_;
  const cpu::KernelTable* kernels_ = nullptr;
  void (*gemm_fn_)(const cpu::PanelJob&) = nullptr;
  ExpertsInfo info_;
  std::string name_;
  ActivationSpec spec_;  // what a1 must be (the intermediate is requantized the same way)
  PackedGemm g1_, g2_;
  int64_t mid_stride_ = 0;  // floats per intermediate row (I rounded up to whole panels [+ meta])
  cpu::RowLayout l1_, l2_;  // A records of quantized GEMM1 / GEMM2 (kernels.h)
};

}  // namespace

std::shared_ptr<Experts> make_cpu_experts(const ExpertWeights& weights, const Activation& act,
                                          const CpuExpertsConfig& config) {
  return std::make_shared<CpuExperts>(weights, act, config);
}

}  // namespace moekit
