"""Gated experts whose weights are stacked over the local experts: one parameter tensor per weight for all of
them, instead of one per expert.

Why: optimizers and the engine's gradient hooks pay per parameter tensor, not only per element (torch's AdamW on
the CPU steps tensor by tensor), so L experts of 2 or 4 tensors each cost what 2 or 4 tensors cost once stacked.
The HF MoE models keep their experts stacked the same way.

What stays as DeepSpeed has it: the state dict still holds one entry per expert, `deepspeed_experts.{l}.<name>`
with `<name>` the GLUExpert's own parameter names, so DeepSpeed's per-expert checkpoint files (renumbered by global
expert id) and loading at another ep_size work unchanged; the parameters are marked `allreduce=False` with the
group name as the engine expects.

An expert module that has a `stack_experts(num_local_experts, group_name)` method (GLUExpert) makes ds_tutel.MoE
build its local experts stacked (ds_tutel.experts.local_experts).

Shape legend: L local experts, W expert-parallel ranks, C capacity, M model dim, H the experts' hidden dim,
N rows sorted expert after expert (offsets_L1: expert l's rows are offsets_L1[l]:offsets_L1[l + 1]), n the rows
of one expert, O / I a Linear's out / in features.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .experts import Experts, grouped_linear_reference, mark_expert_params

# The per-expert state-dict keys a stacked parameter stands for: <prefix>deepspeed_experts.<l>.<name>.
_PER_EXPERT_KEY = re.compile(r"^deepspeed_experts\.(\d+)\.(.+)$")


class GLUExpert(nn.Module):
    """One gated expert: down_proj(glu(gate_up_proj(x))), where glu maps the 2H outputs of gate_up_proj to H
    (which half is the gate, and its activation, are glu's: e.g. act(gate) * up). As a ds_tutel.MoE expert its
    copies are stacked (StackedGLUExperts)."""

    def __init__(self, hidden_size: int, intermediate_size: int, glu: nn.Module, bias: bool = False,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.glu = glu

    def forward(self, x_nM: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.glu(self.gate_up_proj(x_nM)))

    def stack_experts(self, num_local_experts: int, group_name: str) -> "StackedGLUExperts":
        """num_local_experts experts of this one's form, stacked, each a copy of this one's weights."""
        weight = self.gate_up_proj.weight
        stacked = StackedGLUExperts(num_local_experts, self.down_proj.out_features, self.down_proj.in_features,
                                    self.glu, bias=self.gate_up_proj.bias is not None, group_name=group_name,
                                    device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                for name, param in self.named_parameters():
                    stacked.get_parameter(name).copy_(param.unsqueeze(0).expand_as(stacked.get_parameter(name)))
        return stacked


class StackedLinear(nn.Module):
    """L Linear maps of the same shape: weight [L, O, I], bias [L, O] or None; expert l is F.linear(x, weight[l],
    bias[l])."""

    def __init__(self, num_local_experts: int, in_features: int, out_features: int, bias: bool,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_local_experts, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_local_experts, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as nn.Linear initialises its own weight and bias."""
        if self.weight.device.type == "meta":
            return
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            for w_OI in self.weight:
                nn.init.kaiming_uniform_(w_OI, a=math.sqrt(5))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def unbind(self) -> Tuple[Tuple[torch.Tensor, ...], Optional[Tuple[torch.Tensor, ...]]]:
        """(weights, biases) per expert: views, whose gradients autograd stacks back in one op."""
        return self.weight.unbind(0), (None if self.bias is None else self.bias.unbind(0))

    def extra_repr(self) -> str:
        return (f"experts={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class StackedGLUExperts(Experts):
    """The L local experts of one MoE layer as GLUExperts with stacked weights: gate_up_proj [L, 2H, M] and
    down_proj [L, M, H] (StackedLinear), biases [L, 2H] and [L, M] where the experts have them, one glu for all.
    Runs on every path the per-expert Experts runs on (capacity buffers, exact rows, rows sorted by expert with
    the backend's grouped GEMM)."""

    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int, glu: nn.Module,
                 bias: bool, group_name: str, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        nn.Module.__init__(self)  # Experts.__init__ would copy one module per expert
        self.num_local_experts = num_local_experts
        self.gate_up_proj = StackedLinear(num_local_experts, hidden_size, 2 * intermediate_size, bias, device, dtype)
        self.down_proj = StackedLinear(num_local_experts, intermediate_size, hidden_size, bias, device, dtype)
        self.glu = glu
        mark_expert_params(self, group_name)
        self.register_state_dict_post_hook(_unstack_state_dict)
        self.register_load_state_dict_pre_hook(_stack_state_dict)

    def _linears(self) -> Tuple[StackedLinear, StackedLinear]:
        return self.gate_up_proj, self.down_proj

    def _expert(self, x_nM: torch.Tensor, l: int, params: Sequence[Tuple[Sequence[torch.Tensor], Any]]) -> torch.Tensor:
        (w1, b1), (w2, b2) = params
        h_nH = self.glu(F.linear(x_nM, w1[l], None if b1 is None else b1[l]))
        return F.linear(h_nH, w2[l], None if b2 is None else b2[l])

    def forward(self, buf_WLCM: torch.Tensor) -> torch.Tensor:
        """Runs local expert l on buf_WLCM[:, l] (the slots every rank sent it)."""
        params = [linear.unbind() for linear in self._linears()]
        W, L, C, M = buf_WLCM.shape
        outs_WCM = [self._expert(buf_WLCM[:, l].reshape(W * C, M), l, params).view(W, C, -1) for l in range(L)]
        return torch.stack(outs_WCM, dim=1)

    def _run_grouped(self, inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Expert l on inputs_nM[l] (Experts.forward_grouped runs this inside the backend's run_experts): on the
        CPU all of them at once on their rows joined (torch's grouped matmul), else one after another."""
        if _takes_grouped_mm(inputs_nM):
            rows_L = [x_nM.shape[0] for x_nM in inputs_nM]
            return list(self._grouped_mm_rows(torch.cat(list(inputs_nM)), rows_L).split(rows_L))
        params = [linear.unbind() for linear in self._linears()]
        return [self._expert(x_nM, l, params) for l, x_nM in enumerate(inputs_nM)]

    def _grouped_mm_rows(self, x_NM: torch.Tensor, rows_L: List[int]) -> torch.Tensor:
        """All experts on their consecutive rows of x_NM with torch's grouped matmul: two calls instead of two per
        expert (on the CPU it runs each expert's matmul as F.linear would, with the same results)."""
        offsets_L = torch.tensor(rows_L, dtype=torch.int64).cumsum(0).to(torch.int32)

        def linear(x_NI: torch.Tensor, stacked: StackedLinear) -> torch.Tensor:
            y_NO = torch._grouped_mm(x_NI, stacked.weight.transpose(1, 2), offs=offsets_L)
            if stacked.bias is None:
                return y_NO
            return y_NO + stacked.bias.repeat_interleave(torch.tensor(rows_L), dim=0, output_size=x_NI.shape[0])

        return linear(self.glu(linear(x_NM, self.gate_up_proj)), self.down_proj)

    def forward_rows(self, x_NM: torch.Tensor, offsets_L1: torch.Tensor, backend: str,
                     rows_L: Optional[Sequence[int]] = None) -> torch.Tensor:
        """out_NM: local expert l on rows offsets_L1[l]:offsets_L1[l + 1] of x_NM. With the backend's grouped GEMM
        (found for the first Linear's tensors): one call per Linear, offsets read on the device only; otherwise the
        experts in a loop on exactly their rows."""
        params = [linear.unbind() for linear in self._linears()]
        (w1, b1), (w2, b2) = params
        find = None
        if backend in kernels.PROVIDERS:
            find = kernels.lookup(backend, "grouped_linear", x_NM, offsets_L1, w1, b1)
        if find is None:
            return self.forward_rows_in_loop(x_NM, offsets_L1, rows_L)
        h_NH = self.glu(find(x_NM, offsets_L1, w1, b1))
        second = kernels.lookup(backend, "grouped_linear", h_NH, offsets_L1, w2, b2) or grouped_linear_reference
        return second(h_NH, offsets_L1, w2, b2)


def _takes_grouped_mm(inputs_nM: Sequence[torch.Tensor]) -> bool:
    """Whether torch's grouped matmul runs these experts' rows: CPU tensors of fp32 or bf16, some rows."""
    return (hasattr(torch, "_grouped_mm") and len(inputs_nM) > 0 and inputs_nM[0].device.type == "cpu"
            and inputs_nM[0].dtype in (torch.float32, torch.bfloat16) and sum(x.shape[0] for x in inputs_nM) > 0)


def _unstack_state_dict(module: StackedGLUExperts, state_dict: Dict[str, Any], prefix: str,
                        local_metadata: Dict[str, Any]) -> None:
    """state_dict hook: each stacked tensor [L, ...] becomes L entries deepspeed_experts.{l}.<name> (views), expert
    after expert, in the order one module per expert gives."""
    stacked = {name: state_dict.pop(prefix + name) for name, _ in module.named_parameters()
               if prefix + name in state_dict}
    for l in range(module.num_local_experts):
        for name, tensor in stacked.items():
            state_dict[f"{prefix}deepspeed_experts.{l}.{name}"] = tensor[l]


def _stack_state_dict(module: StackedGLUExperts, state_dict: Dict[str, Any], prefix: str,
                      local_metadata: Dict[str, Any], strict: bool, missing_keys: List[str],
                      unexpected_keys: List[str], error_msgs: List[str]) -> None:
    """load_state_dict pre-hook: the per-expert entries deepspeed_experts.{l}.<name> of every l are stacked into
    <name>; where some expert's entry is missing (or extra experts are present) the entries stay as they are, so
    load_state_dict reports them as missing and unexpected keys."""
    pieces: Dict[str, Dict[int, torch.Tensor]] = {}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        m = _PER_EXPERT_KEY.match(key[len(prefix):])
        if m is not None:
            pieces.setdefault(m.group(2), {})[int(m.group(1))] = state_dict[key]
    L = module.num_local_experts
    for name, by_expert in pieces.items():
        if sorted(by_expert) != list(range(L)):
            continue
        for l in range(L):
            del state_dict[f"{prefix}deepspeed_experts.{l}.{name}"]
        state_dict[prefix + name] = torch.stack([by_expert[l] for l in range(L)])
