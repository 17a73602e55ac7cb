"""copy.deepcopy of a layer: parameters are copied with their DeepSpeed marks, the expert-parallel process group is
shared."""
import copy
import threading

import torch

import ds_tutel
from helpers import expert_ffn

M = 8


def test_a_copy_shares_the_process_group_and_copies_the_weights():
    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=2)
    group = threading.Lock()  # stands in for a ProcessGroup: it cannot be pickled or copied either
    layer.deepspeed_moe.ep_group = group
    twin = copy.deepcopy(layer)
    assert twin.deepspeed_moe.ep_group is group
    for (name, p), (twin_name, q) in zip(layer.named_parameters(), twin.named_parameters()):
        assert name == twin_name and p is not q and torch.equal(p, q)
        assert getattr(q, "allreduce", True) == getattr(p, "allreduce", True)
        assert getattr(q, "group_name", None) == getattr(p, "group_name", None)
    assert any(getattr(q, "allreduce", True) is False for q in twin.parameters()), "experts must stay marked"
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    assert not torch.equal(next(layer.parameters()), next(twin.parameters()))


def test_a_copy_of_a_single_rank_layer_computes_the_same():
    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, k=2)
    twin = copy.deepcopy(layer)
    x = torch.randn(6, M)
    torch.manual_seed(0)  # the second choice's sampling draws random numbers
    y = layer(x)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(twin(x)[0], y, rtol=0, atol=0)
