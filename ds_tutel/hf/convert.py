"""Conversion of a transformers MoE model to ds_tutel layers, and export back to the HF layout.

convert(model) replaces, in place, every sparse-MoE block of a supported model type by an `HFMoEBlock` whose
routed experts run in a `ds_tutel.MoE` (an instance of DeepSpeed's MoE: the engine groups its expert parameters)
with dropless Tutel routing that reproduces the model's own: its routing rule (ds_tutel.routing.rules: softmax
top-k, renormalised where the model renormalises; DeepSeek-V3's sigmoid group-limited top-k with its correction
bias and scaling; GPT-OSS's and Granite-MoE's top-k then softmax) on fp32 logits. export_state_dict(model) gives
the state dict of the unconverted model.

With ep_size > 1 each rank keeps only the experts its place in DeepSpeed's expert-parallel group owns (router and
shared experts stay whole on every rank); export gathers the experts back over the group, on every rank.

Shape legend: E experts, L local experts, M model dim, I expert intermediate dim.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .block import ROUTER_ATTRIBUTES, HFMoEBlock, converted_block_class, router_logits_class
from .layouts import ExpertLayout
from .models import BlockSpec, spec_for

# ds_tutel.MoE / routing arguments that follow from the HF block and cannot be chosen.
FIXED_ARGUMENTS = ("hidden_size", "expert", "num_experts", "ep_size", "k", "routing_rule", "n_group", "topk_group",
                   "routed_scaling_factor", "router_bias", "sparsemixer_eps")


def moe_arguments(normalize: bool, options: Dict[str, Any]) -> Dict[str, Any]:
    """ds_tutel.MoE keyword arguments: dropless Tutel routing (no capacity, no dropping), gates renormalised as
    the model renormalises, no ds_tutel aux loss (the model computes its own from the router logits); `options`
    override any of these. The routing rule itself is set on the gate (BlockSpec.rule_options)."""
    fixed = sorted(set(options) & set(FIXED_ARGUMENTS))
    if fixed:
        raise TypeError(f"convert() sets {', '.join(fixed)} from the model; they cannot be passed as options")
    arguments: Dict[str, Any] = dict(capacity_mode="tutel", capacity_factor=0.0, eval_capacity_factor=0.0,
                                     min_capacity=0, drop_tokens=False, normalize_gate=normalize, aux_loss="none")
    arguments.update(options)
    return arguments


def _check_block_layout(spec: BlockSpec, block: nn.Module, layout: ExpertLayout) -> Tuple[int, int, int]:
    """(E, M, I) of a HF block whose parameters (and selection-bias buffer) are exactly those this conversion
    reads, else ValueError."""
    experts = getattr(block, spec.experts)
    try:
        expert_tensors = layout.tensors(experts)
        E, M, I = layout.hf_dims(experts)
    except ValueError as err:
        raise ValueError(f"{type(block).__name__}: {err}") from None
    router = getattr(block, spec.router)
    expected = {f"{spec.router}.weight"} | {f"{spec.experts}.{name}" for name in expert_tensors}
    if spec.router_bias:
        expected.add(f"{spec.router}.bias")
    for name in spec.dense_modules():
        expected |= {f"{name}.{key}" for key, _ in getattr(block, name).named_parameters()}
    found = {name for name, _ in block.named_parameters()}
    if found != expected:
        raise ValueError(f"{type(block).__name__} has parameters this conversion does not know: "
                         f"unexpected {sorted(found - expected)}, missing {sorted(expected - found)}")
    if tuple(router.weight.shape) != (E, M):
        raise ValueError(f"{type(block).__name__}: router weight {tuple(router.weight.shape)} is not [E={E}, M={M}]")
    if spec.selection_bias is not None:
        bias = getattr(router, spec.selection_bias, None)
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (E,):
            raise ValueError(f"{type(block).__name__}: expected the router buffer {spec.selection_bias} [E={E}]")
    return E, M, I


def _router_logits_index(model: nn.Module, router_class: type) -> int:
    """Where in the router's output tuple the model's recorder reads the router logits (0 by default)."""
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    for spec in recorder if isinstance(recorder, list) else [recorder]:
        if getattr(spec, "target_class", None) is router_class:
            return int(spec.index)
    return 0


def expert_parallel_rank(moe: nn.Module) -> int:
    """This rank's place in the layer's expert-parallel group (0 at ep_size 1): its local expert l is global
    expert ep_rank * L + l, as the all-to-all lays out [ep ranks, L local experts] and as the checkpoints number
    them. At ep_size > 1 the layer joins DeepSpeed's group first (set_deepspeed_parallelism: the group
    deepspeed.initialize would make, or the existing one of that name); with DeepSpeed's default layout
    (expert parallel before data parallel) the place is global rank % ep_size."""
    if moe.ep_size == 1:
        return 0
    import torch.distributed as dist

    if moe.deepspeed_moe.ep_group is None:
        moe.set_deepspeed_parallelism()
    return dist.get_rank(group=moe.deepspeed_moe.ep_group)


def convert_block(spec: BlockSpec, block: nn.Module, ep_size: int, options: Dict[str, Any],
                  router_logits_index: int = 0) -> HFMoEBlock:
    """The HFMoEBlock that computes what `block` computes, with its weights (copied; `block` is left as it was)."""
    from ..experts import mark_expert_params
    from ..layer import MoE

    spec = spec.for_block(block)
    experts = getattr(block, spec.experts)
    layout = spec.layout(experts)
    E, M, I = _check_block_layout(spec, block, layout)
    router = getattr(block, spec.router)
    expert_tensors = layout.tensors(experts)
    first = next(iter(expert_tensors.values()))
    # The experts (stacked: ds_tutel.stacked_experts) are made on the meta device (no initialisation, no fp32
    # copy of bf16 weights), then given storage on the HF experts' device and filled from the HF tensors.
    template = layout.template(experts, M, I, device=torch.device("meta"), dtype=first.dtype)
    moe = MoE(M, template, num_experts=E, ep_size=ep_size, k=spec.top_k(block),
              **moe_arguments(spec.normalizes(block), options), **spec.rule_options(block))
    gate = moe.deepspeed_moe.gate
    local = moe.deepspeed_moe.experts
    local.to_empty(device=first.device)
    mark_expert_params(local, moe.expert_group_name)  # to_empty made new parameters: mark them again
    ep_rank = expert_parallel_rank(moe)
    L = E // ep_size
    with torch.no_grad():  # local expert l is global expert ep_rank * L + l
        for name, tensor_L in layout.to_stacked(experts, ep_rank * L, (ep_rank + 1) * L).items():
            local.get_parameter(name).copy_(tensor_L)
    trainable = any(t.requires_grad for t in expert_tensors.values())
    for param in local.parameters():  # frozen HF experts stay frozen
        param.requires_grad_(trainable)
    wg = gate.wg
    wg.to(device=router.weight.device, dtype=router.weight.dtype)
    with torch.no_grad():
        wg.weight.copy_(router.weight)
        if spec.router_bias:
            wg.bias.copy_(router.bias)
    for param in wg.parameters():
        param.requires_grad_(router.weight.requires_grad)
    moe.to(device=router.weight.device)  # anything else the layer holds (buffers)
    if spec.selection_bias is not None:
        with torch.no_grad():
            gate.selection_bias.copy_(getattr(router, spec.selection_bias))
    attributes = {name: getattr(router, name) for name in ROUTER_ATTRIBUTES if hasattr(router, name)}
    # A plain Linear router (transformers 4) is not what any recorder looks for: its stand-in needs no HF class.
    logits = router_logits_class(None if type(router) is nn.Linear else type(router))(
        gate, router_logits_index, attributes)
    # Hooks the model's output recorders already put on the HF router (a recorded forward before conversion)
    # move to the stand-in; otherwise transformers installs them on first use.
    for hook in router._forward_hooks.values():
        logits.register_forward_hook(hook)
    dense = {name: getattr(block, name) for name in spec.dense_modules()}
    # transformers 4's models record router logits from the block's own output: the stand-in is of its class.
    converted_class = converted_block_class(type(block) if layout.per_expert else None)
    return converted_class(spec, moe, logits, layout, shared_expert=dense.get(spec.shared_expert),
                           shared_expert_gate=dense.get(spec.shared_expert_gate),
                           jitter_noise=getattr(block, spec.jitter_attr, 0.0) if spec.jitter_attr else 0.0,
                           returns_router_logits=layout.per_expert and spec.per_expert_returns_logits,
                           hf_block_class=type(block).__name__, hf_names=tuple(block.state_dict()))


def convert(model: nn.Module, ep_size: int = 1, **options: Any) -> nn.Module:
    """Replaces, in place, each sparse-MoE block of a transformers model by a ds_tutel layer; returns the model.

    The model type comes from `model.config.model_type` (ds_tutel.hf.SUPPORTED_MODEL_TYPES). options are
    ds_tutel.MoE keyword arguments (capacity_mode, capacity_factor, batch_prioritized_routing, dispatch_backend,
    ...) over the dropless routing that reproduces the model's; for example expert_bias=True (with
    expert_bias_rate) turns on aux-loss-free balancing, which for DeepSeek-V3 / GLM-4-MoE moves the model's own
    e_score_correction_bias in training: bias += rate * sign(mean load - load), loads summed over all ranks.
    Call it before deepspeed.initialize.

    ep_size > 1 shards the experts over DeepSpeed's expert-parallel groups of ep_size ranks: call it on every
    rank, after deepspeed.init_distributed(), on the same model (same weights); each rank keeps the
    num_experts // ep_size experts its place in its group owns (local expert l of place w is global expert
    w * num_experts // ep_size + l) and the router and shared experts whole.
    """
    config = getattr(model, "config", None)
    spec = spec_for(getattr(config, "model_type", None))
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size must be a positive int, got {ep_size!r}")
    if ep_size > 1:
        _check_distributed(ep_size)
    block_class = spec.load_block_class()
    found: List[Tuple[str, nn.Module]] = [(name, m) for name, m in model.named_modules()
                                           if isinstance(m, block_class) and not isinstance(m, HFMoEBlock)]
    if not found:
        raise ValueError(f"no {block_class.__name__} in this {spec.model_type} model (already converted?)")
    training = model.training
    for name, block in found:
        block_spec = spec.for_block(block)
        owner = _owner_of(model, name)
        index = _router_logits_index(owner, type(getattr(block, block_spec.router)))
        new = convert_block(block_spec, block, ep_size, options, router_logits_index=index)
        new.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    model.train(training)
    return model


def _check_distributed(ep_size: int) -> None:
    """Expert parallelism needs the ranks up (deepspeed.init_distributed) and ep_size dividing their number."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"convert(..., ep_size={ep_size}) needs torch.distributed: call "
                           "deepspeed.init_distributed() first (every rank converts the same model)")
    if dist.get_world_size() % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({dist.get_world_size()})")


def _owner_of(model: nn.Module, module_name: str) -> nn.Module:
    """The innermost transformers PreTrainedModel holding `module_name` (its output recorders apply there)."""
    from transformers import PreTrainedModel

    owner = model
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        candidate = model.get_submodule(".".join(parts[:i]))
        if isinstance(candidate, PreTrainedModel):
            owner = candidate
    return owner


def converted_blocks(model: nn.Module) -> List[Tuple[str, HFMoEBlock]]:
    """(name, block) of every converted block of `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, HFMoEBlock)]


def _hf_layout(model: nn.Module, own: Dict[str, Optional[torch.Tensor]],
               pick: Callable[[torch.Tensor], Optional[torch.Tensor]],
               buffers: bool = True) -> Dict[str, Optional[torch.Tensor]]:
    """`own` (the converted model's tensors by name) with each converted block's entries replaced by its HF ones
    (buffers included or not), in the model's order."""
    blocks = converted_blocks(model)
    out: Dict[str, Optional[torch.Tensor]] = {}
    emitted = set()
    for key, value in own.items():
        block = next(((name, b) for name, b in blocks if key.startswith(name + ".")), None)
        if block is None:
            out[key] = value
            continue
        name, b = block
        if name not in emitted:
            emitted.add(name)
            out.update({f"{name}.{k}": v for k, v in b.hf_tensors(pick, buffers=buffers).items()})
    return out


def export_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The converted model's state dict in the original HF layout: `load_state_dict(strict=True)` into the
    unconverted transformers model of the same config gives the same model. Tensors are detached copies for the
    converted blocks and the model's own tensors elsewhere.

    With expert parallelism (convert(..., ep_size > 1)) this is a collective: every rank of each expert-parallel
    group must call it; each gathers the other ranks' experts, and every rank gets the full state dict."""
    return _hf_layout(model, model.state_dict(), lambda p: p.detach().clone())


def export_grads(model: nn.Module) -> Dict[str, Optional[torch.Tensor]]:
    """Each parameter's gradient under the HF model's parameter names and layout (None where there is none):
    what the unconverted model's `named_parameters()` gradients would be. With expert parallelism, a collective
    as export_state_dict is: every rank gets every expert's gradient from the rank that holds the expert, which
    is the gradient of the sum of the expert-parallel group's losses (each rank's tokens reach the experts of
    all ranks); the other parameters' gradients are this rank's own, before any data-parallel reduction."""
    own = {name: (None if p.grad is None else p.grad) for name, p in model.named_parameters()}
    return _hf_layout(model, own, lambda p: None if p.grad is None else p.grad.detach().clone(), buffers=False)
