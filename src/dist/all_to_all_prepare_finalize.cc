// All-to-all EP: a token travels once to each rank that serves at least one of its experts;
// every (token, slot) result travels back to the owner in fp32, and the owner weights and sums
// with its own routing (contract 2), in slot order: the same arithmetic as on one rank.
#include <cstring>

#include "dist/ep_common.h"
#include "modular/dispatch_util.h"

namespace moekit {

namespace {

int64_t round_up(int64_t x, int64_t to) {
  return (x + to - 1) / to * to;
}

class AllToAllPrepareFinalize final : public detail::EpPrepareFinalize {
 public:
  AllToAllPrepareFinalize(std::shared_ptr<Communicator> comm, ExpertMap map)
      : EpPrepareFinalize(std::move(comm), std::move(map), "all-to-all") {}

  size_t workspace_size(const MoEProblem& p) const override {
    const int64_t M = p.tokens, T = max_dispatched_tokens(p), H = p.hidden, k = p.top_k;
    const int64_t rec = record_bytes(H, k, 4), fanout = std::min<int64_t>(k, comm_->size());
    // a_local [M, H]; dest [M, k]; records out (M * fanout) and in (T); a1 [T, H]; ids and
    // weights [T, k]; results out [T, k, H], in [M, k, H], combined [M, k, H] (fp32).
    return Workspace::aligned(M * H * 4) + Workspace::aligned(M * k * 4) +
           Workspace::aligned(M * fanout * rec) + Workspace::aligned(T * rec) +
           Workspace::aligned(T * H * 4) + 2 * Workspace::aligned(T * k * 4) +
           Workspace::aligned(T * k * H * 4) + 2 * Workspace::aligned(M * k * H * 4);
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws, const ExecContext&) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
    const int64_t elt = element_bytes(req.spec.dtype), rec = record_bytes(H, k, elt);
    const TensorView a_local = detail::activations_for_experts(req, ws);

    // The rank serving each (token, slot), -1 for padding; rows bound for each rank.
    dest_ = ws.take(DType::kI32, {M, k});
    std::vector<int64_t> rows_to(R, 0);
    for (int64_t t = 0; t < M; ++t) {
      const int64_t key = detail::token_key(rank(), req.token_key_offset + t);
      std::vector<bool> seen(R, false);
      for (int64_t s = 0; s < k; ++s) {
        const int32_t e = req.topk_ids.row<int32_t>(t)[s];
        const int d = e < 0 ? -1 : map_.serving_rank(e, key);
        dest_.row<int32_t>(t)[s] = d;
        if (d >= 0 && !seen[d]) {
          seen[d] = true;
          ++rows_to[d];
        }
      }
    }
    std::vector<int64_t> rows_from(R);
    {
      std::vector<size_t> eight(R, sizeof(int64_t));
      comm_->all_to_all_v(rows_to.data(), eight, rows_from.data(), eight);
    }
    rows_from_ = rows_from;

    // Records: [activation row | k dest-local ids | k weights], grouped by destination rank.
    detail::Counts bytes(R);
    std::vector<int64_t> first(R + 1, 0);
    for (int d = 0; d < R; ++d) {
      bytes.send[d] = rows_to[d] * rec;
      bytes.recv[d] = rows_from[d] * rec;
      first[d + 1] = first[d] + rows_to[d];
    }
    char* out = static_cast<char*>(ws.take_bytes(detail::Counts::total(bytes.send)));
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t t = 0; t < M; ++t) {
      const int64_t key = detail::token_key(rank(), req.token_key_offset + t);
      const int32_t* dest = dest_.row<int32_t>(t);
      for (int d = 0; d < R; ++d) {
        if (std::find(dest, dest + k, d) == dest + k) continue;
        char* r = out + next[d]++ * rec;
        std::memcpy(r, a_local.row<char>(0) + t * H * elt, H * elt);
        auto* ids = reinterpret_cast<int32_t*>(r + H * elt);
        auto* w = reinterpret_cast<float*>(ids + k);
        for (int64_t s = 0; s < k; ++s) {
          ids[s] = dest[s] == d ? map_.local_id(d, req.topk_ids.row<int32_t>(t)[s], key) : -1;
          w[s] = req.weight_on_input ? 1.0f : req.topk_weights.row<float>(t)[s];
        }
      }
    }
    const int64_t T = detail::Counts::total(bytes.recv) / rec;
    char* in = static_cast<char*>(ws.take_bytes(T * rec));
    comm_->all_to_all_v(out, bytes.send, in, bytes.recv);

    DispatchedBatch b;
    b.a1 = ws.take(req.spec.dtype, {T, H});
    b.topk_ids = ws.take(DType::kI32, {T, k});
    b.topk_weights = ws.take(DType::kF32, {T, k});
    for (int64_t i = 0; i < T; ++i) {
      const char* r = in + i * rec;
      std::memcpy(b.a1.row<char>(0) + i * H * elt, r, H * elt);
      std::memcpy(b.topk_ids.row<int32_t>(i), r + H * elt, k * 4);
      std::memcpy(b.topk_weights.row<float>(i), r + H * elt + k * 4, k * 4);
    }
    local_ids_ = b.topk_ids;
    count_dispatch(detail::Counts::total(bytes.send) - bytes.send[rank()], start);
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace& ws, const ExecContext& ctx) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.y.size(0), H = req.y.size(1), k = local_ids_.size(1);
    const int64_t row_bytes = H * 4;
    // Expert side: the served slots of every received row, in arrival order, back to their
    // source rank.
    detail::Counts bytes(R);
    const int64_t T = local_ids_.size(0);
    char* out = static_cast<char*>(ws.take_bytes(T * k * row_bytes));
    char* o = out;
    for (int src = 0, i = 0; src < R; ++src)
      for (int64_t n = 0; n < rows_from_[src]; ++n, ++i)
        for (int64_t s = 0; s < k; ++s) {
          if (local_ids_.row<int32_t>(i)[s] < 0) continue;
          std::memcpy(o, req.fused_out.ptr<float>() + (i * k + s) * H, row_bytes);
          o += row_bytes;
          bytes.send[src] += row_bytes;
        }
    // Owner side: what each rank returns, in the order this rank sent (token, slot).
    for (int64_t t = 0; t < M; ++t)
      for (int64_t s = 0; s < k; ++s)
        if (const int d = dest_.row<int32_t>(t)[s]; d >= 0) bytes.recv[d] += row_bytes;
    char* in = static_cast<char*>(ws.take_bytes(detail::Counts::total(bytes.recv)));
    comm_->all_to_all_v(out, bytes.send, in, bytes.recv);

    const TensorView combined = ws.take(DType::kF32, {M, k, H});
    std::memset(combined.data, 0, combined.nbytes());
    std::vector<int64_t> next(R + 1, 0);
    for (int d = 0; d < R; ++d) next[d + 1] = next[d] + bytes.recv[d];
    for (int64_t t = 0; t < M; ++t)
      for (int64_t s = 0; s < k; ++s)
        if (const int d = dest_.row<int32_t>(t)[s]; d >= 0) {
          std::memcpy(combined.ptr<float>() + (t * k + s) * H, in + next[d], row_bytes);
          next[d] += row_bytes;
        }
    req.weight_and_reduce->apply(combined, req.topk_ids, req.topk_weights, req.applied, req.y, ctx);
    count_combine(detail::Counts::total(bytes.send) - bytes.send[rank()], start);
  }

  std::optional<std::string> can_combine(TopKWeightApplied applied) const override {
    if (applied == TopKWeightApplied::kWeightedAndReduced)
      return "returns per-slot results, so it needs experts that do not reduce over top-k";
    return std::nullopt;
  }

 private:
  static int64_t record_bytes(int64_t H, int64_t k, int64_t elt) {
    return round_up(H * elt + 8 * k, 16);
  }

  TensorView dest_;                 // [M, k] serving rank per (token, slot), -1 padding
  TensorView local_ids_;            // [T, k] received rows' local ids
  std::vector<int64_t> rows_from_;  // rows received from each rank
};

}  // namespace

std::shared_ptr<DistributedPrepareFinalize> make_all_to_all_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map) {
  return std::make_shared<AllToAllPrepareFinalize>(std::move(comm), std::move(map));
}

}  // namespace moekit
