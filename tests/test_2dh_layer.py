"""ds_tutel.MoE with a2a_algorithm flat / 2dh / auto and overlap degrees 1, 2, 4 on 4 spawned gloo ranks
emulating 2 nodes x 2: the output and every gradient equal a single-process reference, and 2dh equals flat bit
for bit. Unequal token counts per rank; ep_size 4 spans both nodes, ep_size 2 sits inside one (2dh is flat).

Shape legend: S tokens, M model dim.
"""
import pytest
import torch

from helpers import EXPERT_PREFIX as PREFIX, local_expert_state
from ds_tutel.ranks import run_ranks

pytestmark = pytest.mark.multirank

M = 6
TOKENS_PER_RANK = [7, 12, 3, 9]
LAYOUTS = [(4, 4, 1), (4, 8, 2), (2, 4, 2)]  # (ep_size, num_experts, k)


def _step(layer, x_SM):
    x_SM = x_SM.clone().requires_grad_()
    out_SM, l_aux, _ = layer(x_SM)
    ((out_SM * torch.linspace(-1, 1, M)).square().sum() + 0.1 * l_aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return out_SM.detach(), x_SM.grad, grads


def _check_layer(rank, world_size):
    import torch.distributed as dist
    import ds_tutel
    from helpers import expert_ffn

    inputs = [torch.randn(s, M, generator=torch.Generator().manual_seed(100 + r))
              for r, s in enumerate(TOKENS_PER_RANK)]
    checked = []
    for ep_size, num_experts, k in LAYOUTS:
        kwargs = dict(num_experts=num_experts, k=k, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        torch.manual_seed(0)
        reference = ds_tutel.MoE(M, expert_ffn(M), **kwargs)
        ep_rank = rank % ep_size  # DeepSpeed's expert-parallel groups are consecutive ranks
        group = range(rank - ep_rank, rank - ep_rank + ep_size)
        num_local = num_experts // ep_size

        ref = {r: _step(reference, inputs[r]) for r in group}
        ref_expert_grads = {n: sum(ref[r][2][n] for r in group) for n in ref[rank][2] if n.startswith(PREFIX)}
        ref_expert_grads = local_expert_state(ref_expert_grads, ep_rank * num_local, num_local)

        results = {}
        for algorithm in ("flat", "2dh", "auto"):
            for degree in (1, 2, 4):
                # Capacity buffers for all, so that flat and 2dh exchange the same bytes (flat in one piece would
                # otherwise send only the kept rows: tests/test_kept_exchange.py).
                layer = ds_tutel.MoE(M, expert_ffn(M), ep_size=ep_size, a2a_algorithm=algorithm,
                                     a2a_ffn_overlap_degree=degree, a2a_send="capacity", **kwargs)
                layer.load_state_dict(local_expert_state(reference.state_dict(), ep_rank * num_local, num_local))
                layer.set_deepspeed_parallelism()
                out_SM, grad_x_SM, grads = results[algorithm, degree] = _step(layer, inputs[rank])
                what = f"ep_size={ep_size} E={num_experts} k={k} {algorithm} d={degree}"
                torch.testing.assert_close(out_SM, ref[rank][0], msg=lambda m: f"output {what}: {m}")
                torch.testing.assert_close(grad_x_SM, ref[rank][1], msg=lambda m: f"input grad {what}: {m}")
                for name, grad in grads.items():
                    expected = ref_expert_grads[name] if name.startswith(PREFIX) else ref[rank][2][name]
                    torch.testing.assert_close(grad, expected, msg=lambda m: f"{name} {what}: {m}")
                # Same chunking, same numbers: the hierarchical exchange moves exactly flat's bytes.
                flat = results["flat", degree]
                assert torch.equal(out_SM, flat[0]) and torch.equal(grad_x_SM, flat[1]), what
                assert all(torch.equal(grads[n], flat[2][n]) for n in grads), what
        checked.append((ep_size, num_experts, k))

    # The layer's 2dh really runs on the node subgroups where the group spans nodes.
    seen = set()
    original = dist.all_to_all_single

    def recording(output, input, *args, group=None, **kw):
        seen.add(tuple(dist.get_process_group_ranks(group)))
        return original(output, input, *args, group=group, **kw)

    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=4, a2a_algorithm="2dh", drop_tokens=False)
    layer.set_deepspeed_parallelism()
    dist.all_to_all_single = recording
    try:
        layer(inputs[rank])[0].sum().backward()
    finally:
        dist.all_to_all_single = original
    node, local = divmod(rank, 2)
    assert seen == {(2 * node, 2 * node + 1), (local, local + 2)}, seen
    return checked


def test_layer_2dh_and_overlap_equal_single_process_reference_on_2_nodes_x_2():
    # auto with a threshold above every message here picks 2dh (the default threshold would pick flat).
    results = run_ranks(_check_layer, 4, local_size=2, env={"DS_TUTEL_A2A_AUTO_THRESHOLD": "1G"}, timeout=300)
    assert results == [LAYOUTS] * 4
