// All-to-all EP: a token (its codes and scale row) travels once to each rank that serves at
// least one of its experts; every (token, slot) result travels back to the owner in fp32, and
// the owner weights and sums with its own routing (contract 2), in slot order: the same
// arithmetic as on one rank.
#include <algorithm>
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
    const int64_t rec = record_bytes(detail::max_row_bytes(p), k);
    const int64_t fanout = std::min<int64_t>(k, comm_->size());
    // a_local [M, H] (+ scales); dest [M, k]; records out (M * fanout) and in (T); a1 [T, H]
    // (+ scales); ids and weights [T, k]; results out [T, k, H], in [M, k, H], combined
    // [M, k, H] (fp32).
    return detail::prepare_activations_workspace(p, M) + Workspace::aligned(M * k * 4) +
           Workspace::aligned(M * fanout * rec) + Workspace::aligned(T * rec) +
           detail::rows_workspace(p, T) + 2 * Workspace::aligned(T * k * 4) +
           Workspace::aligned(T * k * H * 4) + 2 * Workspace::aligned(M * k * H * 4);
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws, const ExecContext&) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
    int64_t sent = 0;
    const detail::ActivationRows a_local = detail::prepare_activations(req, ws, agreed_amax(&sent));
    const detail::RowBytes row = a_local.bytes;
    const int64_t rec = record_bytes(row.total(), k);

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

    // Records: [k dest-local ids | k weights | scale row | codes], grouped by destination rank.
    detail::Counts bytes(R);
    std::vector<int64_t> first(R + 1, 0);
    for (int d = 0; d < R; ++d) {
      bytes.send[d] = rows_to[d] * rec;
      bytes.recv[d] = rows_from[d] * rec;
      first[d + 1] = first[d] + rows_to[d];
    }
    char* out = static_cast<char*>(ws.take_bytes(detail::Counts::total(bytes.send)));
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    std::vector<int32_t> ids(k);
    std::vector<float> w(k);
    for (int64_t t = 0; t < M; ++t) {
      const int64_t key = detail::token_key(rank(), req.token_key_offset + t);
      const int32_t* dest = dest_.row<int32_t>(t);
      for (int d = 0; d < R; ++d) {
        if (std::find(dest, dest + k, d) == dest + k) continue;
        char* r = out + next[d]++ * rec;
        for (int64_t s = 0; s < k; ++s) {
          ids[s] = dest[s] == d ? map_.local_id(d, req.topk_ids.row<int32_t>(t)[s], key) : -1;
          w[s] = req.weight_on_input ? 1.0f : req.topk_weights.row<float>(t)[s];
        }
        std::memcpy(r, ids.data(), k * 4);
        std::memcpy(r + k * 4, w.data(), k * 4);
        if (row.scale) std::memcpy(r + 8 * k, a_local.scale_row(t), row.scale);
        std::memcpy(r + 8 * k + row.scale, a_local.codes(t), row.codes);
      }
    }
    const int64_t T = detail::Counts::total(bytes.recv) / rec;
    char* in = static_cast<char*>(ws.take_bytes(T * rec));
    comm_->all_to_all_v(out, bytes.send, in, bytes.recv);

    const detail::ActivationRows a1 = detail::take_rows(req.spec, T, H, a_local.scale.scale, ws);
    DispatchedBatch b;
    b.a1 = a1.a1;
    b.a1_scale = a1.scale;
    b.topk_ids = ws.take(DType::kI32, {T, k});
    b.topk_weights = ws.take(DType::kF32, {T, k});
    for (int64_t i = 0; i < T; ++i) {
      const char* r = in + i * rec;
      std::memcpy(b.topk_ids.row<int32_t>(i), r, k * 4);
      std::memcpy(b.topk_weights.row<float>(i), r + k * 4, k * 4);
      if (row.scale) std::memcpy(a1.scale_row(i), r + 8 * k, row.scale);
      std::memcpy(a1.codes(i), r + 8 * k + row.scale, row.codes);
    }
    local_ids_ = b.topk_ids;
    count_dispatch(sent + detail::Counts::total(bytes.send) - bytes.send[rank()], start);
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
  // One token's record: its routing (8 bytes a slot) and its row (codes + scale row).
  static int64_t record_bytes(int64_t row_bytes, int64_t k) {
    return round_up(8 * k + row_bytes, 16);
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
