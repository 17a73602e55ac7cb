"""The `"ds_tutel": {"hf": {...}}` section of a DeepSpeed JSON config: how `convert` treats a Hugging Face model.

    {"train_micro_batch_size_per_gpu": 4, ...,
     "ds_tutel": {"hf": {"ep_size": 2, "capacity_factor": 1.25, "dispatch_backend": "torch"}}}

`convert_from_config(model, config)` reads it (config: a dict or a JSON path) and converts the model, whose type
comes from `model.config.model_type`. The section holds `ep_size` and `convert`'s options (ds_tutel.MoE keyword
arguments other than those the model fixes). Every key and value is checked here, before any collective: unknown
keys, keys the model fixes and bad values raise ValueError naming the section. The other keys of "ds_tutel" are
the options of layers built with `ds_tutel.MoE.from_config`; they do not apply to converted models, but a typo
among them is reported here too. DeepSpeed's own config parser ignores the whole "ds_tutel" section.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

from torch import nn

from ..options import HF_SUBSECTION as HF_KEY
from ..options import SECTION, ConfigSource, load_section, moe_kwargs

WHERE = f'the "{SECTION}": {{"{HF_KEY}": ...}} config section'


def _moe_signature() -> inspect.Signature:
    from ..layer import MoE
    return inspect.signature(MoE.__init__)


def hf_options(config: ConfigSource) -> Tuple[Optional[int], Dict[str, Any]]:
    """(ep_size, convert options) from the config's "ds_tutel"."hf" section, checked; ep_size None where the
    section does not set it (convert_from_config then uses 1, the training job the world size).

    Raises ValueError for unknown keys, keys that follow from the model, and values ds_tutel.MoE would refuse.
    """
    from .convert import FIXED_ARGUMENTS

    section = load_section(config)
    layer_keys = {k: v for k, v in section.items() if k != HF_KEY}
    moe_kwargs({SECTION: layer_keys}, _moe_signature())  # a typo beside "hf" must not pass unnoticed
    raw = section.get(HF_KEY, {})
    if not isinstance(raw, Mapping):
        raise ValueError(f"{WHERE} must be a JSON object, got {type(raw).__name__}")
    options = dict(raw)
    ep_size = options.pop("ep_size", None)
    if ep_size is not None and (isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1):
        raise ValueError(f"{WHERE}: ep_size must be a positive int, got {ep_size!r}")
    accepted = set(_moe_signature().parameters) - {"self", "hidden_size", "expert"}
    fixed = sorted(set(options) & (set(FIXED_ARGUMENTS) - {"ep_size"}))
    if fixed:
        raise ValueError(f"{WHERE}: {fixed} follow from the model and cannot be set")
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{WHERE}: unknown keys {unknown}; valid keys: "
                         f"{sorted({'ep_size'} | accepted - set(FIXED_ARGUMENTS))}")
    check_options(options)
    return ep_size, options


def check_options(options: Mapping[str, Any]) -> None:
    """Raises ValueError where ds_tutel.MoE would refuse these convert options. The checks are the layer's own:
    a layer of placeholder size is built on the meta device (no memory, no communication) with them."""
    import torch

    from ..layer import MoE
    from .convert import moe_arguments

    try:
        with torch.device("meta"):
            MoE(8, nn.Linear(8, 8, bias=False), num_experts=2, ep_size=1, k=1,
                **moe_arguments(True, dict(options)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{WHERE}: {e}") from None


def convert_from_config(model: nn.Module, config: ConfigSource, **overrides: Any) -> nn.Module:
    """`convert(model, ep_size, **options)` with ep_size and options from the config's "ds_tutel"."hf" section
    (a dict or a JSON path), explicit keyword arguments winning; returns the model. Call it on every rank before
    deepspeed.initialize (after deepspeed.init_distributed() where ep_size > 1)."""
    from .convert import convert

    ep_size, options = hf_options(config)
    ep_size = overrides.pop("ep_size") if "ep_size" in overrides else 1 if ep_size is None else ep_size
    options.update(overrides)
    if overrides:
        check_options(options)
    return convert(model, ep_size=ep_size, **options)
