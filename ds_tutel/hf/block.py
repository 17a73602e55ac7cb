"""The module that takes a transformers sparse-MoE block's place: its routed experts run in a `ds_tutel.MoE`, its
dense parts (a shared expert) stay HF modules, and the router logits still reach the model's own auxiliary loss.

transformers 5 collects router logits for `output_router_logits=True` with forward hooks that it installs, on
first use, on every module of the router's class (`_can_record_outputs`). `RouterLogits` is that capture point:
a parameter-free module registered under the router's name, of a subclass of the HF router class (so the hooks
find it), which passes through the logits that the block computes from the ds_tutel router's weight. The extra
router matmul runs only while a hook is installed on it.

Shape legend: S tokens, M model dim, E experts, L local experts (E / ep_size), I expert intermediate dim, n rows
one expert runs on.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .models import BlockSpec


class SwiGLUExpert(nn.Module):
    """One expert: down_proj(act(gate_proj(x)) * up_proj(x)), no biases (the HF experts' form)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.act_fn = act_fn

    def forward(self, x_nM: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x_nM)) * self.up_proj(x_nM))

    @torch.no_grad()
    def load_fused(self, gate_up_2IM: torch.Tensor, down_MI: torch.Tensor) -> None:
        """Copies one expert's slices of the HF fused tensors (gate rows first in gate_up)."""
        intermediate = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.copy_(gate_up_2IM[:intermediate])
        self.up_proj.weight.copy_(gate_up_2IM[intermediate:])
        self.down_proj.weight.copy_(down_MI)


class RouterLogits(nn.Module):
    """Parameter-free stand-in for the HF router: forward(logits_SE) returns a tuple holding the logits at the
    index the model's output recorder reads. `weight` is the ds_tutel router's weight (the same parameter, not a
    copy), so code that inspects the HF router still finds it. The router Linear is held as a plain attribute,
    not a submodule: the parameter keeps its one name, and deepcopy maps the reference to the copy's router."""

    def __init__(self, weight_owner: nn.Linear, output_index: int, attributes: Dict[str, object]) -> None:
        nn.Module.__init__(self)  # not the HF router's __init__: this module owns no parameters
        object.__setattr__(self, "_weight_owner", weight_owner)
        self.output_index = output_index
        for name, value in attributes.items():
            setattr(self, name, value)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self._weight_owner.weight

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
ROUTER_ATTRIBUTES = ("top_k", "num_experts", "norm_topk_prob", "hidden_dim")


class HFMoEBlock(nn.Module):
    """A converted sparse-MoE block: routed experts in `moe` (a ds_tutel.MoE), the router's logits through the
    stand-in registered under the HF router's name, shared experts under their HF names.

    forward(hidden_states [..., M]) -> [..., M], as the HF block returns it.
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
    def router_weight(self) -> nn.Parameter:
        """The router weight [E, M]: DeepSpeed's `deepspeed_moe.gate.wg.weight`."""
        return self.moe.deepspeed_moe.gate.wg.weight

    def extra_repr(self) -> str:
        return f"converted from {self.hf_block_class}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        M = hidden_states.shape[-1]
        if self.training and self.jitter_noise > 0:  # Mixtral's jitter: the same draw as the HF block makes
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x_SM = hidden_states.reshape(-1, M)
        if self.router_logits._forward_hooks:
            # Something records router logits (the model's aux loss): the HF router's logits, in its dtype.
            self.router_logits(F.linear(x_SM, self.router_weight))
        y_SM, _, _ = self.moe(x_SM)
        if self.spec.shared_expert is not None:
            shared_SM = getattr(self, self.spec.shared_expert)(x_SM)
            if self.spec.shared_expert_gate is not None:
                shared_SM = torch.sigmoid(getattr(self, self.spec.shared_expert_gate)(x_SM)) * shared_SM
            y_SM = y_SM + shared_SM
        return y_SM.reshape(hidden_states.shape)

    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def hf_tensors(self, pick: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
        """This block's tensors under the HF block's names and in its layout, relative to the block.

        pick maps each of our parameters to what to report (its data, its gradient); where it gives None for
        any piece of a fused tensor, the fused tensor is None. With expert parallelism (ep_size > 1) the fused
        tensors hold every expert: each rank's local experts are gathered over the expert-parallel group, so
        every rank of the group must call this, for the same blocks in the same order (a collective).
        """
        spec = self.spec
        experts = self.local_experts()
        out: Dict[str, Optional[torch.Tensor]] = {f"{spec.router}.weight": pick(self.router_weight)}

        def stacked(pieces) -> Optional[torch.Tensor]:
            pieces = list(pieces)
            local_L = None if any(p is None for p in pieces) else torch.stack(pieces)
            return self._gather_experts(local_L, experts[0].down_proj.weight.device)

        gate_up = []
        for expert in experts:
            gate_IM, up_IM = pick(expert.gate_proj.weight), pick(expert.up_proj.weight)
            gate_up.append(None if gate_IM is None or up_IM is None else torch.cat([gate_IM, up_IM]))
        out[f"{spec.experts}.gate_up_proj"] = stacked(gate_up)                                  # [E, 2I, M]
        out[f"{spec.experts}.down_proj"] = stacked(pick(e.down_proj.weight) for e in experts)  # [E, M, I]
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
