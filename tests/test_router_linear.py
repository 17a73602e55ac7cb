"""The router's linear map: DeepSpeed's fp32 logits from half-precision tokens, without an fp32 copy kept alive."""
import pytest
import torch
import torch.nn.functional as F

from ds_tutel import router_linear as rl
from ds_tutel.gating import Gate


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
