"""ds_tutel/onednn_linear.py: the experts' fp32 Linear matmuls through oneDNN, and the layer option that uses it."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds_tutel
from ds_tutel import onednn_linear as ol
from ds_tutel.kept_exchange import kept_layout

pytestmark = pytest.mark.skipif(not ol.available(), reason="this torch build has no oneDNN")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_backward_equal_the_linear_map(shape, bias):
    gen = torch.Generator().manual_seed(len(shape) + bias)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(40, 24, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(*shape[:-1], 40, generator=gen)
    y = ol.onednn_linear(x, w, b)
    grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g)
    y_ref = F.linear(x, w, b)
    grads_ref = torch.autograd.grad(y_ref, [t for t in (x, w, b) if t is not None], g)
    assert y.shape == y_ref.shape
    _close(y, y_ref)
    for got, want in zip(grads, grads_ref):
        _close(got, want)


def test_only_the_gradients_asked_for_are_computed():
    x = torch.randn(8, 6)  # an input that needs no gradient
    w = torch.randn(5, 6, requires_grad=True)
    (grad_w,) = torch.autograd.grad(ol.onednn_linear(x, w).sum(), [w])
    _close(grad_w, torch.ones(8, 5).t() @ x)


def test_other_dtypes_and_cpu_autocast_run_nn_linears_own_forward():
    torch.manual_seed(0)
    plain = nn.Linear(16, 8)
    fast = copy.deepcopy(plain)
    assert ol.route_linears_through_onednn(fast) == 1 and type(fast) is ol.OneDNNLinear
    x = torch.randn(4, 16)
    assert ol.runs_here(x, fast.weight)
    _close(fast(x), plain(x))
    x_bf16 = x.bfloat16()
    assert not ol.runs_here(x_bf16, fast.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ol.runs_here(x, fast.weight)
        assert torch.equal(fast(x), plain(x))
    fast16, plain16 = copy.deepcopy(fast).bfloat16(), copy.deepcopy(plain).bfloat16()
    assert torch.equal(fast16(x_bf16), plain16(x_bf16))


class Scaled(nn.Linear):
    """A subclass whose forward does more than the linear map."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_an_expert_without_tokens_still_gets_zero_gradients():
    fast = nn.Linear(4, 8)
    ol.route_linears_through_onednn(fast)
    x = torch.empty(0, 4, requires_grad=True)
    assert not ol.runs_here(x, fast.weight)
    y = fast(x)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 4)
    assert torch.equal(fast.weight.grad, torch.zeros(8, 4)) and torch.equal(fast.bias.grad, torch.zeros(8))


def test_only_exact_linears_change_class_and_the_state_dict_stays_the_same():
    module = nn.Sequential(nn.Linear(4, 8), nn.GELU(), Scaled(8, 4))
    keys = list(module.state_dict())
    assert ol.route_linears_through_onednn(module) == 1
    assert type(module[0]) is ol.OneDNNLinear and type(module[2]) is Scaled
    assert list(module.state_dict()) == keys and isinstance(module[0], nn.Linear)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert type(clone[0]) is ol.OneDNNLinear
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)[0]) is ol.OneDNNLinear


def _expert(M):
    return nn.Sequential(nn.Linear(M, 2 * M), nn.GELU(), nn.Linear(2 * M, M))


def test_the_layer_option_gives_the_blas_layers_results_and_leaves_the_given_expert_alone():
    M, E = 16, 8
    torch.manual_seed(0)
    expert = _expert(M)
    blas = ds_tutel.MoE(M, expert, num_experts=E, k=2, use_rts=False, top2_2nd_expert_sampling=False)
    fast = ds_tutel.MoE(M, expert, num_experts=E, k=2, use_rts=False, top2_2nd_expert_sampling=False,
                        cpu_fp32_linear="onednn")
    fast.load_state_dict(blas.state_dict())
    assert all(type(m) is nn.Linear for m in expert.modules() if isinstance(m, nn.Linear))
    assert all(type(m) is nn.Linear for m in blas.modules() if isinstance(m, nn.Linear))
    assert sum(type(m) is ol.OneDNNLinear for m in fast.modules()) == 2 * E
    x = torch.randn(64, M)
    results = []
    for layer in (blas, fast):
        x_in = x.clone().requires_grad_(True)
        y, l_aux, counts = layer(x_in)
        (y.square().sum() + l_aux).backward()
        results.append((y, counts, x_in.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y_b, counts_b, dx_b, grads_b), (y_f, counts_f, dx_f, grads_f) = results
    assert torch.equal(counts_b, counts_f)  # the router is untouched: same decisions
    _close(y_f, y_b)
    _close(dx_f, dx_b)
    assert grads_f.keys() == grads_b.keys()
    for name in grads_b:
        _close(grads_f[name], grads_b[name])


def test_fp32_rows_are_bucketed_only_where_the_experts_use_onednn():
    M = 8
    blas = ds_tutel.MoE(M, _expert(M), num_experts=4)
    fast = ds_tutel.MoE(M, _expert(M), num_experts=4, cpu_fp32_linear="onednn")
    cpu = torch.device("cpu")
    assert not blas.deepspeed_moe.experts.bucket_rows(cpu, torch.float32)
    assert fast.deepspeed_moe.experts.bucket_rows(cpu, torch.float32)
    layout = kept_layout([37, 5, 41, 2], [[37, 5], [41, 2]], 0, cpu, torch.float32, bucket_rows=True)
    assert layout.expert_rows_L == [80, 7] and layout.rows_L == [78, 7]
    layout = kept_layout([37, 5, 41, 2], [[37, 5], [41, 2]], 0, cpu, torch.float32)
    assert layout.expert_rows_L == [78, 7]


def test_the_json_config_can_ask_for_it():
    layer = ds_tutel.MoE.from_config({"ds_tutel": {"num_experts": 4, "cpu_fp32_linear": "onednn"}}, 8, _expert(8))
    assert layer.deepspeed_moe.experts.cpu_fp32_linear == "onednn"


def test_a_layer_step_with_experts_that_get_no_tokens():
    M = 8
    layer = ds_tutel.MoE(M, _expert(M), num_experts=8, k=1, cpu_fp32_linear="onednn")
    x = torch.randn(3, M, requires_grad=True)  # 3 tokens, 8 experts: at least 5 get none
    y, l_aux, counts = layer(x)
    (y.sum() + l_aux).backward()
    assert int((counts == 0).sum()) >= 5 and x.grad is not None
    assert all(p.grad is not None for p in layer.deepspeed_moe.experts.parameters())


def _both_exchanges_with_onednn_linears(rank, world_size):
    """Each expert-parallel exchange (kept rows, capacity buffers) with oneDNN linears gives the BLAS layer's
    results, fp32 rows bucketed (over 16 rows per local expert, so some pad); one rank has more tokens."""
    import ds_tutel
    from helpers import expert_ffn

    M = 8
    results = {}
    for send, linear in (("kept", "blas"), ("kept", "onednn"), ("capacity", "onednn")):
        torch.manual_seed(0)
        layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=4, ep_size=world_size, k=2, use_rts=False,
                             top2_2nd_expert_sampling=False, a2a_send=send, cpu_fp32_linear=linear)
        layer.set_deepspeed_parallelism()
        x = torch.randn(41 + 6 * rank, M, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        out, l_aux, _ = layer(x)
        (out.square().sum() + l_aux).backward()
        results[send, linear] = (out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()})
    reference = results["kept", "blas"]
    for key in (("kept", "onednn"), ("capacity", "onednn")):
        out, dx, grads = results[key]
        _close(out, reference[0])
        _close(dx, reference[1])
        for name in reference[2]:
            _close(grads[name], reference[2][name])
    return True


@pytest.mark.multirank
def test_expert_parallel_exchanges_with_onednn_linears():
    from multirank import run_ranks
    assert run_ranks(_both_exchanges_with_onednn_linears, 2, timeout=180) == [True, True]
