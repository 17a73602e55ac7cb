"""ds_tutel.MoE equals deepspeed.moe.layer.MoE on identical weights: outputs, l_aux, exp_counts, all gradients."""
import pytest
import torch

from helpers import paired_layers, run_step

M = 12


def assert_same(reference, ours, x, seed=1, atol=1e-6):
    out_r, laux_r, counts_r, gx_r, grads_r = run_step(reference, x, seed)
    out_o, laux_o, counts_o, gx_o, grads_o = run_step(ours, x, seed)
    torch.testing.assert_close(out_o, out_r, atol=atol, rtol=1e-5)
    torch.testing.assert_close(laux_o, laux_r, atol=1e-6, rtol=1e-6)
    assert counts_o.dtype == counts_r.dtype and torch.equal(counts_o, counts_r)
    torch.testing.assert_close(gx_o, gx_r, atol=atol, rtol=1e-5)
    assert grads_o.keys() == grads_r.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_o[name], grads_r[name], atol=atol, rtol=1e-5, msg=name)


DETERMINISTIC = dict(use_rts=False, top2_2nd_expert_sampling=False)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_deterministic_options_match(k, capacity_factor, drop_tokens):
    reference, ours = paired_layers(M, num_experts=6, k=k, capacity_factor=capacity_factor, min_capacity=2,
                                    drop_tokens=drop_tokens, **DETERMINISTIC)
    x = torch.randn(4, 9, M)
    assert_same(reference, ours, x)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_eval_capacity_factor_and_eval_mode(k):
    reference, ours = paired_layers(M, num_experts=4, k=k, capacity_factor=2.0, eval_capacity_factor=0.5,
                                    min_capacity=0, **DETERMINISTIC)
    reference.eval(), ours.eval()
    assert_same(reference, ours, torch.randn(30, M))


@pytest.mark.parametrize("k,policy", [(1, "Jitter"), (1, "RSample"), (1, None), (2, "Jitter"), (2, None),
                                      (3, "Jitter")])
def test_random_options_draw_what_deepspeed_draws(k, policy):
    """RTS, Jitter, RSample and 2nd-expert sampling: the same seed gives the same decisions as DeepSpeed."""
    reference, ours = paired_layers(M, num_experts=4, k=k, capacity_factor=0.75, noisy_gate_policy=policy,
                                    use_rts=True, top2_2nd_expert_sampling=True)
    assert_same(reference, ours, torch.randn(40, M), seed=7)


def test_min_capacity_and_residual():
    reference, ours = paired_layers(M, num_experts=4, k=2, min_capacity=16, use_residual=True, **DETERMINISTIC)
    assert {n for n, _ in ours.named_parameters()} >= {"mlp.0.weight", "coefficient.weight", "coefficient.bias"}
    assert_same(reference, ours, torch.randn(2, 10, M))


def test_used_token_k1():
    reference, ours = paired_layers(M, num_experts=4, k=1, min_capacity=0, **DETERMINISTIC)
    x = torch.randn(20, M)
    used = (torch.arange(20) % 3 != 0).long()
    outs = []
    for layer in (reference, ours):
        out, l_aux, counts = layer(x, used)
        outs.append((out, l_aux, counts))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    assert torch.equal(outs[1][2], outs[0][2])
    assert int(outs[1][2].sum()) == int(used.sum())
    assert torch.all(outs[1][0][used == 0] == 0)


@pytest.mark.parametrize("k", [2, 3])
def test_used_token_removes_tokens_for_every_k(k):
    """DeepSpeed ignores used_token for k>1; ours routes nothing for unused tokens whatever k is."""
    _, ours = paired_layers(M, num_experts=4, k=k, min_capacity=0, **DETERMINISTIC)
    x = torch.randn(20, M)
    used = (torch.arange(20) % 4 != 0).long()
    out, _, counts = ours(x, used)
    assert int(counts.sum()) == k * int(used.sum())
    assert torch.all(out[used == 0] == 0) and torch.all(out[used == 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches(dtype):
    reference, ours = paired_layers(M, num_experts=4, k=2, **DETERMINISTIC)
    reference.to(dtype), ours.to(dtype)
    x = torch.randn(3, 8, M, dtype=dtype)
    out_r, laux_r, counts_r, gx_r, grads_r = run_step(reference, x)
    out_o, laux_o, counts_o, gx_o, grads_o = run_step(ours, x)
    assert out_o.dtype == dtype and laux_o.dtype == torch.float32
    torch.testing.assert_close(out_o, out_r)
    torch.testing.assert_close(laux_o, laux_r)
    assert torch.equal(counts_o, counts_r)
    torch.testing.assert_close(gx_o, gx_r)
    for name in grads_r:
        torch.testing.assert_close(grads_o[name], grads_r[name], msg=name)


def test_router_is_fp32_under_autocast():
    _, ours = paired_layers(M, num_experts=4, k=2, **DETERMINISTIC)
    x = torch.randn(16, M)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, l_aux, _ = ours(x)
        logits = ours.deepspeed_moe.gate.logits(x)
    assert logits.dtype == torch.float32 and l_aux.dtype == torch.float32
    assert ours.deepspeed_moe.last_routing.probs_SE.dtype == torch.float32
    out.float().sum().backward()
    assert ours.deepspeed_moe.gate.wg.weight.grad is not None
    # Same routing as without autocast: the router never saw bf16.
    _, _, counts_fp32 = ours(x)
    assert torch.equal(ours.deepspeed_moe.last_routing.counts_E, counts_fp32)
