// The grouped path's combine and the gather's backward on the CPU, one pass over the kept rows each; the
// router's slot arithmetic (a choice's rank among its expert's choices, DeepSpeed's top-2 queue), counting
// passes instead of sorts; its top-1 and top-2 choices, one pass over the scores; DeepSpeed's top-1 capacity
// rule, one pass over topk's picks; and the grouped plan's rows (each kept choice's row, each row's token),
// one pass over the choices.
//
// The torch-operator path (ds_tutel/dispatch/grouped.py) makes several passes per direction (products into a buffer,
// index_add_, a gather, a sum, a scaling) and allocates a buffer for each. These loops go token by token: a
// token reads its own kept rows and writes its own output row once, so no output needs zeroing first, no two
// threads write the same row, and the additions happen in a fixed order (a token's choices in row order, that
// is expert after expert, as index_add_ adds them in the torch path). Built without floating-point contraction,
// so a product and a sum round exactly as the torch path's separate operators do.
//
// Shape legend: S tokens, K choices per token, M model dim, E experts, J kept rows (expert after expert),
// P rows the experts run on (J plus bucketed pad rows). row_SK[s][k] is the kept row of choice (s, k) among
// the J, or -1 where the choice was dropped.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Where every kept row lives: rows_E[e] rows of expert e, each at a row stride, possibly followed by pad rows.
template <typename T>
std::vector<T*> row_pointers(const std::vector<torch::Tensor>& tensors_E, const std::vector<int64_t>& rows_E) {
  std::vector<T*> row_J;
  for (size_t e = 0; e < tensors_E.size(); ++e) {
    T* base = tensors_E[e].data_ptr<T>();
    const int64_t stride = tensors_E[e].stride(0);
    for (int64_t r = 0; r < rows_E[e]; ++r) row_J.push_back(base + r * stride);
  }
  return row_J;
}

// A token's kept choices as (row, choice) in row order: at most K, sorted by insertion (K is small).
inline int64_t kept_in_row_order(const int64_t* row_K, int64_t K, int64_t* rows, int64_t* choices) {
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t row = row_K[k];
    if (row < 0) continue;
    int64_t i = n++;
    for (; i > 0 && rows[i - 1] > row; --i) {
      rows[i] = rows[i - 1];
      choices[i] = choices[i - 1];
    }
    rows[i] = row;
    choices[i] = k;
  }
  return n;
}

void check_layout(const std::vector<torch::Tensor>& tensors_E, const std::vector<int64_t>& rows_E,
                  const torch::Tensor& row_SK, int64_t M) {
  TORCH_CHECK(!tensors_E.empty() && tensors_E.size() == rows_E.size(), "one tensor and one row count per expert");
  TORCH_CHECK(row_SK.dim() == 2 && row_SK.scalar_type() == torch::kInt64 && row_SK.is_contiguous(),
              "row_SK must be a contiguous int64 [S, K] tensor");
  for (size_t e = 0; e < tensors_E.size(); ++e) {
    const auto& t = tensors_E[e];
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.size(1) == M && t.size(0) >= rows_E[e],
                "expert ", e, ": expected a CPU [>= ", rows_E[e], ", ", M, "] tensor, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == tensors_E[0].scalar_type(), "all experts' tensors must share a dtype");
    TORCH_CHECK(t.size(0) == 0 || t.stride(1) == 1, "expert ", e, ": rows must be contiguous");
  }
}

constexpr int64_t kGrainTokens = 16;
constexpr int64_t kDotLanes = 16;

// Element access for the loops below. bf16 goes through its bits, which the compiler vectorizes; the rounding is
// c10's: to nearest even, any NaN to 0x7FC0.
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

inline uint16_t float_to_bf16_bits(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof word);
  const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
  return (word & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

template <typename scalar_t>
struct Elements {
  using raw_t = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  static acc_t widen(raw_t v) { return static_cast<acc_t>(v); }
  static raw_t narrow(acc_t v) { return static_cast<raw_t>(v); }
};

template <>
struct Elements<c10::BFloat16> {
  using raw_t = uint16_t;
  using acc_t = float;
  static acc_t widen(raw_t v) { return bf16_bits_to_float(v); }
  static raw_t narrow(acc_t v) { return float_to_bf16_bits(v); }
};

template <typename scalar_t>
const typename Elements<scalar_t>::raw_t* raw(const scalar_t* p) {
  return reinterpret_cast<const typename Elements<scalar_t>::raw_t*>(p);
}

template <typename scalar_t>
typename Elements<scalar_t>::raw_t* raw(scalar_t* p) {
  return reinterpret_cast<typename Elements<scalar_t>::raw_t*>(p);
}

// A row's share of a token's sum: weight * x in acc_t where kWeighted, else x (widened).
template <typename scalar_t, typename acc_t, bool kWeighted>
inline acc_t term(acc_t weight, typename Elements<scalar_t>::raw_t x) {
  const acc_t value = Elements<scalar_t>::widen(x);
  if (kWeighted) return weight * value;
  return value;
}

// out_SM[s] = sum over s's kept choices, in row order, of weight * row_J[row], accumulated in acc_t from 0 and
// rounded once (weight: gate_SK[s][k] where kWeighted, else 1; tokens without a kept choice get zeros). Both the
// combine and the gather's backward are this sum; kWeighted is a template argument so that each gets its own
// loop. One and two kept rows (k <= 2, nearly every token) have loops of their own that keep the sum in
// registers; more rows go through an acc_t row buffer. Either way each element is ((0 + t_1) + t_2) + ...
template <typename scalar_t, typename acc_t, bool kWeighted>
void sum_kept_rows(const int64_t* row_SK, const acc_t* gate_SK, const std::vector<scalar_t*>& row_J, int64_t S,
                   int64_t K, int64_t M, scalar_t* out_SM) {
  using E = Elements<scalar_t>;
  at::parallel_for(0, S, kGrainTokens, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_M(K > 2 ? M : 0);
    std::vector<int64_t> rows(K), choices(K);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t n = kept_in_row_order(row_SK + s * K, K, rows.data(), choices.data());
      auto* out = raw(out_SM + s * M);
      const acc_t w0 = kWeighted && n > 0 ? gate_SK[s * K + choices[0]] : acc_t(1);
      const acc_t w1 = kWeighted && n > 1 ? gate_SK[s * K + choices[1]] : acc_t(1);
      if (n == 0) {
        std::memset(out, 0, sizeof(scalar_t) * M);
      } else if (n == 1 && !kWeighted) {  // one unweighted row: a copy
        std::memcpy(out, row_J[rows[0]], sizeof(scalar_t) * M);
      } else if (n == 1) {
        const auto* x0 = raw(row_J[rows[0]]);
        for (int64_t m = 0; m < M; ++m) out[m] = E::narrow(acc_t(0) + term<scalar_t, acc_t, kWeighted>(w0, x0[m]));
      } else if (n == 2) {
        const auto* x0 = raw(row_J[rows[0]]);
        const auto* x1 = raw(row_J[rows[1]]);
        for (int64_t m = 0; m < M; ++m) {
          const acc_t first = acc_t(0) + term<scalar_t, acc_t, kWeighted>(w0, x0[m]);
          out[m] = E::narrow(first + term<scalar_t, acc_t, kWeighted>(w1, x1[m]));
        }
      } else {
        acc_t* acc = acc_M.data();
        std::fill(acc, acc + M, acc_t(0));
        for (int64_t i = 0; i < n; ++i) {
          const auto* x = raw(row_J[rows[i]]);
          const acc_t w = kWeighted ? gate_SK[s * K + choices[i]] : acc_t(1);
          for (int64_t m = 0; m < M; ++m) acc[m] = acc[m] + term<scalar_t, acc_t, kWeighted>(w, x[m]);
        }
        for (int64_t m = 0; m < M; ++m) out[m] = E::narrow(acc[m]);
      }
    }
  });
}

// One kept choice's part of the combine's backward: grad[m] = gate * dy[m] rounded to the dtype, and <dy, out>
// in acc_t, summed in kDotLanes interleaved partial sums (a single running sum is a chain of dependent additions
// the compiler may not reorder, no fast-math; the lanes vectorize).
template <typename scalar_t, typename acc_t>
acc_t scale_and_dot(acc_t gate, const scalar_t* dy_in, const scalar_t* out_in, scalar_t* grad_in, int64_t M) {
  using E = Elements<scalar_t>;
  const auto* __restrict__ dy = raw(dy_in);
  const auto* __restrict__ out = raw(out_in);
  auto* __restrict__ grad = raw(grad_in);
  for (int64_t m = 0; m < M; ++m) grad[m] = E::narrow(gate * E::widen(dy[m]));
  acc_t lanes[kDotLanes] = {};
  int64_t m = 0;
  for (; m + kDotLanes <= M; m += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) {
      const acc_t product = E::widen(dy[m + l]) * E::widen(out[m + l]);
      lanes[l] = lanes[l] + product;
    }
  }
  for (int64_t l = 0; m < M; ++m, ++l) {
    const acc_t product = E::widen(dy[m]) * E::widen(out[m]);
    lanes[l] = lanes[l] + product;
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kDotLanes; ++l) sum = sum + lanes[l];
  return sum;
}

}  // namespace

// y_SM[s] = sum over s's kept choices, in row order, of gates_SK[s][k] * out row, accumulated in acc_t and
// rounded once into the outputs' dtype. Tokens without a kept choice get zeros.
torch::Tensor combine_forward(torch::Tensor row_SK, torch::Tensor gates_SK, std::vector<torch::Tensor> outs_E,
                              std::vector<int64_t> rows_E) {
  const int64_t S = row_SK.size(0), K = row_SK.size(1), M = outs_E.at(0).size(1);
  check_layout(outs_E, rows_E, row_SK, M);
  auto y_SM = torch::empty({S, M}, outs_E[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, y_SM.scalar_type(), "combine_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(gates_SK.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && gates_SK.is_contiguous(),
                "gates_SK must be contiguous in the accumulation dtype");
    sum_kept_rows<scalar_t, acc_t, true>(row_SK.data_ptr<int64_t>(), gates_SK.data_ptr<acc_t>(),
                                   row_pointers<scalar_t>(outs_E, rows_E), S, K, M, y_SM.data_ptr<scalar_t>());
  });
  return y_SM;
}

// The combine's backward: grad_gates_SK[s][k] = <dy_SM[s], out row> (zero where dropped) and the outputs'
// gradient gates_SK[s][k] * dy_SM[s], rounded once into their dtype, one tensor per expert of the rows it ran
// on (expert_rows_E[e], pad rows zero). One tensor per expert rather than one buffer: each is freed as soon as
// its expert's backward is done, which kept peak memory lower. Returns [grad_gates_SK, grad_out_pM per expert].
std::vector<torch::Tensor> combine_backward(torch::Tensor row_SK, torch::Tensor gates_SK, torch::Tensor dy_SM,
                                            std::vector<torch::Tensor> outs_E, std::vector<int64_t> rows_E,
                                            std::vector<int64_t> expert_rows_E) {
  const int64_t S = row_SK.size(0), K = row_SK.size(1), M = dy_SM.size(1);
  check_layout(outs_E, rows_E, row_SK, M);
  TORCH_CHECK(expert_rows_E.size() == rows_E.size(), "one padded row count per expert");
  dy_SM = dy_SM.contiguous();
  for (size_t e = 0; e < rows_E.size(); ++e) {
    TORCH_CHECK(expert_rows_E[e] >= rows_E[e], "an expert runs on at least its kept rows");
  }
  std::vector<torch::Tensor> results{torch::zeros_like(gates_SK)};
  for (size_t e = 0; e < rows_E.size(); ++e) results.push_back(torch::empty({expert_rows_E[e], M}, outs_E[0].options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, dy_SM.scalar_type(), "combine_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(gates_SK.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && gates_SK.is_contiguous(),
                "gates_SK must be contiguous in the accumulation dtype");
    TORCH_CHECK(outs_E[0].scalar_type() == dy_SM.scalar_type(), "dy_SM must have the outputs' dtype");
    const auto out_J = row_pointers<scalar_t>(outs_E, rows_E);
    const std::vector<torch::Tensor> grads_E(results.begin() + 1, results.end());
    const auto grad_J = row_pointers<scalar_t>(grads_E, rows_E);
    for (size_t e = 0; e < rows_E.size(); ++e) {
      if (expert_rows_E[e] > rows_E[e]) grads_E[e].narrow(0, rows_E[e], expert_rows_E[e] - rows_E[e]).zero_();
    }
    const int64_t* row = row_SK.data_ptr<int64_t>();
    const acc_t* gate = gates_SK.data_ptr<acc_t>();
    acc_t* grad_gate = results[0].data_ptr<acc_t>();
    const scalar_t* dy = dy_SM.data_ptr<scalar_t>();
    at::parallel_for(0, S, kGrainTokens, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* dy_row = dy + s * M;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t j = row[s * K + k];
          if (j < 0) continue;
          grad_gate[s * K + k] = scale_and_dot<scalar_t, acc_t>(gate[s * K + k], dy_row, out_J[j], grad_J[j], M);
        }
      }
    });
  });
  return results;
}

// The gather's backward: dx_SM[s] = sum over s's kept choices, in row order, of the gradient of the row the
// choice was gathered into, accumulated in acc_t and rounded once. Tokens without a kept choice get zeros.
torch::Tensor gather_backward(torch::Tensor row_SK, std::vector<torch::Tensor> grads_E, std::vector<int64_t> rows_E) {
  const int64_t S = row_SK.size(0), K = row_SK.size(1), M = grads_E.at(0).size(1);
  check_layout(grads_E, rows_E, row_SK, M);
  auto dx_SM = torch::empty({S, M}, grads_E[0].options());
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, dx_SM.scalar_type(), "gather_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sum_kept_rows<scalar_t, acc_t, false>(row_SK.data_ptr<int64_t>(), nullptr, row_pointers<scalar_t>(grads_E, rows_E),
                                   S, K, M, dx_SM.data_ptr<scalar_t>());
  });
  return dx_SM;
}

namespace {

int64_t checked_group(int64_t group, int64_t G) {
  TORCH_CHECK(group >= 0, "groups must be non-negative, got ", group);
  return std::min(group, G);
}

void check_groups(const torch::Tensor& group_J, int64_t G) {
  TORCH_CHECK(group_J.device().is_cpu() && group_J.dim() == 1 && group_J.scalar_type() == torch::kInt64,
              "group_J must be a CPU int64 vector");
  TORCH_CHECK(G >= 0, "num_groups must be non-negative");
}

}  // namespace

// rank_J[j] = how many earlier elements (in J order) share j's group, every group >= G counting as group G;
// counts_G = the sizes of groups 0..G-1. One pass: the integers of ds_tutel/slots.py's stable sort.
std::vector<torch::Tensor> rank_within_groups(torch::Tensor group_J, int64_t G) {
  check_groups(group_J, G);
  group_J = group_J.contiguous();
  const int64_t J = group_J.numel();
  auto rank_J = torch::empty({J}, group_J.options());
  auto counts_G = torch::zeros({G + 1}, group_J.options());
  const int64_t* group = group_J.data_ptr<int64_t>();
  int64_t* rank = rank_J.data_ptr<int64_t>();
  int64_t* count = counts_G.data_ptr<int64_t>();
  for (int64_t j = 0; j < J; ++j) rank[j] = count[checked_group(group[j], G)]++;
  return {rank_J, counts_G.narrow(0, 0, G)};
}

// rank_J[j] = j's place in its group ordered by descending score, equal scores in J order, NaN above every number
// (as torch's stable descending sort orders them); groups >= G count as group G. A counting sort by group, then
// a stable sort of each group by score.
torch::Tensor rank_by_score_within_groups(torch::Tensor group_J, torch::Tensor score_J, int64_t G) {
  check_groups(group_J, G);
  TORCH_CHECK(score_J.device().is_cpu() && score_J.dim() == 1 && score_J.numel() == group_J.numel(),
              "score_J must be a CPU vector as long as group_J");
  group_J = group_J.contiguous();
  score_J = score_J.contiguous();
  const int64_t J = group_J.numel();
  const int64_t* group = group_J.data_ptr<int64_t>();
  std::vector<int64_t> start_G(G + 2, 0);
  for (int64_t j = 0; j < J; ++j) ++start_G[checked_group(group[j], G) + 1];
  for (int64_t g = 0; g <= G; ++g) start_G[g + 1] += start_G[g];
  std::vector<int64_t> order_J(J), next_G(start_G.begin(), start_G.end() - 1);
  for (int64_t j = 0; j < J; ++j) order_J[next_G[std::min(group[j], G)]++] = j;
  auto rank_J = torch::empty({J}, group_J.options());
  int64_t* rank = rank_J.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, score_J.scalar_type(), "rank_by_score", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* score = score_J.data_ptr<scalar_t>();
    const auto above = [score](int64_t a, int64_t b) {
      const acc_t x = static_cast<acc_t>(score[a]), y = static_cast<acc_t>(score[b]);
      return (std::isnan(x) && !std::isnan(y)) || x > y;
    };
    for (int64_t g = 0; g <= G; ++g) {
      const auto first = order_J.begin() + start_G[g], last = order_J.begin() + start_G[g + 1];
      std::stable_sort(first, last, above);
      for (auto it = first; it != last; ++it) rank[*it] = it - first;
    }
  });
  return rank_J;
}

namespace {

// torch.argmax's pick over n scores: the first NaN if any, else the first of the largest (-0 equals 0).
// `skip` (or -1) is read as -inf, as a score overwritten with -inf would be.
inline int64_t argmax_of(const float* score, int64_t n, int64_t skip) {
  const float minus_inf = -std::numeric_limits<float>::infinity();
  int64_t best = 0;
  float best_value = skip == 0 ? minus_inf : score[0];
  for (int64_t e = 1; e < n && !std::isnan(best_value); ++e) {
    const float value = e == skip ? minus_inf : score[e];
    if (std::isnan(value) || value > best_value) {
      best = e;
      best_value = value;
    }
  }
  return best;
}

void check_scores(const torch::Tensor& score_SE, const char* name) {
  TORCH_CHECK(score_SE.device().is_cpu() && score_SE.dim() == 2 && score_SE.scalar_type() == torch::kFloat32 &&
                  score_SE.size(1) > 0,
              name, " must be a CPU float32 [S, E] tensor with E > 0");
}

}  // namespace

// choice_S = argmax(score_SE, dim=1), torch's tie and NaN rules.
torch::Tensor argmax_rows(torch::Tensor score_SE) {
  check_scores(score_SE, "score_SE");
  score_SE = score_SE.contiguous();
  const int64_t S = score_SE.size(0), E = score_SE.size(1);
  auto choice_S = torch::empty({S}, score_SE.options().dtype(torch::kInt64));
  const float* score = score_SE.data_ptr<float>();
  int64_t* choice = choice_S.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) choice[s] = argmax_of(score + s * E, E, -1);
  return choice_S;
}

// DeepSpeed's top-2 choices: first_S = argmax(first_SE, dim=1), then second_S = argmax of second_SE with the
// first choice's score overwritten by -inf. Returns choice_SK [S, 2].
torch::Tensor top2_rows(torch::Tensor first_SE, torch::Tensor second_SE) {
  check_scores(first_SE, "first_SE");
  check_scores(second_SE, "second_SE");
  TORCH_CHECK(first_SE.sizes() == second_SE.sizes(), "first_SE and second_SE must have one shape");
  first_SE = first_SE.contiguous();
  second_SE = second_SE.contiguous();
  const int64_t S = first_SE.size(0), E = first_SE.size(1);
  auto choice_SK = torch::empty({S, 2}, first_SE.options().dtype(torch::kInt64));
  const float* first = first_SE.data_ptr<float>();
  const float* second = second_SE.data_ptr<float>();
  int64_t* choice = choice_SK.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t top = argmax_of(first + s * E, E, -1);
    choice[2 * s] = top;
    choice[2 * s + 1] = argmax_of(second + s * E, E, top);
  }
  return choice_SK;
}

// DeepSpeed's top-2 slots: a first choice's place among the first choices of its expert (token order), a second
// choice's place among the second choices of its expert, behind all of that expert's first choices. Tokens
// with used_S false (when given, else None) take no slot and are not counted; their locations are -1. Returns
// [location_SK [S, 2], counts1_E, counts2_E].
std::vector<torch::Tensor> top2_slots(torch::Tensor choice_SK, c10::optional<torch::Tensor> used_S, int64_t E) {
  TORCH_CHECK(choice_SK.device().is_cpu() && choice_SK.dim() == 2 && choice_SK.size(1) == 2 &&
                  choice_SK.scalar_type() == torch::kInt64,
              "choice_SK must be a CPU int64 [S, 2] tensor");
  TORCH_CHECK(E > 0, "num_experts must be positive");
  choice_SK = choice_SK.contiguous();
  const int64_t S = choice_SK.size(0);
  const bool* used = nullptr;
  torch::Tensor used_contiguous;
  if (used_S.has_value()) {
    TORCH_CHECK(used_S->device().is_cpu() && used_S->scalar_type() == torch::kBool && used_S->dim() == 1 &&
                    used_S->numel() == S,
                "used_S must be None or a CPU bool vector of S entries");
    used_contiguous = used_S->contiguous();
    used = used_contiguous.data_ptr<bool>();
  }
  const int64_t* choice = choice_SK.data_ptr<int64_t>();
  auto location_SK = torch::empty({S, 2}, choice_SK.options());
  auto counts1_E = torch::zeros({E}, choice_SK.options());
  auto counts2_E = torch::zeros({E}, choice_SK.options());
  int64_t* location = location_SK.data_ptr<int64_t>();
  int64_t* counts1 = counts1_E.data_ptr<int64_t>();
  int64_t* counts2 = counts2_E.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    if (used != nullptr && !used[s]) {
      location[2 * s] = location[2 * s + 1] = -1;
      continue;
    }
    const int64_t first = choice[2 * s], second = choice[2 * s + 1];
    TORCH_CHECK(first >= 0 && first < E && second >= 0 && second < E, "choices must lie in [0, ", E, ")");
    location[2 * s] = counts1[first]++;
    location[2 * s + 1] = counts2[second]++;
  }
  for (int64_t s = 0; s < S; ++s) {
    if (location[2 * s + 1] >= 0) location[2 * s + 1] += counts1[choice[2 * s + 1]];
  }
  return {location_SK, counts1_E, counts2_E};
}

// DeepSpeed's top-1 capacity rule, given torch.topk's picks down each expert's column of the [S, E] table
// (top_CE[c][e] = a token): kept_S[s] = wanted_S[s] and s is among the picks of its own expert's column.
torch::Tensor own_column_picks(torch::Tensor top_CE, torch::Tensor choice_S, torch::Tensor wanted_S) {
  TORCH_CHECK(top_CE.device().is_cpu() && top_CE.dim() == 2 && top_CE.scalar_type() == torch::kInt64,
              "top_CE must be a CPU int64 [C, E] tensor");
  TORCH_CHECK(choice_S.device().is_cpu() && choice_S.dim() == 1 && choice_S.scalar_type() == torch::kInt64,
              "choice_S must be a CPU int64 vector");
  TORCH_CHECK(wanted_S.device().is_cpu() && wanted_S.scalar_type() == torch::kBool &&
                  wanted_S.sizes() == choice_S.sizes(),
              "wanted_S must be a CPU bool vector as long as choice_S");
  top_CE = top_CE.contiguous();
  choice_S = choice_S.contiguous();
  wanted_S = wanted_S.contiguous();
  const int64_t C = top_CE.size(0), E = top_CE.size(1), S = choice_S.numel();
  auto kept_S = torch::zeros({S}, wanted_S.options());
  const int64_t* top = top_CE.data_ptr<int64_t>();
  const int64_t* choice = choice_S.data_ptr<int64_t>();
  const bool* wanted = wanted_S.data_ptr<bool>();
  bool* kept = kept_S.data_ptr<bool>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s = top[c * E + e];
      TORCH_CHECK(s >= 0 && s < S, "a pick must be a token index in [0, ", S, "), got ", s);
      if (choice[s] == e && wanted[s]) kept[s] = true;
    }
  }
  return kept_S;
}

// The grouped plan's integers. Kept choices (location >= 0) of expert e hold the slots 0..n_e-1; rows go expert
// after expert, slot order inside an expert. Returns [row_SK (a kept choice's row among the J, else -1),
// token_J (each row's token), rows_E (n_e)].
std::vector<torch::Tensor> grouped_rows(torch::Tensor indices_SK, torch::Tensor locations_SK, int64_t E) {
  TORCH_CHECK(indices_SK.device().is_cpu() && indices_SK.dim() == 2 && indices_SK.scalar_type() == torch::kInt64 &&
                  locations_SK.sizes() == indices_SK.sizes() && locations_SK.scalar_type() == torch::kInt64 &&
                  locations_SK.device().is_cpu(),
              "indices_SK and locations_SK must be CPU int64 tensors of one [S, K] shape");
  TORCH_CHECK(E > 0, "num_experts must be positive");
  indices_SK = indices_SK.contiguous();
  locations_SK = locations_SK.contiguous();
  const int64_t S = indices_SK.size(0), K = indices_SK.size(1), N = S * K;
  const int64_t* expert = indices_SK.data_ptr<int64_t>();
  const int64_t* location = locations_SK.data_ptr<int64_t>();
  auto rows_E = torch::zeros({E}, indices_SK.options());
  int64_t* rows = rows_E.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j) {
    if (location[j] < 0) continue;
    TORCH_CHECK(expert[j] >= 0 && expert[j] < E, "a kept choice's expert must lie in [0, ", E, "), got ", expert[j]);
    ++rows[expert[j]];
  }
  std::vector<int64_t> start_E(E);
  int64_t J = 0;
  for (int64_t e = 0; e < E; ++e) {
    start_E[e] = J;
    J += rows[e];
  }
  auto row_SK = torch::empty({S, K}, indices_SK.options());
  auto token_J = torch::empty({J}, indices_SK.options());
  int64_t* row = row_SK.data_ptr<int64_t>();
  int64_t* token = token_J.data_ptr<int64_t>();
  std::vector<char> taken_J(J, 0);
  for (int64_t j = 0; j < N; ++j) {
    if (location[j] < 0) {
      row[j] = -1;
      continue;
    }
    const int64_t e = expert[j], slot = location[j];
    TORCH_CHECK(slot < rows[e] && !taken_J[start_E[e] + slot], "the kept choices of expert ", e,
                " must hold its slots 0..", rows[e] - 1, " once each; slot ", slot, " breaks that");
    taken_J[start_E[e] + slot] = 1;
    row[j] = start_E[e] + slot;
    token[row[j]] = j / K;
  }
  return {row_SK, token_J, rows_E};
}

// token_J laid out with expert e's segment grown from rows_E[e] to expert_rows_E[e] entries (pad entries 0).
torch::Tensor padded_tokens(torch::Tensor token_J, std::vector<int64_t> rows_E, std::vector<int64_t> expert_rows_E) {
  TORCH_CHECK(token_J.device().is_cpu() && token_J.dim() == 1 && token_J.scalar_type() == torch::kInt64 &&
                  token_J.is_contiguous(),
              "token_J must be a contiguous CPU int64 vector");
  TORCH_CHECK(rows_E.size() == expert_rows_E.size(), "one padded row count per expert");
  int64_t J = 0, P = 0;
  for (size_t e = 0; e < rows_E.size(); ++e) {
    TORCH_CHECK(rows_E[e] >= 0 && expert_rows_E[e] >= rows_E[e], "an expert runs on at least its kept rows");
    J += rows_E[e];
    P += expert_rows_E[e];
  }
  TORCH_CHECK(J == token_J.numel(), "rows_E must add up to token_J's length");
  auto token_P = torch::zeros({P}, token_J.options());
  const int64_t* src = token_J.data_ptr<int64_t>();
  int64_t* dst = token_P.data_ptr<int64_t>();
  for (size_t e = 0; e < rows_E.size(); ++e) {
    std::memcpy(dst, src, sizeof(int64_t) * rows_E[e]);
    src += rows_E[e];
    dst += expert_rows_E[e];
  }
  return token_P;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("combine_forward", &combine_forward, "grouped combine, token by token");
  m.def("combine_backward", &combine_backward, "grouped combine's backward, token by token");
  m.def("gather_backward", &gather_backward, "grouped gather's backward, token by token");
  m.def("rank_within_groups", &rank_within_groups, "each element's rank in its group, in one pass");
  m.def("rank_by_score_within_groups", &rank_by_score_within_groups, "each element's rank in its group by score");
  m.def("argmax_rows", &argmax_rows, "argmax along each row, torch's tie and NaN rules");
  m.def("top2_rows", &top2_rows, "DeepSpeed's first and second choices of each row");
  m.def("top2_slots", &top2_slots, "DeepSpeed's top-2 slots and counts, in two passes");
  m.def("own_column_picks", &own_column_picks, "DeepSpeed's top-1 capacity rule from topk's column picks");
  m.def("grouped_rows", &grouped_rows, "the grouped plan's rows and tokens, in one pass");
  m.def("padded_tokens", &padded_tokens, "each expert's tokens followed by its pad rows' (token 0)");
}
