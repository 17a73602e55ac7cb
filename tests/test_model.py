"""The GPT-style MoE model: shapes, MoE placement, causality, layout-independent init, presets and the dry run.

Shape legend: B batch, T sequence, V vocab.
"""
import dataclasses

import pytest
import torch

from ds_tutel.train.model import GPTMoE, ModelConfig, check_parallel_layout, dropped_fraction, expert_counts
from ds_tutel.train.plan import format_plan, memory_plan
from ds_tutel.train.presets import PRESETS, get_preset

SMALL = ModelConfig(seq_len=16, d_model=32, n_layers=4, n_heads=4, num_experts=4, ep_size=1, k=1,
                    capacity_factor=1.25, eval_capacity_factor=4.0)


def test_forward_shapes_moe_in_every_second_block_and_routing_readouts():
    torch.manual_seed(0)
    model = GPTMoE(SMALL, seed=3)
    idx_BT = torch.randint(0, 256, (2, 16))
    logits_BTV, l_aux = model(idx_BT)
    assert logits_BTV.shape == (2, 16, 256)
    assert l_aux.dim() == 0 and float(l_aux.detach()) > 0
    assert [block.is_moe for block in model.blocks] == [False, True, False, True]
    assert len(model.moe_layers()) == 2
    counts_LE = expert_counts(model)
    assert counts_LE.shape == (2, 4) and counts_LE.sum(dim=1).tolist() == [32, 32]  # top-1: one choice per token
    drop_L = dropped_fraction(model)
    assert drop_L.shape == (2,) and bool(((drop_L >= 0) & (drop_L <= 1)).all())


def test_model_is_causal_when_no_token_is_dropped():
    # With eval capacity >= tokens per expert nothing is dropped, so a later token cannot change earlier logits.
    model = GPTMoE(SMALL, seed=1).eval()
    idx_BT = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    changed_BT = idx_BT.clone()
    changed_BT[0, 10:] = (changed_BT[0, 10:] + 7) % 256
    with torch.no_grad():
        a_BTV, _ = model(idx_BT)
        b_BTV, _ = model(changed_BT)
    torch.testing.assert_close(a_BTV[:, :10], b_BTV[:, :10])
    assert not torch.allclose(a_BTV[:, 10:], b_BTV[:, 10:])


def test_experts_are_initialised_by_global_id_so_every_layout_builds_the_same_model():
    full = GPTMoE(SMALL, seed=5)
    two = dataclasses.replace(SMALL, ep_size=2)
    halves = [GPTMoE(two, ep_rank=r, seed=5) for r in range(2)]
    full_state = full.state_dict()
    prefix = "deepspeed_moe.experts.deepspeed_experts."
    for r, half in enumerate(halves):
        for name, value in half.state_dict().items():
            if prefix in name:
                head, rest = name.split(prefix)
                local, tail = rest.split(".", 1)
                name = f"{head}{prefix}{r * 2 + int(local)}.{tail}"
            torch.testing.assert_close(value, full_state[name], rtol=0, atol=0, msg=name)
    experts = full.moe_layers()[0].deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0][0].weight, experts[1][0].weight)  # experts are not copies of one another


def test_layout_checks_name_the_problem():
    with pytest.raises(ValueError, match="num_experts \\(4\\) is not divisible by ep_size \\(3\\)"):
        check_parallel_layout(4, 3, 3)
    with pytest.raises(ValueError, match="ep_size \\(2\\) does not divide the world size \\(3\\)"):
        check_parallel_layout(4, 2, 3)
    assert ModelConfig(num_experts=4).resolved(2).ep_size == 2
    with pytest.raises(ValueError, match="d_model"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("huge")


def test_trillion_parameter_preset_dry_run_on_the_meta_device():
    cfg = PRESETS["gpt-moe-1.1t"]
    assert (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.ffn_mult, cfg.moe_every) == (32, 32, 128, 4, 2)
    plan = memory_plan(cfg, world_size=512, precision="bf16")
    params = plan["parameters"]
    expert = 2 * 4096 * 16384 + 16384 + 4096
    assert params["experts"] == 16 * 512 * expert  # one expert per GPU in each of the 16 MoE layers
    assert 1.09e12 < params["total"] < 1.12e12
    assert params["experts_per_rank"] == 16 * expert
    gib = plan["per_rank_gib"]
    # Experts are not replicated (ep_size == world size), so each rank keeps all their optimizer state.
    assert gib["fp32_master_and_adam"] == pytest.approx(12 * (params["dense"] / 512 + 16 * expert) / 2 ** 30,
                                                        rel=1e-2)
    assert gib["total"] < 80  # fits an 80 GB GPU before activations
    assert "1.104e+12" in format_plan(plan)


def test_dry_run_refuses_a_layout_that_does_not_divide():
    with pytest.raises(ValueError, match="ep_size \\(512\\) does not divide the world size \\(100\\)"):
        memory_plan(PRESETS["gpt-moe-1.1t"], world_size=100)
