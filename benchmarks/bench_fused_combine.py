"""Experiment: what a fused C++ combine would save over the grouped path's torch-operator combine (CPU, fp32).

The grouped combine (ds_tutel/dispatch.py) makes several passes over the J kept rows: products into a block
buffer, index_add_, and in the backward a gather, products, a sum and a scaling. A loop in C++ does each
direction in one pass. This script compiles such a loop with torch.utils.cpp_extension (needs a C++ compiler
and ninja; about 30 s the first time, cached after) and times both on the same rows, forward+backward,
interleaved, medians. It is not part of the layer: it measures whether a compiled path is worth its build
dependency. The forward is compiled without floating-point contraction so that it rounds as the torch path does.

    python benchmarks/bench_fused_combine.py                 # a few shapes
    python benchmarks/bench_fused_combine.py 2048 256 16 2   # S M E k

Shape legend: S tokens, M model dim, E experts, J kept choices (S * k here, none dropped).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

from benchmarks.timing import interleaved, median  # noqa: E402
from ds_tutel.dispatch import _CombinePerExpert  # noqa: E402

_SOURCE = r"""
#include <torch/extension.h>
#include <vector>

// y_SM[token_J[j]] += gates_J[j] * row j of the experts' outputs, expert after expert, rows in order.
torch::Tensor combine_forward(torch::Tensor token_J, torch::Tensor gates_J, int64_t num_tokens,
                              std::vector<torch::Tensor> outs_nM) {
  const int64_t M = outs_nM[0].size(1);
  auto y_SM = torch::zeros({num_tokens, M}, outs_nM[0].options());
  float* y = y_SM.data_ptr<float>();
  const int64_t* token = token_J.data_ptr<int64_t>();
  const float* gate = gates_J.data_ptr<float>();
  int64_t j = 0;
  for (const auto& out_nM : outs_nM) {
    const float* out = out_nM.data_ptr<float>();
    for (int64_t r = 0; r < out_nM.size(0); ++r, ++j) {
      float* y_row = y + token[j] * M;
      const float* out_row = out + r * M;
      for (int64_t m = 0; m < M; ++m) y_row[m] += gate[j] * out_row[m];
    }
  }
  return y_SM;
}

// (grad_gates_J, grad_outs_JM): <dy_SM[token_J[j]], row j> and gates_J[j] * dy_SM[token_J[j]], one pass.
std::vector<torch::Tensor> combine_backward(torch::Tensor token_J, torch::Tensor gates_J, torch::Tensor dy_SM,
                                            std::vector<torch::Tensor> outs_nM) {
  const int64_t M = dy_SM.size(1), J = token_J.size(0);
  auto grad_gates_J = torch::empty({J}, gates_J.options());
  auto grad_outs_JM = torch::empty({J, M}, dy_SM.options());
  const float* dy = dy_SM.data_ptr<float>();
  const int64_t* token = token_J.data_ptr<int64_t>();
  const float* gate = gates_J.data_ptr<float>();
  float* grad_gate = grad_gates_J.data_ptr<float>();
  float* grad_out = grad_outs_JM.data_ptr<float>();
  int64_t j = 0;
  for (const auto& out_nM : outs_nM) {
    const float* out = out_nM.data_ptr<float>();
    for (int64_t r = 0; r < out_nM.size(0); ++r, ++j) {
      const float* dy_row = dy + token[j] * M;
      const float* out_row = out + r * M;
      float* grad_row = grad_out + j * M;
      float dot = 0.f;
      for (int64_t m = 0; m < M; ++m) {
        dot += dy_row[m] * out_row[m];
        grad_row[m] = gate[j] * dy_row[m];
      }
      grad_gate[j] = dot;
    }
  }
  return {grad_gates_J, grad_outs_JM};
}
"""


def compile_fused():
    """The compiled combine (torch caches the build under its extensions directory)."""
    return load_inline("ds_tutel_fused_combine_experiment", cpp_sources=_SOURCE,
                       functions=["combine_forward", "combine_backward"],
                       extra_cflags=["-O3", "-march=native", "-ffp-contract=off"])


def compare(fused, S: int, M: int, E: int, k: int) -> str:
    """Both combines, forward+backward, on the same random rows: times and the largest differences."""
    gen = torch.Generator().manual_seed(0)
    J = S * k
    rows = torch.bincount(torch.randint(E, (J,), generator=gen), minlength=E).tolist()
    token_J = torch.randperm(S, generator=gen).repeat(k)[:J]
    gates_J = torch.rand(J, generator=gen)
    outs_nM = [torch.randn(n, M, generator=gen) for n in rows]
    dy_SM = torch.randn(S, M, generator=gen)

    def torch_ops():
        outs = [o.detach().requires_grad_(True) for o in outs_nM]
        gates = gates_J.detach().requires_grad_(True)
        y_SM = _CombinePerExpert.apply(token_J, gates, S, k == 1, rows, *outs)
        y_SM.backward(dy_SM)
        return y_SM.detach(), gates.grad, outs

    def compiled():
        y_SM = fused.combine_forward(token_J, gates_J, S, outs_nM)
        grad_gates_J, grad_outs_JM = fused.combine_backward(token_J, gates_J, dy_SM, outs_nM)
        torch.split(grad_outs_JM, rows)
        return y_SM, grad_gates_J, grad_outs_JM

    reference, result = torch_ops(), compiled()
    reference = (*reference[:2], torch.cat([o.grad for o in reference[2]]))
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, result)]
    times = interleaved({"torch ops": torch_ops, "fused C++": compiled}, torch.device("cpu"), warmup=10, reps=60,
                        min_reps=60)
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    return (f"S={S} M={M} E={E} k={k}: torch ops {ms['torch ops']:.3f} ms, fused C++ {ms['fused C++']:.3f} ms "
            f"({ms['torch ops'] / ms['fused C++']:.1f}x); max |difference| output {diffs[0]:.1e}, "
            f"gate gradient {diffs[1]:.1e}, output gradient {diffs[2]:.1e}")


def main() -> None:
    torch.set_num_threads(1)
    fused = compile_fused()
    shapes = [tuple(int(a) for a in sys.argv[1:5])] if len(sys.argv) > 4 else [
        (2048, 256, 8, 1), (2048, 256, 16, 2), (2048, 256, 64, 1), (512, 1024, 32, 2), (1024, 512, 16, 4)]
    for shape in shapes:
        print(compare(fused, *shape), flush=True)


if __name__ == "__main__":
    main()
