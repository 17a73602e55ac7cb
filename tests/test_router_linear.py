"""The router's linear map: DeepSpeed's fp32 logits from half-precision tokens, without an fp32 copy kept alive."""
import pytest
import torch
import torch.nn.functional as F

from ds_tutel.routing import router_linear as rl
from ds_tutel.routing.gate import Gate


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,M,E", [(100, 64, 4), (1500, 96, 8), (1024, 32, 64)])
def test_equals_linear_of_the_fp32_copy(dtype, S, M, E, monkeypatch):
    monkeypatch.setattr(rl, "ROWS_PER_BLOCK", 256)  # several blocks, one of them partial at S=1500
    gen = torch.Generator().manual_seed(S + E)
    x_SM = torch.randn(S, M, generator=gen).to(dtype).requires_grad_(True)
    w_EM = torch.randn(E, M, generator=gen).requires_grad_(True)
    grad_SE = torch.randn(S, E, generator=gen)

    logits_SE = rl.router_linear(x_SM, w_EM)
    grad_x, grad_w = torch.autograd.grad(logits_SE, (x_SM, w_EM), grad_SE)
    ref_SE = F.linear(x_SM.float(), w_EM)
    ref_grad_x, ref_grad_w = torch.autograd.grad(ref_SE, (x_SM, w_EM), grad_SE)

    assert logits_SE.dtype == torch.float32 and torch.equal(logits_SE, ref_SE)  # routing decisions depend on it
    assert grad_x.dtype == dtype and torch.equal(grad_x, ref_grad_x)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-5 * S ** 0.5)  # sums of S products, in blocks


def test_gate_keeps_no_fp32_copy_of_half_precision_tokens():
    S, M, E = 64, 32, 4
    gate = Gate(M, E).to(torch.bfloat16)
    x_SM = torch.randn(S, M, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gate.logits(x_SM)
    assert any(t.shape == (S, M) and t.dtype == torch.bfloat16 for t in saved)
    assert not any(t.shape == (S, M) and t.dtype == torch.float32 for t in saved)


def test_input_noise_still_applies_to_the_router_input():
    S, M, E = 256, 16, 4
    torch.manual_seed(0)
    gate = Gate(M, E, noisy_gate_policy="Jitter").to(torch.bfloat16)
    x_SM = torch.randn(S, M, dtype=torch.bfloat16)
    clean_SE = F.linear(x_SM.float(), gate.wg.weight.float())
    assert not torch.equal(gate.train().logits(x_SM), clean_SE)
    assert torch.equal(gate.eval().logits(x_SM), clean_SE)


def _gathered_twice(tokens_SM: torch.Tensor, seed: int) -> torch.Tensor:
    """A stand-in for the dispatch: each token's row picked up to twice, in an order of its own."""
    gen = torch.Generator().manual_seed(seed)
    token_J = torch.randint(0, tokens_SM.shape[0], (2 * tokens_SM.shape[0],), generator=gen)
    return tokens_SM.index_select(0, token_J)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,M,E", [(100, 64, 4), (1500, 96, 8), (1024, 32, 64)])
def test_passed_on_tokens_give_autograds_sum_of_both_gradients(dtype, S, M, E, monkeypatch):
    monkeypatch.setattr(rl, "ROWS_PER_BLOCK", 256)
    gen = torch.Generator().manual_seed(S * E)
    x_SM = torch.randn(S, M, generator=gen).to(dtype).requires_grad_(True)
    w_EM = torch.randn(E, M, generator=gen).requires_grad_(True)
    grad_SE = torch.randn(S, E, generator=gen)
    grad_JM = torch.randn(2 * S, M, generator=gen).to(dtype)

    logits_SE, tokens_SM = rl.router_linear_passing(x_SM, w_EM)
    assert torch.equal(tokens_SM, x_SM)
    grad_x, grad_w = torch.autograd.grad((logits_SE, _gathered_twice(tokens_SM, S)), (x_SM, w_EM),
                                         (grad_SE, grad_JM))
    ref_SE = F.linear(x_SM.float(), w_EM)
    ref_grad_x, ref_grad_w = torch.autograd.grad((ref_SE, _gathered_twice(x_SM, S)), (x_SM, w_EM),
                                                 (grad_SE, grad_JM))

    assert torch.equal(logits_SE, ref_SE)
    assert grad_x.dtype == dtype
    if dtype == torch.float32:  # one fused multiply-add pass of the BLAS, against a product and then a sum
        torch.testing.assert_close(grad_x, ref_grad_x, rtol=2e-6, atol=1e-6)
        assert torch.equal(grad_w, ref_grad_w)
    else:  # the router's share rounded to the tokens' dtype, then one addition: autograd's own steps
        assert torch.equal(grad_x, ref_grad_x)
        torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-5 * S ** 0.5)


def test_passed_on_tokens_alone_or_logits_alone_still_get_their_gradient():
    x_SM = torch.randn(64, 16, requires_grad=True)
    w_EM = torch.randn(4, 16, requires_grad=True)
    logits_SE, tokens_SM = rl.router_linear_passing(x_SM, w_EM)
    (grad_x,) = torch.autograd.grad(tokens_SM.sum() * 3, x_SM, retain_graph=True)
    assert torch.equal(grad_x, torch.full_like(x_SM, 3.0))  # an expanded gradient, added to out of place
    grad_x, grad_w = torch.autograd.grad(logits_SE.sum(), (x_SM, w_EM))
    assert torch.equal(grad_x, torch.ones(64, 4).mm(w_EM))
    assert torch.equal(grad_w, torch.ones(64, 4).t().mm(x_SM))


def test_the_layer_gathers_from_the_tokens_the_router_passes_on():
    import ds_tutel
    from torch import nn
    M, E = 16, 4
    layer = ds_tutel.MoE(M, nn.Linear(M, M), num_experts=E, k=2, use_rts=False, top2_2nd_expert_sampling=False)
    x_SM = torch.randn(32, M, requires_grad=True)
    seen = []
    original = rl._RouterLinearPassing.backward

    def spy(ctx, grad_SE, grad_tokens_SM):
        seen.append(grad_tokens_SM is not None)
        return original(ctx, grad_SE, grad_tokens_SM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rl._RouterLinearPassing, "backward", staticmethod(spy))
        y_SM, l_aux, _ = layer(x_SM)
        (y_SM.sum() + l_aux).backward()
    assert seen == [True]  # one call, holding the dispatch's gradient as well as the logits'
