"""Hugging Face MoE models on ds_tutel: `convert(model)` swaps each sparse-MoE block of a transformers model for a
ds_tutel layer (exactly the model's routing, dropless), `export_state_dict(model)` gives the weights back in the
original layout. transformers is imported only when a model is converted. See docs/HF.md.
"""
from .convert import FIXED_ARGUMENTS, convert, converted_blocks, export_grads, export_state_dict
from .models import SUPPORTED_MODEL_TYPES, UnsupportedModelError

__all__ = ["FIXED_ARGUMENTS", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "convert", "converted_blocks",
           "export_grads", "export_state_dict"]
