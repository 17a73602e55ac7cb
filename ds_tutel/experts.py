"""The local experts of one MoE layer, named and marked exactly as DeepSpeed's `Experts`.

Parameter names `deepspeed_experts.{i}.*`, `allreduce=False` and `group_name='ep_size_N'` are what the DeepSpeed
engine, ZeRO and the per-expert checkpoint files key on.

On the GPU path the local experts run on one buffer of rows sorted expert after expert (forward_rows): where
they are a known FFN form (ffn_form) and the backend has a grouped GEMM ("grouped_linear"), all of them run as
one grouped_linear call per Linear plus the elementwise activation, with row offsets on the device; any other
expert runs in a loop on exactly its rows.

Shape legend: W ranks in the expert-parallel group, L local experts, C capacity, M model dim, N rows sorted expert
after expert (offsets_L1: expert l's rows are offsets_L1[l]:offsets_L1[l + 1], rows from offsets_L1[L] on belong
to no expert), I / O a Linear's in / out features, H an FFN's hidden dim.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .dispatch.grouped import RowRounding, with_pad_rows

# grouped_linear(x_NI, offsets_L1, weights [O, I] per expert, biases [O] per expert or None) -> y_NO
GroupedLinear = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor],
                          Optional[Sequence[Optional[torch.Tensor]]]], torch.Tensor]

# Activations that act on each element alone, so one call on all experts' rows equals one call per expert.
ELEMENTWISE_ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU,
                           nn.Softplus, nn.Hardswish, nn.Identity)
# The same, from transformers' ACT2FN, recognised by class name (the core never imports transformers).
ELEMENTWISE_ACTIVATION_NAMES = frozenset({"SiLUActivation", "GELUActivation", "NewGELUActivation",
                                          "FastGELUActivation", "QuickGELUActivation", "GELUTanh",
                                          "PytorchGELUTanh", "ReLUSquaredActivation"})


def grouped_linear_reference(x_NI: torch.Tensor, offsets_L1: torch.Tensor, weights: Sequence[torch.Tensor],
                             biases: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """The grouped GEMM's contract in plain torch: y_NO[rows of expert l] = F.linear(x, weights[l], biases[l]);
    rows of no expert (from offsets_L1[L] on) are zero. Reads the offsets on the host (the reference for the
    kernels, which read them on the device)."""
    bounds = [int(b) for b in offsets_L1.tolist()]
    O = weights[0].shape[0]
    outs_nO = [F.linear(x_NI[bounds[l]:bounds[l + 1]], w_OI, None if biases is None else biases[l])
               for l, w_OI in enumerate(weights)]
    tail_O = x_NI.shape[0] - bounds[-1]
    return torch.cat([x_NI.new_zeros(bounds[0], O)] + outs_nO + [x_NI.new_zeros(tail_O, O)])


@runtime_checkable
class GatedFFN(Protocol):
    """The gated (SwiGLU) expert: down_proj(act_fn(gate_proj(x)) * up_proj(x)), as Hugging Face's MoE experts
    compute it."""

    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module


@runtime_checkable
class FusedGatedFFN(Protocol):
    """The gated expert with gate and up in one Linear of 2H outputs, gate rows first:
    gate_nH, up_nH = gate_up_proj(x).chunk(2, dim=-1); down_proj(act_fn(gate_nH) * up_nH), as Hugging Face's
    fused MoE experts compute it (one matmul and one weight fewer than GatedFFN). ds_tutel.stacked_experts keeps
    such experts stacked instead."""

    gate_up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module


def _is_elementwise(module: object) -> bool:
    return isinstance(module, nn.Module) and not any(True for _ in module.parameters()) and (
        isinstance(module, ELEMENTWISE_ACTIVATIONS) or type(module).__name__ in ELEMENTWISE_ACTIVATION_NAMES)


def _plain(module: nn.Module) -> bool:
    """No hooks that a grouped run would skip."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _same_activation(activations: Sequence[nn.Module]) -> bool:
    first = activations[0]
    return all(type(a) is type(first) and a.extra_repr() == first.extra_repr() and _plain(a) for a in activations)


def _linears(modules: Sequence[object]) -> bool:
    return all(type(m) is nn.Linear and _plain(m) for m in modules) and all(
        m.weight.shape == modules[0].weight.shape and (m.bias is None) == (modules[0].bias is None) for m in modules)


def ffn_form(experts: Sequence[nn.Module]) -> Optional[str]:
    """"sequential" (nn.Sequential(Linear, activation, Linear)), "gated" (GatedFFN), "fused_gated"
    (FusedGatedFFN) or None: the form all these experts share, with equal shapes, elementwise activations and no
    hooks."""
    if not experts or not all(_plain(e) for e in experts):
        return None
    if all(type(e).forward is nn.Sequential.forward and isinstance(e, nn.Sequential) and len(e) == 3 for e in experts):
        if _linears([e[0] for e in experts]) and _linears([e[2] for e in experts]) and all(
                _is_elementwise(e[1]) for e in experts) and _same_activation([e[1] for e in experts]):
            return "sequential"
        return None
    if all(isinstance(e, GatedFFN) for e in experts):
        if all(_linears([getattr(e, name) for e in experts]) for name in ("gate_proj", "up_proj", "down_proj")) and all(
                _is_elementwise(e.act_fn) for e in experts) and _same_activation([e.act_fn for e in experts]):
            return "gated"
        return None
    if all(isinstance(e, FusedGatedFFN) for e in experts):
        if all(_linears([getattr(e, name) for e in experts]) for name in ("gate_up_proj", "down_proj")) and (
                experts[0].gate_up_proj.weight.shape[0] % 2 == 0) and all(
                _is_elementwise(e.act_fn) for e in experts) and _same_activation([e.act_fn for e in experts]):
            return "fused_gated"
    return None


def _weights(linears: Sequence[nn.Linear]) -> Tuple[List[torch.Tensor], Optional[List[Optional[torch.Tensor]]]]:
    """(weights, biases) of these Linears for grouped_linear; biases None where none has one."""
    biases = [m.bias for m in linears]
    return [m.weight for m in linears], (None if all(b is None for b in biases) else biases)


# Finds a grouped GEMM that takes these arguments (x_NI, offsets_L1, weights, biases), or None.
GroupedLinearLookup = Callable[..., Optional[GroupedLinear]]


# Each FFN form's Linear submodules, in the order they run.
_LINEAR_NAMES = {"sequential": ("0", "2"), "gated": ("gate_proj", "up_proj", "down_proj"),
                 "fused_gated": ("gate_up_proj", "down_proj")}


def run_ffn(form: str, experts: Sequence[nn.Module], x_NM: torch.Tensor, offsets_L1: torch.Tensor,
            find: GroupedLinearLookup) -> torch.Tensor:
    """All experts of one FFN form on their rows of x_NM: one grouped GEMM per Linear, one activation call.

    find(x_NI, offsets_L1, weights, biases) gives the grouped GEMM for each call's tensors; where it declines one
    (a shape the kernel does not take), that call runs grouped_linear_reference."""

    def linear(x_NI: torch.Tensor, name: str) -> torch.Tensor:
        weights, biases = _weights([e.get_submodule(name) for e in experts])
        fn = find(x_NI, offsets_L1, weights, biases) or grouped_linear_reference
        return fn(x_NI, offsets_L1, weights, biases)

    if form == "sequential":
        return linear(experts[0][1](linear(x_NM, "0")), "2")
    if form == "gated":
        return linear(experts[0].act_fn(linear(x_NM, "gate_proj")) * linear(x_NM, "up_proj"), "down_proj")
    if form == "fused_gated":
        gate_NH, up_NH = linear(x_NM, "gate_up_proj").chunk(2, dim=-1)
        return linear(experts[0].act_fn(gate_NH) * up_NH, "down_proj")
    raise ValueError(f"unknown FFN form {form!r}")


def local_experts(expert: nn.Module, num_local_experts: int, group_name: str) -> "Experts":
    """The local experts a MoE layer builds from its `expert` module: stacked where the expert knows how to stack
    its copies (a `stack_experts(num_local_experts, group_name)` method: ds_tutel.stacked_experts.GLUExpert),
    otherwise one deep copy per expert, as DeepSpeed's Experts."""
    stack = getattr(expert, "stack_experts", None)
    if callable(stack):
        return stack(num_local_experts, group_name)
    return Experts(expert, num_local_experts, group_name)


def mark_expert_params(module: nn.Module, group_name: str) -> None:
    """Marks parameters as expert-parallel: reduced over the expert-data-parallel group, not the data group."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = group_name


class Experts(nn.Module):

    def __init__(self, expert: nn.Module, num_local_experts: int, group_name: str) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        mark_expert_params(self, group_name)

    @staticmethod
    def row_rounding(device: torch.device, dtype: torch.dtype) -> Optional[RowRounding]:
        """How each expert's row count rounds up before it runs, where a matmul of a new shape costs a compile and
        resident memory (the "cpu" backend's row buckets for CPU half types through oneDNN); None: exact rows."""
        rounding = kernels.find("expert_row_rounding", device, dtype)
        return None if rounding is None else rounding(dtype)

    def forward(self, buf_WLCM: torch.Tensor) -> torch.Tensor:
        """Runs local expert l on buf_WLCM[:, l] (the slots every rank sent it)."""
        outputs = []
        for l, expert in enumerate(self.deepspeed_experts):
            out_WCM = expert(buf_WLCM[:, l])
            if isinstance(out_WCM, tuple):
                out_WCM = out_WCM[0]
            outputs.append(out_WCM)
        return torch.stack(outputs, dim=1)

    def forward_grouped(self, inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Runs expert l on inputs_nM[l], exactly its tokens (no empty capacity slots).

        Every expert runs, on zero rows if it got none, so each expert parameter always has a gradient (ZeRO
        reduces expert gradients in buckets that every rank must fill alike). A backend may wrap the run
        ("run_experts": on the CPU, fp32 experts run with oneDNN off, since row counts change every step).
        """
        run = kernels.find("run_experts", inputs_nM[0].device) if len(inputs_nM) else None
        return run(self._run_grouped, inputs_nM) if run is not None else self._run_grouped(inputs_nM)

    def _run_grouped(self, inputs_nM: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        outputs = []
        for x_nM, expert in zip(inputs_nM, self.deepspeed_experts):
            out_nM = expert(x_nM)
            outputs.append(out_nM[0] if isinstance(out_nM, tuple) else out_nM)
        return outputs

    def grouped_linear_lookup(self, form: Optional[str], backend: str, x_NM: torch.Tensor,
                              offsets_L1: torch.Tensor) -> Optional[GroupedLinearLookup]:
        """How run_ffn finds the backend's grouped GEMM, where these experts are a known FFN form (form, from
        ffn_form) and the backend has one that takes their first Linear with these rows; else None (the experts
        then run in a loop)."""
        if form is None or backend not in kernels.PROVIDERS:
            return None

        def find(*args: object) -> Optional[GroupedLinear]:
            return kernels.lookup(backend, "grouped_linear", *args)

        first = [e.get_submodule(_LINEAR_NAMES[form][0]) for e in self.deepspeed_experts]
        return find if find(x_NM, offsets_L1, *_weights(first)) is not None else None

    def forward_rows(self, x_NM: torch.Tensor, offsets_L1: torch.Tensor, backend: str,
                     rows_L: Optional[Sequence[int]] = None) -> torch.Tensor:
        """out_NM: local expert l on rows offsets_L1[l]:offsets_L1[l + 1] of x_NM (sorted expert after expert).

        With the backend's grouped GEMM for a known FFN form: one grouped_linear call per Linear, offsets read on
        the device only. Otherwise a loop over the experts on exactly their rows, whose sizes come from rows_L or,
        without it, from one read of the offsets (a host sync on a GPU). Rows from offsets_L1[L] on belong to no
        expert: their outputs are zero or whatever the grouped GEMM leaves there, and are never read.
        """
        form = ffn_form(self.deepspeed_experts)
        find = self.grouped_linear_lookup(form, backend, x_NM, offsets_L1)
        if find is not None:
            return run_ffn(form, self.deepspeed_experts, x_NM, offsets_L1, find)
        return self.forward_rows_in_loop(x_NM, offsets_L1, rows_L)

    def forward_rows_in_loop(self, x_NM: torch.Tensor, offsets_L1: torch.Tensor,
                             rows_L: Optional[Sequence[int]] = None) -> torch.Tensor:
        """forward_rows without a grouped GEMM: the experts in a loop (forward_grouped) on exactly their rows."""
        if rows_L is None:
            rows_L = (offsets_L1[1:] - offsets_L1[:-1]).tolist()
        J = sum(rows_L)
        outs_nM = self.forward_grouped(torch.split(x_NM[:J], list(rows_L)))
        tail_M = [outs_nM[0].new_zeros(x_NM.shape[0] - J, outs_nM[0].shape[1])] if x_NM.shape[0] > J else []
        return torch.cat(list(outs_nM) + tail_M)

    def forward_filled(self, buf_WLCM: torch.Tensor, filled_WL: Sequence[Sequence[int]]) -> torch.Tensor:
        """Like forward, but each expert runs only on the filled slots: filled_WL[w][l] rows of buf_WLCM[w, l]
        (filled slots are a prefix of each buffer), plus zero pad rows where row_rounding rounds the count up.
        Outputs of empty slots are zero and never read."""
        rows_L = [sum(_rows_of(filled_WL, l)) for l in range(buf_WLCM.shape[1])]
        rounding = self.row_rounding(buf_WLCM.device, buf_WLCM.dtype)
        expert_rows_L = rows_L if rounding is None else list(rounding(rows_L))
        inputs_pM = _PackFilled.apply(buf_WLCM, filled_WL, expert_rows_L)
        return _UnpackFilled.apply(buf_WLCM.shape, filled_WL, *self.forward_grouped(inputs_pM))


def _rows_of(filled_WL: Sequence[Sequence[int]], l: int) -> List[int]:
    return [int(filled_L[l]) for filled_L in filled_WL]


class _PackFilled(torch.autograd.Function):
    """buf_WLCM -> per local expert l, the filled rows of every source rank w, stacked, then zero pad rows up
    to expert_rows_L[l]: [expert_rows_L[l], M]."""

    @staticmethod
    def forward(ctx, buf_WLCM: torch.Tensor, filled_WL: Sequence[Sequence[int]], expert_rows_L: List[int]):
        ctx.shape = buf_WLCM.shape
        ctx.filled_WL = filled_WL
        W, L = buf_WLCM.shape[:2]
        return tuple(torch.cat(with_pad_rows([buf_WLCM[w, l, :n] for w, n in enumerate(_rows_of(filled_WL, l))],
                                             expert_rows_L[l]))
                     for l in range(L))

    @staticmethod
    def backward(ctx, *grads_pM: torch.Tensor):
        grad_WLCM = grads_pM[0].new_zeros(ctx.shape)
        for l, grad_pM in enumerate(grads_pM):
            rows = _rows_of(ctx.filled_WL, l)
            for w, part_nM in enumerate(torch.split(grad_pM[:sum(rows)], rows)):
                grad_WLCM[w, l, :part_nM.shape[0]] = part_nM
        return grad_WLCM, None, None


class _UnpackFilled(torch.autograd.Function):
    """The inverse of _PackFilled: per-expert outputs (pad rows dropped) back into a zero buffer [W, L, C, M]."""

    @staticmethod
    def forward(ctx, shape: torch.Size, filled_WL: Sequence[Sequence[int]], *outs_pM: torch.Tensor):
        ctx.filled_WL = filled_WL
        ctx.expert_rows_L = [out_pM.shape[0] for out_pM in outs_pM]
        out_WLCM = outs_pM[0].new_zeros(shape)
        for l, out_pM in enumerate(outs_pM):
            rows = _rows_of(filled_WL, l)
            for w, part_nM in enumerate(torch.split(out_pM[:sum(rows)], rows)):
                out_WLCM[w, l, :part_nM.shape[0]] = part_nM
        return out_WLCM

    @staticmethod
    def backward(ctx, grad_WLCM: torch.Tensor):
        L = grad_WLCM.shape[1]
        grads = tuple(torch.cat(with_pad_rows([grad_WLCM[w, l, :n] for w, n in enumerate(_rows_of(ctx.filled_WL, l))],
                                              ctx.expert_rows_L[l]))
                      for l in range(L))
        return (None, None, *grads)
