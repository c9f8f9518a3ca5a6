// Naive DP/EP: all-gather tokens (codes and their scale rows), ids and weights; every rank runs
// its local experts over the whole gathered batch; weight-and-reduce into fp32 partials;
// reduce-scatter back to the owners.
#include "dist/ep_common.h"
#include "modular/dispatch_util.h"

namespace moekit {

namespace {

class NaivePrepareFinalize final : public detail::EpPrepareFinalize {
 public:
  NaivePrepareFinalize(std::shared_ptr<Communicator> comm, ExpertMap map)
      : EpPrepareFinalize(std::move(comm), std::move(map), "naive-ep") {}

  size_t workspace_size(const MoEProblem& p) const override {
    const int64_t M = p.tokens, T = max_dispatched_tokens(p), H = p.hidden, k = p.top_k;
    // a_local [M, H] (+ scales) + a1 [T, H] (+ scales) + ids/weights to send [M, k] x2 +
    // gathered ids/weights, local ids, dispatched weights [T, k] x4 + partial [T, H] + recv
    // [M, H] fp32.
    return detail::prepare_activations_workspace(p, M) + detail::rows_workspace(p, T) +
           2 * Workspace::aligned(M * k * 4) + 4 * Workspace::aligned(T * k * 4) +
           Workspace::aligned(T * H * 4) + Workspace::aligned(M * H * 4);
  }

  DispatchedBatch prepare(const PrepareRequest& req, Workspace& ws, const ExecContext&) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t M = req.x.size(0), H = req.x.size(1), k = req.topk_ids.size(1);
    headers_ = comm_->all_gather(Header{M, req.token_key_offset});
    total_ = 0;
    for (const Header& h : headers_) total_ += h.rows;

    int64_t sent = 0;
    const detail::ActivationRows a_local = detail::prepare_activations(req, ws, agreed_amax(&sent));
    // Contiguous copies of the caller's routing to send.
    const TensorView ids_send = ws.take(DType::kI32, {M, k}), w_send = ws.take(DType::kF32, {M, k});
    for (int64_t t = 0; t < M; ++t)
      for (int64_t s = 0; s < k; ++s) {
        ids_send.row<int32_t>(t)[s] = req.topk_ids.row<int32_t>(t)[s];
        w_send.row<float>(t)[s] = req.topk_weights.row<float>(t)[s];
      }

    // Codes and their scale rows travel as two gathers; a per-tensor scale is the same on
    // every rank (agreed or static) and stays.
    const detail::ActivationRows a1 =
        detail::take_rows(req.spec, total_, H, a_local.scale.scale, ws);
    ids_ = ws.take(DType::kI32, {total_, k});
    weights_ = ws.take(DType::kF32, {total_, k});
    gather_rows(a_local.codes(0), a1.bytes.codes, a1.codes(0));
    if (a1.bytes.scale) gather_rows(a_local.scale_row(0), a1.bytes.scale, a1.scale_row(0));
    gather_rows(ids_send.data, k * 4, ids_.data);
    gather_rows(w_send.data, k * 4, weights_.data);

    DispatchedBatch b;
    b.a1 = a1.a1;
    b.a1_scale = a1.scale;
    b.topk_ids = ws.take(DType::kI32, {total_, k});
    b.topk_weights = ws.take(DType::kF32, {total_, k});
    int64_t row = 0;
    for (int r = 0; r < R; ++r)
      for (int64_t t = 0; t < headers_[r].rows; ++t, ++row) {
        const int64_t key = detail::token_key(r, headers_[r].key_offset + t);
        for (int64_t s = 0; s < k; ++s) {
          const int32_t e = ids_.row<int32_t>(row)[s];
          b.topk_ids.row<int32_t>(row)[s] = e < 0 ? -1 : map_.local_id(rank(), e, key);
          b.topk_weights.row<float>(row)[s] =
              req.weight_on_input ? 1.0f : weights_.row<float>(row)[s];
        }
      }
    count_dispatch(sent + (R - 1) * M * (a1.bytes.total() + 8 * k), start);
    return b;
  }

  void finalize(const FinalizeRequest& req, Workspace& ws, const ExecContext& ctx) override {
    const auto start = Clock::now();
    const int R = comm_->size();
    const int64_t H = req.y.size(1), M = req.y.size(0);
    // Contract 2: weight with the callers' routing (all ranks' original ids and weights).
    const TensorView partial = ws.take(DType::kF32, {total_, H});
    req.weight_and_reduce->apply(req.fused_out, ids_, weights_, req.applied, partial, ctx);
    const TensorView mine = ws.take(DType::kF32, {M, H});
    std::vector<size_t> counts(R);
    for (int r = 0; r < R; ++r) counts[r] = headers_[r].rows * H;
    comm_->reduce_scatter_v(partial.ptr<float>(), mine.ptr<float>(), counts);
    detail::convert_activations(mine, TensorView{}, false, req.y);
    count_combine((total_ - M) * H * 4, start);
  }

 private:
  // All-gathers rows of row_bytes each (this rank's headers_[rank].rows of them).
  void gather_rows(const void* send, int64_t row_bytes, void* recv) {
    std::vector<size_t> bytes(comm_->size());
    for (int r = 0; r < comm_->size(); ++r) bytes[r] = headers_[r].rows * row_bytes;
    comm_->all_gather_v(send, bytes[rank()], recv, bytes);
  }

  struct Header {
    int64_t rows, key_offset;
  };
  std::vector<Header> headers_;  // per rank, this round
  int64_t total_ = 0;            // T: gathered rows
  TensorView ids_, weights_;     // [T, k] the callers' routing, gathered
};

}  // namespace

std::shared_ptr<DistributedPrepareFinalize> make_naive_prepare_finalize(
    std::shared_ptr<Communicator> comm, ExpertMap map) {
  return std::make_shared<NaivePrepareFinalize>(std::move(comm), std::move(map));
}

}  // namespace moekit
