// Low-latency EP (batched format). Every exchange has a size fixed at construction: rank r
// sends rank d one slab holding, for each of d's local experts, a count and max_tokens_per_rank
// rows (codes, then their scale rows). The receiver compacts the slabs expert by expert into
// [E_local, ranks * max, H] (scale rows alike); results go back in slabs of the same shape, and
// the owner knows where each (token, slot) landed because it chose the position itself. No
// counts are exchanged on the host.
#include <cstring>

#include "dist/ep_common.h"
#include "modular/dispatch_util.h"

namespace moekit {

namespace {

class LowLatencyPrepareFinalize final : public detail::EpPrepareFinalize {
 public:
  LowLatencyPrepareFinalize(std::shared_ptr<Communicator> comm, ExpertMap map, int64_t max_tokens)
      : EpPrepareFinalize(std::move(comm), std::move(map), "low-latency"), max_(max_tokens) {
    MOEKIT_CHECK(max_ >= 1, name_, ": max_tokens_per_rank ", max_, " < 1");
  }

  ActivationFormat activation_format() const override { return ActivationFormat::kBatched; }

  // Always one round, decided locally (no host exchange): the tokens must fit the slabs.
  int64_t num_rounds(int64_t local_tokens, int64_t chunk) override {
    MOEKIT_CHECK(local_tokens <= std::min(max_, chunk), name_, ": ", local_tokens,
                 " tokens on rank ", rank(), " exceed max_tokens_per_rank ", max_,
                 " (or chunk_tokens ", chunk, "); low-latency dispatch runs one round");
    return 1;
  }

  // All batched rows: [E_local, ranks * max] flattened.
  int64_t max_dispatched_tokens(const MoEProblem&) const override {
    return map_.num_local(rank()) * rows_per_expert();
  }

  size_t workspace_size(const MoEProblem& p) const override {
    const int64_t M = std::min(max_, p.tokens), H = p.hidden, k = p.top_k, R = comm_->size();
    const int64_t El = map_.num_local(rank()), rows = El * rows_per_expert();
    const int64_t row = detail::max_row_bytes(p);
    // a_local (+ scales); (dest, local, pos) [M, k] x3; slabs out/in; a1 (+ scales); counts;
    // result slabs out/in (fp32); combined [M, k, H].
    size_t slabs_out = 0, results_in = 0;
    for (int d = 0; d < R; ++d) {
      slabs_out += slab_bytes(d, row);
      results_in += map_.num_local(d) * max_ * H * 4;
    }
    return detail::prepare_activations_workspace(p, M) + 3 * Workspace::aligned(M * k * 4) +
           Workspace::aligned(slabs_out) + R * Workspace::aligned(slab_bytes(rank(), row)) +
           detail::rows_workspace(p, rows) + Workspace::aligned(El * 4) +
           Workspace::aligned(R * El * max_ * H * 4) + Workspace::aligned(results_in) +
           Workspace::aligned(M * k * H * 4);
  }

  std::optional<std::string> can_combine(TopKWeightApplied applied) const override {
    if (applied != TopKWeightApplied::kNone)
      return "batched rows carry no top-k weights; the owner applies them";
    return std::nullopt;
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws, const ExecContext&) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
    int64_t sent = 0;
    const detail::ActivationRows a_local = detail::prepare_activations(req, ws, agreed_amax(&sent));
    const detail::RowBytes row = a_local.bytes;
    // Slab of each destination, zeroed counts, and where each (token, slot) goes.
    std::vector<size_t> out_bytes(R), in_bytes(R, slab_bytes(rank(), row.total()));
    for (int d = 0; d < R; ++d) out_bytes[d] = slab_bytes(d, row.total());
    std::vector<char*> slab(R, static_cast<char*>(ws.take_bytes(detail::Counts::total(out_bytes))));
    for (int d = 0; d < R; ++d) {
      if (d) slab[d] = slab[d - 1] + out_bytes[d - 1];
      std::memset(slab[d], 0, counts_bytes(d));
    }
    dest_ = ws.take(DType::kI32, {M, k});
    local_ = ws.take(DType::kI32, {M, k});
    pos_ = ws.take(DType::kI32, {M, k});
    for (int64_t t = 0; t < M; ++t) {
      const int64_t key = detail::token_key(rank(), req.token_key_offset + t);
      for (int64_t s = 0; s < k; ++s) {
        const int32_t e = req.topk_ids.row<int32_t>(t)[s];
        const int d = e < 0 ? -1 : map_.serving_rank(e, key);
        dest_.row<int32_t>(t)[s] = d;
        if (d < 0) continue;
        const int32_t le = map_.local_id(d, e, key);
        const int32_t j = reinterpret_cast<int32_t*>(slab[d])[le]++;
        MOEKIT_CHECK(j < max_, name_, ": token ", t, " names expert ", e,
                     " twice in its top-k; low-latency slabs hold one row per token and expert");
        local_.row<int32_t>(t)[s] = le;
        pos_.row<int32_t>(t)[s] = j;
        const SlabRows to = slab_rows(slab[d], d, row);
        std::memcpy(to.codes(le, j), a_local.codes(t), row.codes);
        if (row.scale) std::memcpy(to.scale(le, j), a_local.scale_row(t), row.scale);
      }
    }
    char* in = static_cast<char*>(ws.take_bytes(in_bytes[0] * R));
    comm_->all_to_all_v(slab[0], out_bytes, in, in_bytes);

    // Compact: expert e's rows (and scale rows) from rank 0, then rank 1, ... A per-tensor scale
    // is the same on every rank and stays.
    const int64_t El = map_.num_local(rank()), N = rows_per_expert();
    const detail::ActivationRows a1 =
        detail::take_rows(req.spec, El * N, H, a_local.scale.scale, ws);
    DispatchedBatch b;
    b.format = ActivationFormat::kBatched;
    b.a1 = a1.a1.reshaped({El, N, H});
    b.a1_scale = a1.scale;  // rows as a1's, flattened: [El * N] or [El * N, ceil(H / group)]
    b.expert_num_tokens = ws.take(DType::kI32, {El});
    from_.assign(R * El, 0);
    for (int64_t e = 0; e < El; ++e) {
      int32_t n = 0;
      for (int src = 0; src < R; ++src) {
        const char* s = in + src * in_bytes[0];
        const SlabRows from = slab_rows(s, rank(), row);
        const int32_t c = reinterpret_cast<const int32_t*>(s)[e];
        from_[src * El + e] = c;
        std::memcpy(a1.codes(e * N + n), from.codes(e, 0), c * row.codes);
        if (row.scale) std::memcpy(a1.scale_row(e * N + n), from.scale(e, 0), c * row.scale);
        n += c;
      }
      b.expert_num_tokens.ptr<int32_t>()[e] = n;
    }
    count_dispatch(sent + detail::Counts::total(out_bytes) - out_bytes[rank()], start);
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace& ws, const ExecContext& ctx) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.y.size(0), H = req.y.size(1), k = dest_.size(1);
    const int64_t El = map_.num_local(rank()), N = rows_per_expert(), row = H * 4;
    // Result slab for each source: [E_local, max, H] fp32, that source's rows first.
    std::vector<size_t> out_bytes(R, El * max_ * row), in_bytes(R);
    char* out = static_cast<char*>(ws.take_bytes(out_bytes[0] * R));
    for (int64_t e = 0; e < El; ++e) {
      int64_t n = 0;
      for (int src = 0; src < R; ++src) {
        const int32_t c = from_[src * El + e];
        std::memcpy(out + src * out_bytes[0] + e * max_ * row,
                    req.fused_out.ptr<float>() + (e * N + n) * H, c * row);
        n += c;
      }
    }
    for (int d = 0; d < R; ++d) in_bytes[d] = map_.num_local(d) * max_ * row;
    char* in = static_cast<char*>(ws.take_bytes(detail::Counts::total(in_bytes)));
    comm_->all_to_all_v(out, out_bytes, in, in_bytes);

    std::vector<int64_t> base(R, 0);
    for (int d = 1; d < R; ++d) base[d] = base[d - 1] + in_bytes[d - 1];
    const TensorView combined = ws.take(DType::kF32, {M, k, H});
    std::memset(combined.data, 0, combined.nbytes());
    for (int64_t t = 0; t < M; ++t)
      for (int64_t s = 0; s < k; ++s)
        if (const int d = dest_.row<int32_t>(t)[s]; d >= 0)
          std::memcpy(
              combined.ptr<float>() + (t * k + s) * H,
              in + base[d] + (local_.row<int32_t>(t)[s] * max_ + pos_.row<int32_t>(t)[s]) * row,
              row);
    req.weight_and_reduce->apply(combined, req.topk_ids, req.topk_weights, req.applied, req.y, ctx);
    count_combine(detail::Counts::total(out_bytes) - out_bytes[rank()], start);
  }

 private:
  int64_t rows_per_expert() const { return comm_->size() * max_; }
  // Slab for rank d: int32 counts [E_local(d)] padded to 64 B, then the codes [E_local(d), max,
  // codes] and the scale rows [E_local(d), max, scale] of its rows.
  int64_t counts_bytes(int d) const { return Workspace::aligned(map_.num_local(d) * 4); }
  int64_t slab_bytes(int d, int64_t row_bytes) const {
    return counts_bytes(d) + map_.num_local(d) * max_ * row_bytes;
  }
  struct SlabRows {
    char *codes_base, *scale_base;
    int64_t max;
    detail::RowBytes row;
    char* codes(int64_t e, int64_t j) const { return codes_base + (e * max + j) * row.codes; }
    char* scale(int64_t e, int64_t j) const { return scale_base + (e * max + j) * row.scale; }
  };
  SlabRows slab_rows(const char* slab, int d, detail::RowBytes row) const {
    char* codes = const_cast<char*>(slab) + counts_bytes(d);
    return {codes, codes + map_.num_local(d) * max_ * row.codes, max_, row};
  }

  int64_t max_;
  TensorView dest_, local_, pos_;  // [M, k]: serving rank, its local expert, row in the slab
  std::vector<int32_t> from_;      // [ranks, E_local] rows received from each rank
};

}  // namespace

std::shared_ptr<DistributedPrepareFinalize> make_low_latency_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map, int64_t max_tokens_per_rank) {
  return std::make_shared<LowLatencyPrepareFinalize>(std::move(comm), std::move(map),
                                                     max_tokens_per_rank);
}

}  // namespace moekit
