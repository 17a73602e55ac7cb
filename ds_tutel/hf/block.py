"""The module that takes a transformers sparse-MoE block's place: its routed experts run in a `ds_tutel.MoE` (stacked
GLU experts, ds_tutel.stacked_experts, read from and written back to the fused layout its EXPERT_FORMS entry
names), its dense parts (a shared expert) stay HF modules, and the router logits still reach the model's own
auxiliary loss.

transformers 5 collects router logits for `output_router_logits=True` with forward hooks that it installs, on
first use, on every module of the router's class (`_can_record_outputs`). `RouterLogits` is that capture point:
a parameter-free module registered under the router's name, of a subclass of the HF router class (so the hooks
find it), which passes through the router logits. Only while a hook is installed on it does the block hand it
logits at all: those the ds_tutel gate routes with (MoE.forward's on_logits; no second router matmul), cast to
the router weight's dtype. In fp32 they are the HF router's logits exactly (the same product, see
ds_tutel/routing/router_linear.py); in half precision the gate's fp32 product rounded once to the model dtype,
as the HF router's half-precision matmul (fp32 accumulation) rounds its own: equal but where the two
accumulation orders straddle a rounding boundary (one unit in the last place). Where they are not the logits of
the block's input (gate input noise in training, or an enclosing autocast, whose dtype the HF router would
compute in), the block computes the HF router's logits with a second matmul instead.

Shape legend: S tokens, M model dim, E experts, K choices per token, L local experts (E / ep_size), I expert
intermediate dim, n rows one expert runs on.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..stacked_experts import GLUExpert, StackedGLUExperts
from .models import BlockSpec


class ChunkedGLU(nn.Module):
    """act_fn(gate) * up, the gate the first half of the last dim and up the second (the HF "swiglu" experts)."""

    def __init__(self, act_fn: nn.Module) -> None:
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate_up_n2I: torch.Tensor) -> torch.Tensor:
        gate_nI, up_nI = gate_up_n2I.chunk(2, dim=-1)
        return self.act_fn(gate_nI) * up_nI


class ClampedInterleavedGLU(nn.Module):
    """GPT-OSS's gated activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = clamp(gate,
    max=limit), the gate at even and up at odd positions of the last dim."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.limit = float(limit)

    def forward(self, gate_up_n2I: torch.Tensor) -> torch.Tensor:
        gate_nI = gate_up_n2I[..., 0::2].clamp(max=self.limit)
        up_nI = gate_up_n2I[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up_nI + 1) * (gate_nI * torch.sigmoid(gate_nI * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


def _transposed(t_LAB: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t_LAB is None else t_LAB.transpose(1, 2).contiguous()


class SwiGLULayout:
    """HF layout "swiglu": gate_up_proj [E, 2I, M] (gate rows first, then up rows) and down_proj [E, M, I], no
    biases: expert e is down(act(gate(x)) * up(x)). Stacked (ds_tutel.stacked_experts), expert e's weights are
    exactly gate_up_proj[e] and down_proj[e]."""

    HF_TENSORS: Tuple[str, ...] = ("gate_up_proj", "down_proj")

    @staticmethod
    def hf_dims(experts: nn.Module) -> Tuple[int, int, int]:
        """(E, M, I) of HF fused experts in this layout, else ValueError."""
        gate_up_E2IM, down_EMI = experts.gate_up_proj, experts.down_proj
        E, two_I, M = gate_up_E2IM.shape
        I = two_I // 2
        if two_I != 2 * I or tuple(down_EMI.shape) != (E, M, I):
            raise ValueError(f"gate_up_proj {tuple(gate_up_E2IM.shape)} and down_proj {tuple(down_EMI.shape)} are "
                             "not [E, 2I, M] and [E, M, I]")
        return E, M, I

    @staticmethod
    def template(experts: nn.Module, M: int, I: int, device: torch.device, dtype: torch.dtype) -> GLUExpert:
        """One ds_tutel expert of this form (the MoE layer stacks its copies)."""
        return GLUExpert(M, I, ChunkedGLU(experts.act_fn), bias=False, device=device, dtype=dtype)

    @staticmethod
    def to_stacked(fused: Dict[str, torch.Tensor], first: int, stop: int) -> Dict[str, torch.Tensor]:
        """Experts first..stop-1 of the HF fused tensors, as the stacked parameters (by name) hold them."""
        return {"gate_up_proj.weight": fused["gate_up_proj"][first:stop],
                "down_proj.weight": fused["down_proj"][first:stop]}

    @staticmethod
    def from_stacked(stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        """The stacked parameters' tensors (by name; None passes through) as HF fused tensors [L, ...]."""
        return {"gate_up_proj": stacked["gate_up_proj.weight"], "down_proj": stacked["down_proj.weight"]}


class ClampedGLULayout:
    """HF layout "clamped_glu" (GPT-OSS): gate_up_proj [E, M, 2I] applied as x @ W with gate and up columns
    interleaved (gate at even, up at odd columns), gate_up_proj_bias [E, 2I] likewise, down_proj [E, I, M],
    down_proj_bias [E, M]. Stacked, the weights are these transposed (Linear's [out, in]), the biases as they
    are; the interleaving stays (ClampedInterleavedGLU reads it)."""

    HF_TENSORS: Tuple[str, ...] = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")

    @staticmethod
    def hf_dims(experts: nn.Module) -> Tuple[int, int, int]:
        gate_up_EM2I, down_EIM = experts.gate_up_proj, experts.down_proj
        E, M, two_I = gate_up_EM2I.shape
        I = two_I // 2
        shapes = {"gate_up_proj": (E, M, 2 * I), "gate_up_proj_bias": (E, 2 * I), "down_proj": (E, I, M),
                  "down_proj_bias": (E, M)}
        if two_I != 2 * I or any(tuple(getattr(experts, n).shape) != shape for n, shape in shapes.items()):
            raise ValueError("expected gate_up_proj [E, M, 2I], gate_up_proj_bias [E, 2I], down_proj [E, I, M], "
                             "down_proj_bias [E, M], got " +
                             ", ".join(f"{n} {tuple(getattr(experts, n).shape)}" for n in shapes))
        return E, M, I

    @staticmethod
    def template(experts: nn.Module, M: int, I: int, device: torch.device, dtype: torch.dtype) -> GLUExpert:
        return GLUExpert(M, I, ClampedInterleavedGLU(experts.alpha, experts.limit), bias=True, device=device,
                         dtype=dtype)

    @staticmethod
    def to_stacked(fused: Dict[str, torch.Tensor], first: int, stop: int) -> Dict[str, torch.Tensor]:
        return {"gate_up_proj.weight": fused["gate_up_proj"][first:stop].transpose(1, 2),
                "gate_up_proj.bias": fused["gate_up_proj_bias"][first:stop],
                "down_proj.weight": fused["down_proj"][first:stop].transpose(1, 2),
                "down_proj.bias": fused["down_proj_bias"][first:stop]}

    @staticmethod
    def from_stacked(stacked: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        return {"gate_up_proj": _transposed(stacked["gate_up_proj.weight"]),
                "gate_up_proj_bias": stacked["gate_up_proj.bias"],
                "down_proj": _transposed(stacked["down_proj.weight"]), "down_proj_bias": stacked["down_proj.bias"]}


# The HF fused-expert layouts a BlockSpec's expert_form names.
EXPERT_FORMS: Dict[str, type] = {"swiglu": SwiGLULayout, "clamped_glu": ClampedGLULayout}


class RouterLogits(nn.Module):
    """Parameter-free stand-in for the HF router: forward(logits_SE) returns a tuple holding the logits at the
    index the model's output recorder reads. `weight` (and `bias`, `e_score_correction_bias` where the model's
    router has them) are the ds_tutel gate's tensors (the same ones, not copies), so code that inspects the HF
    router still finds them. The gate is held as a plain attribute, not a submodule: its tensors keep their one
    name, and deepcopy maps the reference to the copy's gate."""

    def __init__(self, gate: nn.Module, output_index: int, attributes: Dict[str, object]) -> None:
        nn.Module.__init__(self)  # not the HF router's __init__: this module owns no parameters
        object.__setattr__(self, "_gate", gate)
        self.output_index = output_index
        for name, value in attributes.items():
            setattr(self, name, value)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self._gate.wg.weight

    @property
    def bias(self) -> nn.Parameter:  # type: ignore[override]
        if self._gate.wg.bias is None:
            raise AttributeError("this router has no bias")
        return self._gate.wg.bias

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        if not hasattr(self._gate, "expert_bias"):
            raise AttributeError("this router has no selection bias")
        return self._gate.expert_bias

    def __reduce_ex__(self, protocol):
        # The class is made at run time (router_logits_class): pickle the HF router class it derives from.
        return _new_router_logits, (type(self).hf_router_class,), self.__dict__

    def forward(self, logits_SE: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        out = [None] * (self.output_index + 1)
        out[self.output_index] = logits_SE
        return tuple(out)


_ROUTER_LOGITS_CLASSES: Dict[type, type] = {}


def router_logits_class(hf_router_class: type) -> type:
    """RouterLogits made a subclass of the HF router class (one per class), for the output recorders' isinstance."""
    if hf_router_class not in _ROUTER_LOGITS_CLASSES:
        _ROUTER_LOGITS_CLASSES[hf_router_class] = type(
            f"{hf_router_class.__name__}Logits", (RouterLogits, hf_router_class),
            {"__module__": __name__, "__doc__": RouterLogits.__doc__, "hf_router_class": hf_router_class})
    return _ROUTER_LOGITS_CLASSES[hf_router_class]


def _new_router_logits(hf_router_class: type) -> RouterLogits:
    """An empty RouterLogits of the class made for hf_router_class; unpickling then sets its state."""
    return nn.Module.__new__(router_logits_class(hf_router_class))


# Plain attributes of the HF routers worth keeping on the stand-in (read by code that inspects routers).
ROUTER_ATTRIBUTES = ("top_k", "num_experts", "norm_topk_prob", "hidden_dim", "num_group", "topk_group",
                     "routed_scaling_factor")


class HFMoEBlock(nn.Module):
    """A converted sparse-MoE block: routed experts in `moe` (a ds_tutel.MoE), the router's logits through the
    stand-in registered under the HF router's name, shared experts under their HF names.

    forward(hidden_states [..., M]) -> [..., M] as the HF block returns it (GPT-OSS's: a tuple with the routing's
    gates [S, K], detached, in place of its router scores, which its decoder layer discards).
    """

    def __init__(self, spec: BlockSpec, moe: nn.Module, router_logits: RouterLogits,
                 shared_expert: Optional[nn.Module] = None, shared_expert_gate: Optional[nn.Module] = None,
                 jitter_noise: float = 0.0, hf_block_class: str = "", hf_names: Tuple[str, ...] = ()) -> None:
        super().__init__()
        self.spec = spec
        self.hf_names = tuple(hf_names)  # the HF block's state-dict keys, in its order (export keeps it)
        self.hf_block_class = hf_block_class
        self.jitter_noise = float(jitter_noise)
        self.moe = moe
        self.add_module(spec.router, router_logits)
        if shared_expert is not None:
            self.add_module(spec.shared_expert, shared_expert)
        if shared_expert_gate is not None:
            self.add_module(spec.shared_expert_gate, shared_expert_gate)

    def __deepcopy__(self, memo: Dict[int, object]) -> "HFMoEBlock":
        """A copy sharing the expert-parallel process group (a handle to the ranks, which cannot be copied):
        a copy of a model converted with ep_size > 1 runs on the same group."""
        group = self.moe.deepspeed_moe.ep_group
        if group is not None:
            memo[id(group)] = group
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    @property
    def router_logits(self) -> RouterLogits:
        return getattr(self, self.spec.router)

    @property
    def moe_gate(self) -> nn.Module:
        """The ds_tutel gate (DeepSpeed's `deepspeed_moe.gate`): router weight, bias, selection bias."""
        return self.moe.deepspeed_moe.gate

    @property
    def router_weight(self) -> nn.Parameter:
        """The router weight [E, M]: DeepSpeed's `deepspeed_moe.gate.wg.weight`."""
        return self.moe_gate.wg.weight

    def extra_repr(self) -> str:
        return f"converted from {self.hf_block_class}"

    def forward(self, hidden_states: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        M = hidden_states.shape[-1]
        if self.training and self.jitter_noise > 0:  # Mixtral's jitter: the same draw as the HF block makes
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x_SM = hidden_states.reshape(-1, M)
        on_logits = None
        if self.router_logits._forward_hooks:  # something records router logits (the model's aux loss)
            if self._gate_logits_are_the_routers(x_SM):
                on_logits = self._record_logits
            else:
                self.router_logits(F.linear(x_SM, self.router_weight, self.moe_gate.wg.bias))
        y_SM, _, _ = self.moe(x_SM, on_logits=on_logits)
        if self.spec.shared_expert is not None:
            shared_SM = getattr(self, self.spec.shared_expert)(x_SM)
            if self.spec.shared_expert_gate is not None:
                shared_SM = torch.sigmoid(getattr(self, self.spec.shared_expert_gate)(x_SM)) * shared_SM
            y_SM = y_SM + shared_SM
        y = y_SM.reshape(hidden_states.shape)
        if self.spec.returns_router_scores:  # the HF block's (hidden_states, router_scores [S, K])
            return y, self.moe.deepspeed_moe.last_routing.gates_SK
        return y

    def _gate_logits_are_the_routers(self, x_SM: torch.Tensor) -> bool:
        """Whether the gate's logits are the HF router's (up to the dtype cast): no input noise, no autocast."""
        gate = self.moe_gate
        opts = gate.options
        noisy = gate.training and (opts.input_dropout > 0 or opts.input_jitter > 0
                                   or gate.noisy_gate_policy == "Jitter")
        return not noisy and not torch.is_autocast_enabled(x_SM.device.type)

    def _record_logits(self, logits_SE: torch.Tensor) -> None:
        self.router_logits(logits_SE.to(self.router_weight.dtype))

    def local_experts(self) -> StackedGLUExperts:
        """This rank's experts of the block, stacked."""
        return self.moe.deepspeed_moe.experts

    def hf_tensors(self, pick: Callable[[torch.Tensor], Optional[torch.Tensor]],
                   buffers: bool = True) -> Dict[str, Optional[torch.Tensor]]:
        """This block's tensors under the HF block's names and in its layout, relative to the block.

        pick maps each of our parameters to what to report (its data, its gradient); where it gives None for
        any piece of a fused tensor, the fused tensor is None. buffers: include the HF block's buffers (the
        selection bias) as copies. With expert parallelism (ep_size > 1) the fused tensors hold every expert:
        each rank's local experts are gathered over the expert-parallel group, so every rank of the group must
        call this, for the same blocks in the same order (a collective).
        """
        spec, gate = self.spec, self.moe_gate
        experts = self.local_experts()
        out: Dict[str, Optional[torch.Tensor]] = {f"{spec.router}.weight": pick(gate.wg.weight)}
        if spec.router_bias:
            out[f"{spec.router}.bias"] = pick(gate.wg.bias)
        if spec.selection_bias is not None and buffers:
            out[f"{spec.router}.{spec.selection_bias}"] = gate.expert_bias.detach().clone()
        local = self.local_experts()
        stacked = {name: pick(param) for name, param in local.named_parameters()}
        device = local.gate_up_proj.weight.device
        for name, local_L in EXPERT_FORMS[spec.expert_form].from_stacked(stacked).items():
            out[f"{spec.experts}.{name}"] = self._gather_experts(local_L, device)                 # [E, ...]
        for name in spec.dense_modules():
            for key, param in getattr(self, name).named_parameters():
                out[f"{name}.{key}"] = pick(param)
        order = {name: i for i, name in enumerate(self.hf_names)}
        return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))

    def _gather_experts(self, local_L: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
        """local_L [L, ...] of this rank's experts -> [E, ...] of all experts in global order (ep rank w holds
        experts w * L .. w * L + L - 1), on every rank of the expert-parallel group; None on every rank where
        any rank has None. At ep_size 1, local_L itself."""
        ep_size = self.moe.ep_size
        if ep_size == 1:
            return local_L
        group = self.moe.deepspeed_moe.ep_group
        if group is None:
            raise RuntimeError(f"MoE layer with ep_size={ep_size} has no expert-parallel group to gather its "
                               "experts over (set_deepspeed_parallelism() was never called)")
        import torch.distributed as dist

        present = torch.tensor([int(local_L is not None)], dtype=torch.int64, device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MIN, group=group)
        if not bool(present.item()):
            return None
        local_L = local_L.contiguous()
        parts_L = [torch.empty_like(local_L) for _ in range(ep_size)]
        dist.all_gather(parts_L, local_L, group=group)
        return torch.cat(parts_L)                                                           # [E, ...]
