"""Expert parallelism on 4 spawned gloo ranks equals a single-process reference (outputs and all gradients)."""
import pytest
import torch

from helpers import local_expert_state
from ds_tutel.ranks import run_ranks

pytestmark = pytest.mark.multirank

M = 8
LAYOUTS = [  # (ep_size, num_experts, k, drop_tokens[, more ds_tutel.MoE options])
    (1, 4, 2, True),
    (2, 4, 1, True),
    (2, 4, 2, False),
    (4, 4, 2, True),
    (4, 8, 3, True),
    (4, 8, 1, False),
]


def _loss(out, l_aux):
    return (out * torch.linspace(-1, 1, out.shape[-1])).square().sum() + 0.1 * l_aux


def _check_layouts(rank, world_size, tokens_per_rank):
    import ds_tutel
    from helpers import expert_ffn

    for ep_size, num_experts, k, drop_tokens, *more in LAYOUTS:
        kwargs = dict(num_experts=num_experts, k=k, drop_tokens=drop_tokens, min_capacity=2, use_rts=False,
                      top2_2nd_expert_sampling=False, **(more[0] if more else {}))
        torch.manual_seed(0)
        reference = ds_tutel.MoE(M, expert_ffn(M), **kwargs)
        layer = ds_tutel.MoE(M, expert_ffn(M), ep_size=ep_size, **kwargs)
        num_local = num_experts // ep_size
        ep_rank = rank % ep_size  # DeepSpeed's expert-parallel groups are consecutive ranks
        layer.load_state_dict(local_expert_state(reference.state_dict(), ep_rank * num_local, num_local))
        layer.set_deepspeed_parallelism()

        inputs = [torch.randn(tokens_per_rank[r], M, generator=torch.Generator().manual_seed(100 + r))
                  for r in range(world_size)]
        out, l_aux, counts = layer(inputs[rank])
        _loss(out, l_aux).backward()

        # Reference: every rank's tokens through one full layer; expert grads summed over the ranks of this
        # rank's expert-parallel group, the gate's grad from this rank's tokens alone.
        group_start = rank - ep_rank
        ref_gate_grad = None
        for r in range(group_start, group_start + ep_size):
            ref_out, ref_l_aux, ref_counts = reference(inputs[r])
            reference.deepspeed_moe.gate.wg.weight.grad = None
            _loss(ref_out, ref_l_aux).backward()
            if r == rank:
                torch.testing.assert_close(out, ref_out, msg=f"output {ep_size, num_experts, k}")
                torch.testing.assert_close(l_aux, ref_l_aux)
                assert torch.equal(counts, ref_counts)
                ref_gate_grad = reference.deepspeed_moe.gate.wg.weight.grad.clone()
        torch.testing.assert_close(layer.deepspeed_moe.gate.wg.weight.grad, ref_gate_grad)
        ref_grads = local_expert_state({n: p.grad for n, p in reference.named_parameters() if "experts" in n},
                                     ep_rank * num_local, num_local)
        for name, p in layer.named_parameters():
            if "experts" in name:
                torch.testing.assert_close(p.grad, ref_grads[name], msg=lambda m: f"{name} {ep_size, num_experts, k}: {m}")
    return True


def test_expert_parallel_layouts_equal_single_process_reference():
    assert run_ranks(_check_layouts, 4, [12, 12, 12, 12], timeout=240) == [True] * 4


def _unequal_tokens(rank, world_size):
    import ds_tutel
    from helpers import expert_ffn
    torch.manual_seed(0)
    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=2, k=2, capacity_factor=1.0)
    layer.set_deepspeed_parallelism()
    x = torch.randn(5 + 7 * rank, M, requires_grad=True)
    out, l_aux, _ = layer(x)
    (out.sum() + l_aux).backward()
    routing = layer.deepspeed_moe.last_routing
    kept_per_expert = routing.kept_per_expert()
    assert int(kept_per_expert.max()) <= routing.capacity
    return routing.capacity, tuple(out.shape)


def test_unequal_token_counts_agree_on_capacity_without_hanging():
    (cap0, shape0), (cap1, shape1) = run_ranks(_unequal_tokens, 2, timeout=120)
    assert cap0 == cap1  # the buffers exchanged by the all-to-all have one shape on every rank
    assert shape0 == (5, M) and shape1 == (12, M)


def test_dropless_with_unequal_token_counts_equals_reference():
    assert run_ranks(_check_layouts_dropless, 4, timeout=240) == [True] * 4


def _check_layouts_dropless(rank, world_size):
    global LAYOUTS
    LAYOUTS = [(2, 4, 2, False), (4, 8, 1, False),
               (2, 4, 2, False, dict(capacity_mode="tutel", capacity_factor=0.0, eval_capacity_factor=0.0))]
    return _check_layouts(rank, world_size, [5, 9, 14, 3])


def _collectives_per_forward(rank, world_size):
    import ds_tutel
    import ds_tutel.layer as layer_module
    from helpers import expert_ffn
    calls = {"agree": 0, "counts": 0}
    agree_max, exchange_counts = layer_module.agree_max, layer_module.exchange_counts

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    layer_module.agree_max = counting("agree", agree_max)
    layer_module.exchange_counts = counting("counts", exchange_counts)
    seen = {}
    tutel_dropless = dict(capacity_mode="tutel", capacity_factor=0.0)
    for case, drop_tokens, tokens, more in [("equal", True, 12, {}), ("unequal", True, 5 + 7 * rank, {}),
                                            ("dropless", False, 12, {}),
                                            ("tutel_dropless", False, 5 + 7 * rank, tutel_dropless)]:
        calls.update(agree=0, counts=0)
        torch.manual_seed(0)
        layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=2, k=2, drop_tokens=drop_tokens,
                             use_rts=False, top2_2nd_expert_sampling=False, **more)
        layer.set_deepspeed_parallelism()
        x = torch.randn(tokens, M, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        out, l_aux, _ = layer(x)
        (out.sum() + l_aux).backward()
        routing = layer.deepspeed_moe.last_routing
        assert int(routing.kept_per_expert().max()) <= routing.capacity
        seen[case] = (dict(calls), routing.capacity)
    return seen


def test_capacity_rides_with_the_kept_counts_and_ranks_route_again_only_when_they_differ():
    """Equal token counts: no all-reduce, one small exchange. Unequal: still no all-reduce, every rank routes
    again with the largest capacity (one more exchange). DeepSpeed's dropless capacity depends on the data: agreed
    first. Tutel's dropless routing keeps every choice at any capacity from a rank's own largest count up: no
    all-reduce, no routing again, even with unequal token counts; the ranks still end with one capacity."""
    seen = run_ranks(_collectives_per_forward, 2, timeout=120)
    for rank_seen in seen:
        assert rank_seen["equal"][0] == {"agree": 0, "counts": 1}
        assert rank_seen["unequal"][0] == {"agree": 0, "counts": 2}
        assert rank_seen["dropless"][0]["agree"] >= 1 and rank_seen["dropless"][0]["counts"] == 1
        assert rank_seen["tutel_dropless"][0] == {"agree": 0, "counts": 1}
    for case in ("equal", "unequal", "dropless", "tutel_dropless"):
        assert seen[0][case][1] == seen[1][case][1]  # one capacity on both ranks
