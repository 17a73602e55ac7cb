"""ds_tutel.hf.convert with expert parallelism on spawned gloo ranks: every rank builds the same tiny random-weight
transformers model (same seed) and feeds its own tokens (a different number on each rank); the model converted with
ep_size = 2 or 4 gives, on each rank, the unconverted model's logits, loss and router-logit aux loss on that rank's
tokens, and its gradients, within fp32 rounding; export_state_dict gathers every expert and loads strictly into the
unconverted class with the same logits.

Gradients: the router and the shared experts are replicated, so each rank's gradient is the unconverted model's on
the same rank's tokens (before any data-parallel reduction). An expert lives on one rank and gets the rows of every
rank of its expert-parallel group, so its gradient is that of the sum of the group's losses: the unconverted
model's expert gradients summed over the group.

Through the DeepSpeed engine (ZeRO 1 with SGD, ZeRO 2 with AdamW, ep_size 2 on 2 ranks) the losses follow the
unconverted model trained data-parallel by a plain torch loop. DeepSeek-V3's aux-loss-free balancing moves the
correction bias by the loads summed over all ranks, the same on every rank.

Shape legend: B batch, T sequence length (per rank), V vocabulary, E experts, L local experts, M model dim,
I expert intermediate dim.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import pytest
import torch

from ds_tutel.ranks import run_ranks

pytest.importorskip("transformers")

from test_hf_convert import GRANITE, MLA, NO_ROUTER_LOGITS, exercised  # noqa: E402

pytestmark = pytest.mark.multirank

ATOL = 1e-5
VOCAB, B = 128, 2

# (name, model type, config overrides, ep_size): 2 layers, hidden 64, top-2 of 4 or 8 experts.
TWO_RANKS: List[Tuple[str, str, dict, int]] = [
    ("qwen3_moe", "qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True), 2),
    ("mixtral", "mixtral", dict(num_local_experts=4), 2),
    ("qwen2_moe", "qwen2_moe", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                    norm_topk_prob=False, mlp_only_layers=[0]), 2),
    ("deepseek_v3", "deepseek_v3", dict(**MLA, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                                        first_k_dense_replace=1), 2),
    ("gpt_oss", "gpt_oss", dict(num_local_experts=4, head_dim=16), 2),
    ("granitemoe", "granitemoe", dict(GRANITE, num_local_experts=4), 2),
    # Sampled routing in training (a wide margin: several candidates), input jitter drawn twice.
    ("phimoe", "phimoe", dict(num_local_experts=4, router_jitter_noise=0.5, input_jitter_noise=0.1), 2),
    ("olmoe", "olmoe", dict(num_experts=4, norm_topk_prob=False), 2),
    ("glm4_moe", "glm4_moe", dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=2,
                                  topk_group=1, routed_scaling_factor=1.5, first_k_dense_replace=1), 2),
    ("granitemoeshared", "granitemoeshared", dict(GRANITE, num_local_experts=4, shared_intermediate_size=32), 2),
]
# On 4 ranks: one expert-parallel group of 4, and two groups of 2 ([0, 1] and [2, 3]).
FOUR_RANKS: List[Tuple[str, str, dict, int]] = [
    ("qwen3_moe-ep4", "qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=False), 4),
    ("mixtral-ep2", "mixtral", dict(num_local_experts=4), 2),
    ("deepseek_v3-ep4", "deepseek_v3", dict(**MLA, n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1,
                                            n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False,
                                            first_k_dense_replace=0), 4),
    ("gpt_oss-ep4", "gpt_oss", dict(num_local_experts=8, head_dim=16), 4),
    ("qwen2_moe-ep4", "qwen2_moe", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                        norm_topk_prob=True), 4),
    ("olmoe-ep2", "olmoe", dict(num_experts=8, norm_topk_prob=True), 2),
    ("glm4_moe-ep4", "glm4_moe", dict(n_routed_experts=8, moe_intermediate_size=32, n_shared_experts=1, n_group=4,
                                      topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=0), 4),
    ("granitemoe-ep4", "granitemoe", dict(GRANITE, num_local_experts=8), 4),
    ("granitemoeshared-ep2", "granitemoeshared", dict(GRANITE, num_local_experts=4, shared_intermediate_size=32), 2),
    ("phimoe-ep4", "phimoe", dict(num_local_experts=8, router_jitter_noise=0.5), 4),
]
# Models without a router-logit aux loss (Granite-MoE records no router logits: test_hf_convert.NO_ROUTER_LOGITS).
NO_AUX_LOSS = ("deepseek_v3", "glm4_moe") + NO_ROUTER_LOGITS


def _tiny_model(model_type: str, seed: int, **overrides):
    import transformers
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    return exercised(transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **fields)))


def _is_expert(name: str) -> bool:
    """Whether an HF parameter name is one of the routed experts' fused tensors (not a shared expert's: those are
    `shared_expert.`, `shared_experts.`, `shared_mlp.`); the block is `mlp`, or Granite's `block_sparse_moe`."""
    return ".mlp.experts." in name or ".block_sparse_moe.experts." in name


def _run(model, ids_BT: torch.Tensor, seed: int = 2):
    """Forward with labels and router logits where the model records them (its aux loss in the loss), then
    backward; `seed` first, so that what a model draws in training (jitter, Phi-MoE's sampled routing) is drawn
    alike in both models."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(input_ids=ids_BT, labels=ids_BT,
                output_router_logits=model.config.model_type not in NO_ROUTER_LOGITS)
    out.loss.backward()
    return out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _check_case(rank: int, model_type: str, overrides: dict, ep_size: int) -> Dict[str, float]:
    """The largest differences, on this rank, between the unconverted model and the one converted at ep_size."""
    import torch.distributed as dist

    import ds_tutel.hf as hf
    original = _tiny_model(model_type, 0, **overrides)
    converted = hf.convert(copy.deepcopy(original), ep_size=ep_size)
    ep_group = hf.converted_blocks(converted)[0][1].moe.deepspeed_moe.ep_group
    ep_rank = dist.get_rank(group=ep_group)
    assert ep_rank == rank % ep_size  # DeepSpeed's default layout, the checkpoints' numbering
    T = 8 + 4 * rank  # a different token count on every rank
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(100 + rank))
    ref, got = _run(original, ids_BT), _run(converted, ids_BT)
    diffs = {"logits": _diff(ref.logits, got.logits),                                            # [B, T, V]
             "loss": abs(ref.loss.item() - got.loss.item())}
    if model_type in NO_AUX_LOSS:
        assert getattr(ref, "aux_loss", None) is None and getattr(got, "aux_loss", None) is None
    else:
        diffs["aux_loss"] = abs(ref.aux_loss.item() - got.aux_loss.item())

    # The unconverted model's gradients, expert ones summed over the expert-parallel group (transformers 4 leaves
    # an expert no token of this rank reached without one: zeros).
    ref_grads: Dict[str, torch.Tensor] = {}
    for name, param in original.named_parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
        if _is_expert(name):
            dist.all_reduce(grad, group=ep_group)
        ref_grads[name] = grad
    local, dense = 0.0, 0.0
    for block_name, block in hf.converted_blocks(converted):
        experts = block.local_experts()
        L = experts.num_local_experts
        assert L * ep_size == block.moe.num_experts
        assert all(p.group_name == f"ep_size_{ep_size}" and p.allreduce is False for p in experts.parameters())
        # The local experts' gradients in the HF layout: their slice of each fused tensor's gradient.
        stacked = {name: p.grad for name, p in experts.named_parameters()}
        pieces_L = block.layout.from_stacked(stacked)
        if block.layout.per_expert:  # transformers 4: local expert l's own tensors, global expert ep_rank * L + l
            pairs = [(grad, ref_grads[f"{block_name}.experts.{ep_rank * L + int(name.split('.')[0])}."
                                      f"{name.split('.', 1)[1]}"])
                     for name, grad in block.layout.hf_entries(pieces_L, L).items()]
        else:
            pairs = [(grad_L, ref_grads[f"{block_name}.experts.{name}"][ep_rank * L:(ep_rank + 1) * L])
                     for name, grad_L in pieces_L.items()]
        local = max([local] + [_diff(grad, ref) for grad, ref in pairs])
    grads = hf.export_grads(converted)  # a collective: every expert's gradient from its rank
    assert list(grads) == list(ref_grads)
    for name, grad in ref_grads.items():
        assert grads[name] is not None and grads[name].shape == grad.shape, name
        if not _is_expert(name):
            dense = max(dense, _diff(grads[name], grad))
    diffs["grad_local_experts"] = local
    diffs["grad_router_shared_dense"] = dense
    diffs["grad_exported"] = max(_diff(grads[name], grad) for name, grad in ref_grads.items())

    # Export: every rank gets the whole HF state dict; no step was taken, so it is the original's exactly.
    state = hf.export_state_dict(converted)
    original_state = original.state_dict()
    assert list(state) == list(original_state)
    assert all(torch.equal(state[k], v) for k, v in original_state.items())
    fresh = _tiny_model(model_type, 123, **overrides)
    fresh.load_state_dict(state, strict=True)
    fresh.eval(), original.eval(), converted.eval()
    twin = copy.deepcopy(converted)  # shares the expert-parallel group (a process group cannot be copied)
    twin_block, block = hf.converted_blocks(twin)[0][1], hf.converted_blocks(converted)[0][1]
    assert twin_block.moe.deepspeed_moe.ep_group is ep_group and twin_block.router_weight is not block.router_weight
    with torch.no_grad():
        diffs["export_logits"] = _diff(fresh(input_ids=ids_BT).logits, original(input_ids=ids_BT).logits)
        assert torch.equal(twin(input_ids=ids_BT).logits, converted(input_ids=ids_BT).logits)
    return diffs


def _check_balancing(rank: int, world_size: int) -> Dict[str, float]:
    """DeepSeek-V3 converted at ep_size = world_size with expert_bias=True: after one training forward (each rank
    on its own number of tokens) every rank holds bias0 + rate * sign(mean load - load), with the loads summed over
    all ranks."""
    import torch.distributed as dist

    import ds_tutel.hf as hf
    name, model_type, overrides, _ = next(case for case in TWO_RANKS if case[1] == "deepseek_v3")
    rate = 0.01
    converted = hf.convert(_tiny_model(model_type, 0, **overrides), ep_size=world_size, expert_bias=True,
                           expert_bias_rate=rate)
    (_, block), = hf.converted_blocks(converted)
    before_E = block.moe.deepspeed_moe.gate.selection_bias.clone()
    T = 8 + 4 * rank
    _run(converted, torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(200 + rank)))
    load_E = block.moe.deepspeed_moe.exp_counts.float()  # this rank's tokens
    dist.all_reduce(load_E)
    expected_E = before_E + rate * torch.sign(load_E.mean() - load_E)
    bias_E = block.moe.deepspeed_moe.gate.selection_bias
    everyone_W = [torch.empty_like(bias_E) for _ in range(world_size)]
    dist.all_gather(everyone_W, bias_E)
    return {"bias": _diff(bias_E, expected_E) + float(torch.equal(expected_E, before_E)),
            "bias_across_ranks": max(_diff(other_E, bias_E) for other_E in everyone_W)}


ENGINE_STEPS = 2
ENGINE_CASES = [(1, "SGD"), (2, "AdamW")]  # (ZeRO stage, optimizer)


def _engine_losses(rank: int, world_size: int, stage: int, optimizer: str) -> Tuple[List[float], List[float]]:
    """Losses of the model converted at ep_size = world_size through the DeepSpeed engine, and of the unconverted
    model trained data-parallel by a plain torch loop (gradients averaged over the ranks), each rank on its own
    tokens. The engine averages the dense gradients over the ranks and divides the expert ones (the gradient of
    the group's summed losses) by the number of ranks: the same update."""
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    import ds_tutel.hf as hf
    original = _tiny_model("qwen3_moe", 0, num_experts=4, moe_intermediate_size=32, norm_topk_prob=True)
    converted = hf.convert(copy.deepcopy(original), ep_size=world_size)
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(converted.parameters()), "name": "parameters"})
    assert [g["name"] for g in groups if g.get("moe")] == [f"ep_size_{world_size}"]
    from test_hf_engine import engine_and_reference
    engine, reference = engine_and_reference(converted, groups, original, optimizer, stage, micro_batch=B)
    ours, theirs = [], []
    for step in range(ENGINE_STEPS):
        ids_BT = torch.randint(3, VOCAB, (B, 12), generator=torch.Generator().manual_seed(1000 * step + rank))
        loss = engine(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
        engine.backward(loss)
        engine.step()
        reference.zero_grad()
        ref_loss = original(input_ids=ids_BT, labels=ids_BT, output_router_logits=True).loss
        ref_loss.backward()
        for param in original.parameters():
            if param.grad is None:  # an expert no token reached, in transformers 4's loop
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad.div_(world_size)
        reference.step()
        ours.append(loss.item())
        theirs.append(ref_loss.item())
    return ours, theirs


def _check_cases(rank: int, world_size: int, cases: List[Tuple[str, str, dict, int]],
                 engine: bool = False) -> Dict[str, Dict[str, float]]:
    """Every case in one set of spawned ranks: their start-up (DeepSpeed, transformers) is most of the time."""
    import transformers

    import ds_tutel.hf as hf
    transformers.logging.set_verbosity_error()
    with pytest.raises(ValueError, match="must divide the world size"):
        hf.convert(_tiny_model("mixtral", 0, num_local_experts=8), ep_size=3)
    results = {name: _check_case(rank, model_type, overrides, ep_size)
               for name, model_type, overrides, ep_size in cases}
    if engine:
        results["deepseek_v3-balancing"] = _check_balancing(rank, world_size)
    for stage, optimizer in ENGINE_CASES if engine else []:
        ours, theirs = _engine_losses(rank, world_size, stage, optimizer)
        results[f"engine-zero{stage}-{optimizer}"] = {
            f"loss_step{step}": abs(a - b) for step, (a, b) in enumerate(zip(ours, theirs))}
    return results


def _assert_exact(results: List[Dict[str, Dict[str, float]]]) -> None:
    for rank, per_case in enumerate(results):
        for case, diffs in per_case.items():
            for what, diff in diffs.items():
                assert diff < ATOL, (rank, case, what, diff)


def test_expert_parallel_over_two_ranks_matches_unconverted():
    _assert_exact(run_ranks(_check_cases, 2, TWO_RANKS, True, timeout=180))


@pytest.mark.slow
def test_expert_parallel_over_four_ranks_matches_unconverted():
    _assert_exact(run_ranks(_check_cases, 4, FOUR_RANKS, timeout=240))


def test_expert_parallel_needs_initialized_ranks():
    import torch.distributed as dist

    import ds_tutel.hf as hf
    if dist.is_initialized():
        pytest.skip("this process already runs torch.distributed")
    with pytest.raises(RuntimeError, match="init_distributed"):
        hf.convert(_tiny_model("mixtral", 0, num_local_experts=4), ep_size=2)
