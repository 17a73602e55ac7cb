"""The "ds_tutel" section of a DeepSpeed JSON config: MoE arguments a team can switch without code changes."""
from __future__ import annotations

import inspect
import json
import os
from typing import Any, Dict, Mapping, Union

SECTION = "ds_tutel"
ConfigSource = Union[str, os.PathLike, Mapping[str, Any]]


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

    Unknown keys are an error (a typo must not silently leave a feature off).
    """
    section = load_section(config)
    valid = set(accepted.parameters) - {"self", "hidden_size", "expert"}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ValueError(f'unknown keys in the "{SECTION}" config section: {unknown}; valid keys: {sorted(valid)}')
    return {**section, **overrides}
