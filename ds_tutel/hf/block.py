"""The module that takes a transformers sparse-MoE block's place: its routed experts run in a `ds_tutel.MoE` (stacked
GLU experts, ds_tutel.stacked_experts, read from and written back to the HF experts' layout, ds_tutel.hf.layouts),
its dense parts (a shared expert) stay HF modules, and the router logits still reach the model's own auxiliary
loss.

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

transformers 4 (per-expert experts) collects them from the block's own output instead, (hidden_states,
router_logits), with its forward wrapped on every module of the block's class: the converted block is made a
subclass of the HF block class there, and always returns the logits as that block does.

Shape legend: S tokens, M model dim, E experts, K choices per token, L local experts (E / ep_size), I expert
intermediate dim, n rows one expert runs on.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..stacked_experts import StackedGLUExperts
from .layouts import ExpertLayout
from .models import BlockSpec


class HFClassStandIn(nn.Module):
    """A module that may be made, at run time, a subclass of a transformers class as well (with_hf_class), so that
    transformers' output recorders, which look for modules of that class, find it in its place. `hf_class` is
    that class (None: not made so); pickling records it, as the made class has no importable name."""

    hf_class: Optional[type] = None
    _class_suffix = ""

    def __reduce_ex__(self, protocol):
        own = next(c for c in type(self).__mro__ if c.__dict__.get("_class_suffix"))
        return _new_stand_in, (own, type(self).hf_class), self.__dict__


_HF_SUBCLASSES: Dict[Tuple[type, type], type] = {}


def with_hf_class(own: type, hf_class: Optional[type]) -> type:
    """`own` (a HFClassStandIn class) made a subclass of hf_class too, one class per pair; `own` where hf_class
    is None. `own`'s methods come first; hf_class's __init__ is never called."""
    if hf_class is None:
        return own
    if (own, hf_class) not in _HF_SUBCLASSES:
        _HF_SUBCLASSES[(own, hf_class)] = type(
            f"{hf_class.__name__}{own._class_suffix}", (own, hf_class),
            {"__module__": __name__, "__doc__": own.__doc__, "hf_class": hf_class})
    return _HF_SUBCLASSES[(own, hf_class)]


def _new_stand_in(own: type, hf_class: Optional[type]) -> nn.Module:
    """An empty module of the class with_hf_class(own, hf_class) makes; unpickling then sets its state."""
    return nn.Module.__new__(with_hf_class(own, hf_class))


class RouterLogits(HFClassStandIn):
    """Parameter-free stand-in for the HF router: forward(logits_SE) returns a tuple holding the logits at the
    index the model's output recorder reads. `weight` (and `bias`, `e_score_correction_bias` where the model's
    router has them) are the ds_tutel gate's tensors (the same ones, not copies), so code that inspects the HF
    router still finds them. The gate is held as a plain attribute, not a submodule: its tensors keep their one
    name, and deepcopy maps the reference to the copy's gate."""

    _class_suffix = "Logits"

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
        if not hasattr(self._gate, "selection_bias"):
            raise AttributeError("this router has no selection bias")
        return self._gate.selection_bias

    def extra_repr(self) -> str:  # not the HF router's (a Linear's reads attributes this has not)
        return f"router logits at output {self.output_index}"

    def forward(self, logits_SE: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        out = [None] * (self.output_index + 1)
        out[self.output_index] = logits_SE
        return tuple(out)


def router_logits_class(hf_router_class: Optional[type]) -> type:
    """RouterLogits made a subclass of the HF router class, for the output recorders' isinstance (transformers 5
    records router logits from the router's output); RouterLogits itself for None."""
    return with_hf_class(RouterLogits, hf_router_class)


def converted_block_class(hf_block_class: Optional[type]) -> type:
    """HFMoEBlock made a subclass of the HF block class (transformers 4 records router logits from the block's
    output); HFMoEBlock itself for None."""
    return with_hf_class(HFMoEBlock, hf_block_class)


# Plain attributes of the HF routers worth keeping on the stand-in (read by code that inspects routers).
ROUTER_ATTRIBUTES = ("top_k", "num_experts", "norm_topk_prob", "hidden_dim", "num_group", "n_group", "topk_group",
                     "routed_scaling_factor", "router_jitter_noise", "input_jitter_noise")


class HFMoEBlock(HFClassStandIn):
    """A converted sparse-MoE block: routed experts in `moe` (a ds_tutel.MoE), the router's logits through the
    stand-in registered under the HF router's name, shared experts under their HF names; `layout` is the HF
    experts' (ds_tutel.hf.layouts), which export writes back.

    forward(hidden_states [..., M]) -> [..., M] as the HF block returns it: GPT-OSS's, a tuple with the routing's
    gates [S, K], detached, in place of its router scores, which its decoder layer discards; with
    returns_router_logits (transformers 4's blocks), a tuple with the router logits [S, E].
    """

    _class_suffix = "Converted"

    def __init__(self, spec: BlockSpec, moe: nn.Module, router_logits: RouterLogits, layout: ExpertLayout,
                 shared_expert: Optional[nn.Module] = None, shared_expert_gate: Optional[nn.Module] = None,
                 jitter_noise: float = 0.0, returns_router_logits: bool = False, hf_block_class: str = "",
                 hf_names: Tuple[str, ...] = ()) -> None:
        nn.Module.__init__(self)  # not the HF block's __init__, where this is made its subclass
        self.spec = spec
        self.layout = layout
        self.returns_router_logits = bool(returns_router_logits)
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
    def moe(self) -> nn.Module:
        """The ds_tutel layer. A property, so that where this is made a subclass of the HF block class, that
        class's own `moe` method (DeepSeek-V3's in transformers 4) does not hide it."""
        return self._modules["moe"]

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
        for _ in range(self.spec.jitter_draws if self.training and self.jitter_noise > 0 else 0):
            # Mixtral's and Phi-MoE's input jitter: the same draws as the HF block (and router) make
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x_SM = hidden_states.reshape(-1, M)
        logits: List[torch.Tensor] = []  # the HF router's logits [S, E], where wanted

        def keep_logits(logits_SE: torch.Tensor) -> None:
            logits.append(logits_SE.to(self.router_weight.dtype))

        on_logits = None
        if self.router_logits._forward_hooks or self.returns_router_logits:
            if self._gate_logits_are_the_routers(x_SM):
                on_logits = keep_logits
            else:
                logits.append(F.linear(x_SM, self.router_weight, self.moe_gate.wg.bias))
        y_SM, _, _ = self.moe(x_SM, on_logits=on_logits)
        if self.router_logits._forward_hooks:  # something records router logits (the model's aux loss)
            self.router_logits(logits[0])
        if self.spec.shared_expert is not None:
            shared_SM = getattr(self, self.spec.shared_expert)(x_SM)
            if self.spec.shared_expert_gate is not None:
                shared_SM = torch.sigmoid(getattr(self, self.spec.shared_expert_gate)(x_SM)) * shared_SM
            y_SM = y_SM + shared_SM
        y = y_SM.reshape(hidden_states.shape)
        if self.returns_router_logits:
            return y, logits[0]
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
        out: Dict[str, Optional[torch.Tensor]] = {f"{spec.router}.weight": pick(gate.wg.weight)}
        if spec.router_bias:
            out[f"{spec.router}.bias"] = pick(gate.wg.bias)
        if spec.selection_bias is not None and buffers:
            out[f"{spec.router}.{spec.selection_bias}"] = gate.selection_bias.detach().clone()
        local = self.local_experts()
        stacked = {name: pick(param) for name, param in local.named_parameters()}
        device = local.gate_up_proj.weight.device
        pieces_E = {name: self._gather_experts(local_L, device)                                   # [E, ...]
                    for name, local_L in self.layout.from_stacked(stacked).items()}
        for name, tensor in self.layout.hf_entries(pieces_E, self.moe.num_experts).items():
            out[f"{spec.experts}.{name}"] = tensor
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
