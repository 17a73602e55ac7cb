"""Every option of the layer in one place: allowed values, defaults, checks, the "ds_tutel" section of a DeepSpeed
JSON config and the environment overrides.

Options reach the layer from three places, always through this module: `ds_tutel.MoE`'s keyword arguments, the
JSON section (`MoE.from_config`, explicit arguments win) and two environment variables that hold per-cluster or
per-machine settings (DS_TUTEL_A2A_AUTO_THRESHOLD, DS_TUTEL_CPU_KERNELS). Every check runs before any collective,
so that bad input fails loudly instead of hanging a job.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

CAPACITY_MODES = ("deepspeed", "tutel")
AUX_LOSSES = ("gshard", "switch", "none")
A2A_ALGORITHMS = ("flat", "2dh", "auto")
A2A_SENDS = ("kept", "capacity")
DISPATCH_BACKENDS = ("auto", "triton", "torch")
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")
# How fp32 router logits become each token's choices and gate weights (ds_tutel/routing/rules.py).
DEFAULT_ROUTING_RULE = "softmax_topk"
ROUTING_RULES = (DEFAULT_ROUTING_RULE, "sigmoid_group_topk", "topk_softmax", "sparsemixer")

SECTION = "ds_tutel"
ConfigSource = Union[str, os.PathLike, Mapping[str, Any]]

AUTO_THRESHOLD_ENV = "DS_TUTEL_A2A_AUTO_THRESHOLD"
# Largest message (bytes per rank) for which a2a_algorithm="auto" picks 2DH. Zero: auto is flat unless
# configured, because on the machines measured so far (docs/ALLTOALL.md) 2DH never beat flat; set the value that
# benchmarks/bench_alltoall.py reports for your cluster.
DEFAULT_AUTO_THRESHOLD_BYTES = 0
CPU_KERNELS_ENV = "DS_TUTEL_CPU_KERNELS"
CPU_KERNELS_MODES = ("auto", "0", "1")


# ----------------------------------------------------------------------------------------------------------------
# Routing options

@dataclass(kw_only=True)
class RouterOptions:
    """How the gate routes and which losses it adds.

    capacity_mode: "deepspeed" (DeepSpeed's capacity and drop rules) or "tutel" (capacity_factor > 0 fixed,
        0 dropless, < 0 bounded no-pad; k-major queues, see routing/tutel.py).
    batch_prioritized_routing: (tutel) an overflowing expert keeps the highest-scoring tokens first.
    normalize_gate: (tutel) top-k gate values renormalised to sum to 1 per token.
    gate_noise: std of normal noise (divided by E) on the logits that choose experts, training only.
    input_dropout: dropout probability on the router's input, training only.
    input_jitter: epsilon of multiplicative uniform jitter on the router's input, training only.
    aux_loss: "gshard" (DeepSpeed's l_aux), "switch", or "none".
    z_loss_coef: weight of the router z-loss (mean squared logsumexp of the logits) added to l_aux.
    expert_bias: (tutel) aux-loss-free balancing: a per-expert bias added to the scores for selection only,
        moved by expert_bias_rate toward balance from the load observed in each training forward.
    routing_rule: (tutel) how the logits become choices and gates (routing/rules.py): "softmax_topk" (softmax
        over the experts, top-k; the default), "sigmoid_group_topk" (DeepSeek-V3: sigmoid scores, top-k inside
        the topk_group best of n_group expert groups, selection bias always present), "topk_softmax" (GPT-OSS:
        top-k of the logits, softmax over the k chosen), "sparsemixer" (Phi-MoE: two picks, each among the experts
        within sparsemixer_eps of the best remaining one, sampled in training; k must be 2).
    n_group, topk_group: (sigmoid_group_topk) experts form n_group equal groups; each token picks among the
        experts of its topk_group best groups (a group scores the sum of its two best selection scores).
    routed_scaling_factor: (tutel) every gate weight multiplied by this after normalisation (DeepSeek-V3).
    router_bias: the router `wg` gets a bias (GPT-OSS); DeepSpeed's router has none.
    sparsemixer_eps: (sparsemixer) how close to the best logit, relatively, an expert must be to be a candidate
        (Phi-MoE's router_jitter_noise).
    """

    capacity_mode: str = "deepspeed"
    batch_prioritized_routing: bool = False
    normalize_gate: bool = True
    gate_noise: float = 0.0
    input_dropout: float = 0.0
    input_jitter: float = 0.0
    aux_loss: str = "gshard"
    z_loss_coef: float = 0.0
    expert_bias: bool = False
    expert_bias_rate: float = 1e-3
    routing_rule: str = DEFAULT_ROUTING_RULE
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    sparsemixer_eps: float = 0.01

    def __post_init__(self) -> None:
        if self.capacity_mode not in CAPACITY_MODES:
            raise ValueError(f"capacity_mode must be one of {CAPACITY_MODES}, got {self.capacity_mode!r}")
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")
        for name in ("gate_noise", "input_jitter", "z_loss_coef", "expert_bias_rate", "sparsemixer_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.input_dropout, (int, float)) or not 0 <= self.input_dropout < 1:
            raise ValueError(f"input_dropout must be in [0, 1), got {self.input_dropout!r}")
        if self.capacity_mode == "deepspeed":
            for name in ("batch_prioritized_routing", "expert_bias"):
                if getattr(self, name):
                    raise ValueError(f"{name}=True needs capacity_mode='tutel' (DeepSpeed's routing has no such rule)")
        check_routing_rule(self.routing_rule, self.n_group, self.topk_group, self.routed_scaling_factor)
        if not isinstance(self.router_bias, bool):
            raise ValueError(f"router_bias must be a bool, got {self.router_bias!r}")
        if self.routing_rule == "sparsemixer" and (self.expert_bias or self.gate_noise > 0):
            raise ValueError("routing_rule='sparsemixer' samples its own choices in training: expert_bias and "
                             "gate_noise do not apply to it")
        if self.capacity_mode == "deepspeed" and self.uses_rule:
            raise ValueError(f"routing_rule={self.routing_rule!r} with routed_scaling_factor="
                             f"{self.routed_scaling_factor!r} needs capacity_mode='tutel' (DeepSpeed's routing is "
                             "softmax top-k)")

    @property
    def uses_rule(self) -> bool:
        """Whether routing goes through a rule of routing/rules.py rather than the built-in softmax top-k."""
        return self.routing_rule != DEFAULT_ROUTING_RULE or self.routed_scaling_factor != 1.0

    @property
    def has_selection_bias(self) -> bool:
        """Whether the gate holds a per-expert selection bias (its `selection_bias` buffer): for balancing, or as
        part of the rule (DeepSeek-V3's score correction bias)."""
        return self.expert_bias or self.routing_rule == "sigmoid_group_topk"

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def pick(cls, kwargs: Dict[str, Any]) -> "RouterOptions":
        """Builds options from the matching keys of kwargs (others are left alone)."""
        return cls(**{k: kwargs[k] for k in cls.field_names() if k in kwargs})

# ----------------------------------------------------------------------------------------------------------------
# Checks of the constructor's and forward's arguments

def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_constructor(*, hidden_size: Any, expert: Any, num_experts: Any, ep_size: Any, k: Any,
                      capacity_factor: Any, eval_capacity_factor: Any, min_capacity: Any,
                      noisy_gate_policy: Any, allowed_policies: Sequence[Optional[str]] = NOISY_GATE_POLICIES,
                      capacity_mode: str = "deepspeed") -> None:
    """Validates the constructor arguments shared with DeepSpeed's MoE."""
    _positive_int("hidden_size", hidden_size)
    _positive_int("num_experts", num_experts)
    _positive_int("ep_size", ep_size)
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be a torch.nn.Module, got {type(expert).__name__}")
    if num_experts % ep_size != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    check_k(k, num_experts)
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        check_capacity_factor(name, value, capacity_mode)
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
    if noisy_gate_policy not in allowed_policies:
        raise ValueError(f"noisy_gate_policy must be one of {list(allowed_policies)}, got {noisy_gate_policy!r}")


def check_routing_rule(routing_rule: Any, n_group: Any = 1, topk_group: Any = 1,
                       routed_scaling_factor: Any = 1.0) -> None:
    """A known rule name; group sizes that only the group-limited rule reads; a positive scaling factor."""
    if not isinstance(routing_rule, str) or routing_rule not in ROUTING_RULES:
        raise ValueError(f"unknown routing_rule {routing_rule!r}: choose one of {ROUTING_RULES}")
    for name, value in (("n_group", n_group), ("topk_group", topk_group)):
        _positive_int(name, value)
    if topk_group > n_group:
        raise ValueError(f"topk_group ({topk_group}) must be <= n_group ({n_group})")
    if routing_rule != "sigmoid_group_topk" and (n_group, topk_group) != (1, 1):
        raise ValueError(f"n_group and topk_group need routing_rule='sigmoid_group_topk', got {routing_rule!r}")
    if (isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float))
            or not routed_scaling_factor > 0):
        raise ValueError(f"routed_scaling_factor must be a number > 0, got {routed_scaling_factor!r}")


def check_expert_groups(num_experts: int, k: int, n_group: int, topk_group: int) -> None:
    """Group-limited routing needs n_group equal groups of at least two experts (a group scores its two best)
    and k within the experts of the topk_group chosen groups."""
    if n_group == 1:
        return
    if num_experts % n_group or num_experts // n_group < 2:
        raise ValueError(f"n_group ({n_group}) must divide num_experts ({num_experts}) into groups of >= 2 experts")
    if k > topk_group * (num_experts // n_group):
        raise ValueError(f"k ({k}) exceeds the {topk_group * (num_experts // n_group)} experts of topk_group="
                         f"{topk_group} groups of {num_experts // n_group}")


def check_capacity_factor(name: str, value: Any, capacity_mode: str) -> None:
    """Any number in Tutel's capacity mode (negative = bounded, 0 = dropless); >= 0 in DeepSpeed's."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if capacity_mode == "deepspeed" and value < 0:
        raise ValueError(f"{name} must be >= 0 with capacity_mode='deepspeed' (negative values are Tutel's "
                         f"bounded capacity: pass capacity_mode='tutel'), got {value!r}")


def check_k(k: Any, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ValueError(f"k must be an int in [1, num_experts={num_experts}], got {k!r}")


def check_algorithm(algorithm: Any) -> str:
    if not isinstance(algorithm, str) or algorithm not in A2A_ALGORITHMS:
        raise ValueError(f"a2a algorithm must be one of {A2A_ALGORITHMS}, got {algorithm!r}")
    return algorithm


def check_exchange(a2a_algorithm: Any, overlap_degree: Any, a2a_send: Any = "kept") -> None:
    if a2a_send not in A2A_SENDS:
        raise ValueError(f"a2a_send must be one of {A2A_SENDS}, got {a2a_send!r}")
    check_algorithm(a2a_algorithm)
    check_overlap_degree(overlap_degree)


def check_overlap_degree(overlap_degree: Any) -> None:
    if isinstance(overlap_degree, bool) or not isinstance(overlap_degree, int) or overlap_degree < 1:
        raise ValueError(f"a2a_ffn_overlap_degree must be an int >= 1, got {overlap_degree!r}")


def check_backend(dispatch_backend: Any) -> None:
    if dispatch_backend not in DISPATCH_BACKENDS:
        raise ValueError(f"dispatch_backend must be one of {DISPATCH_BACKENDS}, got {dispatch_backend!r}")


def check_parallel_setup(ep_size: int, mpu: Any, expert_tensor_parallel: bool) -> None:
    """ep_size must divide the world; tensor-parallel models are not supported yet."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call deepspeed.init_distributed() first")
    world_size = dist.get_world_size()
    if world_size % ep_size != 0:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world_size})")
    if mpu is not None and mpu.get_tensor_model_parallel_world_size() > 1:
        raise NotImplementedError("ds_tutel.MoE does not support tensor-parallel models (mpu with tensor-parallel "
                                  "size > 1) yet; use deepspeed.moe.layer.MoE for them")


def check_forward_input(hidden_states: Any, hidden_size: int, used_token: Optional[Any]) -> None:
    """hidden_states must be a floating tensor [..., hidden_size]; used_token one value per token."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.dim() < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(f"hidden_states must have last dimension hidden_size={hidden_size}, "
                         f"got shape {tuple(hidden_states.shape)}")
    if used_token is not None:
        num_tokens = hidden_states.numel() // hidden_size
        if not isinstance(used_token, torch.Tensor) or used_token.numel() != num_tokens:
            raise ValueError(f"used_token must be a tensor with one value per token ({num_tokens})")

# ----------------------------------------------------------------------------------------------------------------
# The JSON config section

HF_SUBSECTION = "hf"


def load_section(config: ConfigSource) -> Dict[str, Any]:
    """The "ds_tutel" section of a DeepSpeed config given as a dict or a JSON file path ({} if absent)."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    section = config.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise ValueError(f'the "{SECTION}" section must be a JSON object')
    return dict(section)


def moe_kwargs(config: ConfigSource, accepted: inspect.Signature, **overrides: Any) -> Dict[str, Any]:
    """Keyword arguments for ds_tutel.MoE from the config section, overridden by explicit ones.

    Unknown keys are an error (a typo must not silently leave a feature off). The nested "hf" object is the
    Hugging Face conversion's (ds_tutel.hf.convert_from_config), not the layer's.
    """
    section = {key: value for key, value in load_section(config).items() if key != HF_SUBSECTION}
    valid = set(accepted.parameters) - {"self", "hidden_size", "expert"}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(f'unknown keys in the "{SECTION}" config section: {unknown}; valid keys: {sorted(valid)}')
    return {**section, **overrides}


# ----------------------------------------------------------------------------------------------------------------
# Environment overrides

def parse_bytes(text: str) -> int:
    """'65536', '64K', '4M', '1G' (powers of 1024) -> bytes."""
    raw = text.strip().upper().rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1:], 1)
    digits = raw[:-1] if scale != 1 else raw
    try:
        value = int(float(digits) * scale)
    except ValueError:
        raise ValueError(f"not a byte count: {text!r} (examples: 65536, 64K, 4M)") from None
    if value < 0:
        raise ValueError(f"byte count must be >= 0, got {text!r}")
    return value


def auto_threshold(threshold: Optional[int] = None) -> int:
    """The auto threshold in bytes: the argument, else $DS_TUTEL_A2A_AUTO_THRESHOLD, else the default."""
    if threshold is None:
        raw = os.environ.get(AUTO_THRESHOLD_ENV)
        return DEFAULT_AUTO_THRESHOLD_BYTES if raw is None or raw.strip() == "" else parse_bytes(raw)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"auto threshold must be an int >= 0 (bytes), got {threshold!r}")
    return threshold


def cpu_kernels_mode() -> str:
    """$DS_TUTEL_CPU_KERNELS, checked: "auto" (default: build the compiled CPU loops, fall back with a warning),
    "0" (never: the torch path), "1" (required: a failed build raises)."""
    value = os.environ.get(CPU_KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in CPU_KERNELS_MODES:
        raise ValueError(f"{CPU_KERNELS_ENV} must be one of {CPU_KERNELS_MODES}, got {value!r}")
    return value
