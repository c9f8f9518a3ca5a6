// Error of a benchmarked forward against the fp64 oracle (reference_moe), on a sample of rows:
// the oracle is plain loops in double, far too slow for every token of a large batch.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "bench_layer.h"

namespace moekit::cli {

// What max_rel_err means, for the JSON next to the number.
inline constexpr std::string_view kErrMetric =
    "max over checked tokens of max_h |y - ref| / max_h |ref|, ref = fp64 oracle";

struct OracleCheck {
  double max_rel_err = 0;
  std::vector<int64_t> rows;  // the rows checked
};

// Compares up to `max_rows` rows of y (spread evenly over the batch, first and last included)
// with the oracle on the same inputs, regenerating only the experts those rows use.
OracleCheck check_sampled_rows(const BenchLayer& layer, const TensorView& x,
                               const TensorView& topk_ids, const TensorView& topk_weights,
                               const TensorView& y, int max_rows, int threads);

}  // namespace moekit::cli
