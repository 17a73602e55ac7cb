"""Bad input fails with a clear exception before any collective starts."""
import pytest
import torch
from torch import nn

import ds_tutel
from ds_tutel.ranks import run_ranks

M = 8


def build(**kwargs):
    return ds_tutel.MoE(M, nn.Linear(M, M), **{"num_experts": 4, **kwargs})


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(num_experts=6, ep_size=4), ValueError, "divisible by ep_size"),
    (dict(k=0), ValueError, "k must be"),
    (dict(k=5), ValueError, r"k must be an int in \[1, num_experts=4\]"),
    (dict(k=1.5), ValueError, "k must be"),
    (dict(noisy_gate_policy="Gaussian"), ValueError, "noisy_gate_policy"),
    (dict(num_experts=0), ValueError, "num_experts must be a positive int"),
    (dict(ep_size=0), ValueError, "ep_size must be a positive int"),
    (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
    (dict(min_capacity=-2), ValueError, "min_capacity"),
    (dict(a2a_send="filled"), ValueError, r"a2a_send must be one of \('kept', 'capacity'\)"),
])
def test_constructor_rejects(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        build(**kwargs)


def test_expert_must_be_a_module():
    with pytest.raises(TypeError, match="expert must be a torch.nn.Module"):
        ds_tutel.MoE(M, lambda x: x, num_experts=2)


def test_wrong_last_dimension():
    with pytest.raises(ValueError, match="last dimension hidden_size=8"):
        build()(torch.randn(3, M + 1))


@pytest.mark.parametrize("x", [torch.ones(3, M, dtype=torch.long), torch.ones(3, M, dtype=torch.bool)])
def test_non_floating_input(x):
    with pytest.raises(TypeError, match="floating point"):
        build()(x)


def test_used_token_of_wrong_length():
    with pytest.raises(ValueError, match="one value per token"):
        build()(torch.randn(2, 3, M), torch.ones(5))


def test_expert_parallel_layer_without_group_says_how_to_fix():
    with pytest.raises(RuntimeError, match="set_deepspeed_parallelism"):
        build(ep_size=2)(torch.randn(3, M))


def _ep_not_dividing_world(rank, world_size):
    layer = build(num_experts=4, ep_size=4)
    try:
        layer.set_deepspeed_parallelism()
    except ValueError as e:
        return str(e)
    return "no error"


def test_ep_size_not_dividing_world_size():
    messages = run_ranks(_ep_not_dividing_world, 2, timeout=60)
    assert all("ep_size (4) must divide the world size (2)" in m for m in messages)


def _bad_input_on_every_rank_then_good(rank, world_size):
    """A rejected call leaves no collective half-started: the next good call on all ranks completes."""
    layer = build(ep_size=2)
    layer.set_deepspeed_parallelism()
    try:
        layer(torch.randn(3, M + 1))
    except ValueError:
        pass
    out, _, _ = layer(torch.randn(3, M))
    return tuple(out.shape)


def test_rejected_input_does_not_desynchronise_ranks():
    assert run_ranks(_bad_input_on_every_rank_then_good, 2, timeout=60) == [(3, M), (3, M)]
