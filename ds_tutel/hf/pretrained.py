"""`save_pretrained(model, dir)`: a converted model written in the Hugging Face layout, so that
`AutoModelForCausalLM.from_pretrained(dir)` builds the unconverted class with the trained weights.

The weights are export_state_dict's (the fused expert tensors, the HF router names), written as safetensors
(sharded with an index above max_shard_size, tied tensors written once, each in storage of its own) with the
model's config and generation config beside them. With expert parallelism the export is a collective over the
expert-parallel groups: every rank calls save_pretrained, rank 0 writes.
"""
from __future__ import annotations

import os
from typing import Dict, Union

import torch
from torch import nn


def _own_storage(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each tensor once (tied weights, the same view under two names, keep their first name) and in storage of its
    own: DeepSpeed's ZeRO keeps the module's parameters as views of one flat buffer, which safetensors would
    refuse as shared memory."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in state.items():
        view = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if view in seen:
            continue
        seen.add(view)
        whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        out[name] = tensor if whole else tensor.contiguous().clone()
    return out


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], max_shard_size: str = "5GB") -> None:
    """Writes config.json, generation_config.json (where the model has one) and the weights as safetensors.

    Call it on every rank where the model was converted with ep_size > 1 (the experts are gathered); only rank 0
    writes, and every rank returns once the files are complete."""
    import torch.distributed as dist
    from huggingface_hub import save_torch_state_dict

    from .convert import export_state_dict

    state = export_state_dict(model)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        os.makedirs(save_directory, exist_ok=True)
        model.config.save_pretrained(save_directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(save_directory)
        save_torch_state_dict(_own_storage(state), save_directory, max_shard_size=max_shard_size,
                              safe_serialization=True, metadata={"format": "pt"})
    if distributed:
        dist.barrier()
