"""ds_tutel.hf under transformers 4, whose MoE blocks keep per-expert Linear MLPs (an nn.ModuleList) where
transformers 5 fuses them: run by tests/test_hf_transformers4.py in a process whose path puts a transformers 4
install first (scripts/setup.sh makes one in .venv/transformers4). Prints its results as one JSON line after
RESULTS_MARK; every figure is a largest difference against the unconverted model, or a flag.

The checks are those of tests/test_hf_convert.py (one rank: logits, loss, aux loss, router logits, gradients,
export, eval and generate, pickling) on the model types transformers 4 has in this form, and of
tests/test_hf_parallel.py (expert parallelism over 2 gloo ranks; losses through the DeepSpeed engine with ZeRO 2)
on two of them, plus save_pretrained -> from_pretrained of the unconverted transformers 4 class. transformers 4's
block loops over the experts some token reached only, so an expert no token reached has no gradient there (None):
zeros here.

Shape legend: B batch, T sequence length, V vocabulary.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import sys
import tempfile
from typing import Any, Dict, Optional

import torch

RESULTS_MARK = "RESULTS "


def _grad_or_zeros(grad: Optional[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(param) if grad is None else grad


def single_rank(case: str) -> Dict[str, float]:
    """Largest differences between the unconverted model of `case` (test_hf_convert.CASES) and its conversion."""
    import ds_tutel.hf as hf
    from test_hf_convert import CASES, NO_AUX_LOSS, VOCAB, B, T, max_diff, moe_layer_count, run, tiny_model

    model_type, overrides = CASES[case]
    original = tiny_model(model_type, **overrides)
    converted = hf.convert(copy.deepcopy(original))
    blocks = hf.converted_blocks(converted)
    hf_block_class = type(original.get_submodule(blocks[0][0]))
    diffs: Dict[str, float] = {
        "blocks_of_the_hf_class": float(not all(isinstance(b, hf_block_class) for _, b in blocks)),
        "block_count": abs(len(blocks) - moe_layer_count(model_type, overrides))}
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    ref, got = run(original, ids_BT), run(converted, ids_BT)
    diffs["logits"] = max_diff(ref.logits, got.logits)                                          # [B, T, V]
    diffs["loss"] = abs(ref.loss.item() - got.loss.item())
    if model_type not in NO_AUX_LOSS:
        diffs["aux_loss"] = abs(ref.aux_loss.item() - got.aux_loss.item())
        diffs["router_logit_count"] = abs(len(ref.router_logits) - len(got.router_logits))
        diffs["router_logits"] = max(max_diff(a, b) for a, b in zip(ref.router_logits, got.router_logits))
    grads = hf.export_grads(converted)
    diffs["grad_names"] = float(list(grads) != [name for name, _ in original.named_parameters()])
    diffs["grads"] = max(max_diff(_grad_or_zeros(param.grad, param), _grad_or_zeros(grads[name], param))
                         for name, param in original.named_parameters())

    state = hf.export_state_dict(converted)
    diffs["export_names"] = float(list(state) != list(original.state_dict()))
    fresh = tiny_model(model_type, seed=123, **overrides)
    fresh.load_state_dict(state, strict=True)
    twin = pickle.loads(pickle.dumps(converted))  # the converted blocks' classes are made at run time
    for model in (original, converted, fresh, twin):
        model.eval()
    with torch.no_grad():
        logits = converted(input_ids=ids_BT).logits
        diffs["eval_logits"] = max_diff(original(input_ids=ids_BT).logits, logits)
        diffs["export_logits"] = max_diff(fresh(input_ids=ids_BT).logits, logits)
        diffs["pickled_logits"] = max_diff(twin(input_ids=ids_BT).logits, logits)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        diffs["generate"] = float(not torch.equal(original.generate(ids_BT[:, :6], **kw),
                                                  converted.generate(ids_BT[:, :6], **kw)))
    return diffs


def pretrained_round_trip() -> Dict[str, float]:
    """save_pretrained of a converted Mixtral, loaded by from_pretrained of the unconverted class."""
    import transformers

    import ds_tutel.hf as hf
    from test_hf_convert import VOCAB, max_diff, tiny_model

    converted = hf.convert(tiny_model("mixtral", num_local_experts=4)).eval()
    ids_BT = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(converted, directory)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return {"pretrained_logits": max_diff(loaded(input_ids=ids_BT).logits, converted(input_ids=ids_BT).logits),
                "pretrained_per_expert": float(not isinstance(loaded.model.layers[0].block_sparse_moe.experts,
                                                              torch.nn.ModuleList))}


def unsupported_message() -> str:
    """What converting a type transformers 4 has only in another form says."""
    import ds_tutel.hf as hf
    from test_hf_convert import CASES, tiny_model

    try:
        model_type, overrides = CASES["gpt_oss"]
        hf.convert(tiny_model(model_type, **overrides))
    except hf.UnsupportedModelError as err:
        return str(err)
    return ""


# Expert parallelism over 2 ranks: Mixtral (its recorder reads the block's output; w1/w3/w2 names) and
# DeepSeek-V3 (a block class with a `moe` method of its own; experts left without gradients).
EP2_CASES = ("mixtral", "deepseek_v3")


def expert_parallel(rank: int, world_size: int) -> Dict[str, Dict[str, float]]:
    """On each spawned rank: test_hf_parallel's checks of EP2_CASES, and the engine's losses (ZeRO 2, AdamW)
    against the unconverted model trained data-parallel."""
    import transformers

    from test_hf_parallel import TWO_RANKS, _check_cases, _engine_losses

    transformers.logging.set_verbosity_error()
    results = _check_cases(rank, world_size, [case for case in TWO_RANKS if case[0] in EP2_CASES])
    ours, theirs = _engine_losses(rank, world_size, 2, "AdamW")
    results["engine-zero2-AdamW"] = {f"loss_step{step}": abs(a - b) for step, (a, b) in enumerate(zip(ours, theirs))}
    return results


def main() -> None:
    import transformers

    import ds_tutel.hf.models as models
    from ds_tutel.ranks import run_ranks
    from test_hf_convert import CASES

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    supported = models.TRANSFORMERS4_MODEL_TYPES
    results: Dict[str, Any] = {
        "transformers": transformers.__version__,
        "single": {case: single_rank(case) for case, (model_type, _) in sorted(CASES.items())
                   if model_type in supported},
        "pretrained": pretrained_round_trip(),
        "unsupported": unsupported_message(),
        "ep2": run_ranks(expert_parallel, 2, timeout=240),
    }
    sys.stdout.flush()
    print(RESULTS_MARK + json.dumps(results))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
