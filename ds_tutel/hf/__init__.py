"""Hugging Face MoE models on ds_tutel: `convert(model)` swaps each sparse-MoE block of a transformers model for a
ds_tutel layer (exactly the model's routing, dropless), `export_state_dict(model)` gives the weights back in the
original layout. `convert_from_config(model, ds_config)` takes ep_size and the options from the DeepSpeed JSON's
"ds_tutel": {"hf": {...}} section; `save_checkpoint` / `load_checkpoint` save and resume a converted model through
the DeepSpeed engine (weights and optimizer state, also at another expert-parallel size); `save_pretrained` writes
the HF layout that `from_pretrained` of the unconverted class loads. transformers is imported only when a model is
converted (transformers 5, or 4.57 for the types whose blocks hold per-expert MLPs there). See docs/HF.md.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import convert_from_config, hf_options
from .convert import FIXED_ARGUMENTS, convert, converted_blocks, export_grads, export_state_dict
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .pretrained import save_pretrained

__all__ = ["FIXED_ARGUMENTS", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "convert", "convert_from_config",
           "converted_blocks", "export_grads", "export_state_dict", "hf_options", "load_checkpoint",
           "save_checkpoint", "save_pretrained"]
