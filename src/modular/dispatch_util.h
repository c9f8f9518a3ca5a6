// Helpers every PrepareFinalize shares (internal header): id mapping keys, and the activations
// that prepare hands the experts -- converted or quantized rows with their typed scale
// (contract 4), addressable as bytes so that the exchanges move each row's scale with its codes.
#pragma once

#include <functional>

#include "moekit/modular.h"

namespace moekit::detail {

// Key that names a token across ranks for replica choice: source rank in the high half.
inline int64_t token_key(int source_rank, int64_t row) {
  return (static_cast<int64_t>(source_rank) << 32) + row;
}

// out [M, H] (out.dtype) = x [M, H], rows multiplied by weights[t, 0] when weight_on_input.
// The product is formed in fp32 and rounded once, to out.dtype.
void convert_activations(const TensorView& x, const TensorView& topk_weights, bool weight_on_input,
                         const TensorView& out);

// The reason a prepare/finalize over `map` cannot run `p`, when their E differ.
std::optional<std::string> expert_count_mismatch(const MoEProblem& p, const ExpertMap& map);

// "fp8_e4m3 per-block (group 128, ue8m0 scales)", "bf16": an activation spec for messages.
std::string describe(const ActivationSpec& spec);

// nullopt when the host quantizer (quant/quantize.h) produces `spec` and a host prepare can
// move it, else the reason: unscaled float activations, or fp8 e4m3 / int8 codes with a
// per-tensor (fp32, static or dynamic), per-token (fp32) or per-block (fp32 or ue8m0, group >= 1)
// scale; a static scale is per-tensor only, [1] fp32 in host memory.
std::optional<std::string> host_dispatch_refusal(const ActivationSpec& spec);

// Bytes of one dispatched row: its codes, and for per-token and per-block scales its scale row.
// A per-tensor scale is one scalar for all rows, equal on every rank: it never travels per row.
struct RowBytes {
  int64_t codes = 0, scale = 0;
  int64_t total() const { return codes + scale; }
};
RowBytes row_bytes(const ActivationSpec& spec, int64_t hidden);

// Activations in the experts' spec: a1 [rows, H] contiguous and its scale (kTensor [1];
// kToken [rows] fp32; kBlock [rows, ceil(H / group)]; kNone absent), with byte access to row r.
struct ActivationRows {
  TensorView a1;
  ActivationScale scale;
  RowBytes bytes;
  char* codes(int64_t row) const { return static_cast<char*>(a1.data) + row * bytes.codes; }
  char* scale_row(int64_t row) const {  // bytes.scale > 0 only
    return static_cast<char*>(scale.scale.data) + row * bytes.scale;
  }
};

// Receive side: room for `rows` rows of `spec` from ws. A per-tensor scale is `tensor_scale`
// (the [1] scalar the sender used: every rank holds the same one).
ActivationRows take_rows(const ActivationSpec& spec, int64_t rows, int64_t hidden,
                         const TensorView& tensor_scale, Workspace& ws);

// Maps this rank's amax of a dynamic per-tensor activation to the amax the scale is taken from:
// distributed prepares return the max over ranks (a collective every rank calls once per
// prepare), so that one scalar covers every rank's rows.
using AmaxAgreement = std::function<float(float)>;

// Send side: x as the experts want it (req.spec), multiplied by its top-1 weight first when the
// weight is applied on the input (the fp32 product is what gets quantized). Unscaled float
// specs: x itself when it already is contiguous in that dtype, else a converted copy. Quantized
// specs: quantize_activations; a dynamic per-tensor scale is tensor_scale_of_amax of
// agree(activation_amax(rows)) (no agreement: this call's rows alone), applied as a static one.
ActivationRows prepare_activations(const PrepareRequest& req, Workspace& ws,
                                   const AmaxAgreement& agree = nullptr);

// The activation spec of p's format (ActivationSpec::of(p.quant)): experts with scaled
// activations ask for exactly its layout (ModularKernel::check_compatible), so workspaces and
// exchanges are sized from it; unscaled activations are bounded by 4 bytes per element.
ActivationSpec format_spec(const MoEProblem& p);
// Upper bound of one row's bytes for p: codes of at most 4 bytes per element, plus its scale row.
int64_t max_row_bytes(const MoEProblem& p);
// Upper bounds of the workspace take_rows and prepare_activations take for `rows` rows of p.
size_t rows_workspace(const MoEProblem& p, int64_t rows);
size_t prepare_activations_workspace(const MoEProblem& p, int64_t rows);

}  // namespace moekit::detail
