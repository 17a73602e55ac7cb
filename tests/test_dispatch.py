"""Sparse encode/decode (capacity buffer) and the grouped path against dense references and gradcheck."""
import pytest
import torch

from ds_tutel.dispatch import grouped as dispatch
from ds_tutel.dispatch.capacity import decode, encode
from ds_tutel.kernels.cpu.row_buckets import round_rows
from ds_tutel.dispatch.grouped import grouped_decode, grouped_encode, grouped_plan
from ds_tutel.routing.deepspeed import route_deepspeed
from ds_tutel.routing.tutel import route_tutel


def _routing(S, E, k, cf, seed=0, tutel=False):
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if tutel:
        return route_tutel(logits, k=k, capacity_factor=cf)
    return route_deepspeed(logits, k=k, capacity_factor=cf, min_capacity=0)[0]


def _dense_combine(x_SM, r, scale=1.0):
    y = torch.zeros_like(x_SM)
    for s in range(r.num_tokens):
        for j in range(r.k):
            if r.locations_SK[s, j] >= 0:
                y[s] += r.gates_SK[s, j] * scale * x_SM[s]
    return y


@pytest.mark.parametrize("k,cf,tutel", [(1, 0.5, False), (2, 1.0, False), (3, 0.6, True), (4, 0.0, True)])
def test_encode_places_each_kept_choice_and_zeros_elsewhere(k, cf, tutel):
    S, E, M = 19, 5, 6
    r = _routing(S, E, k, cf, tutel=tutel)
    x = torch.randn(S, M, dtype=torch.float64)
    buf = encode(x, r)
    assert buf.shape == (E, r.capacity, M)
    filled = torch.zeros(E, r.capacity, dtype=torch.bool)
    for s in range(S):
        for j in range(k):
            loc = int(r.locations_SK[s, j])
            if loc >= 0:
                assert torch.equal(buf[r.indices_SK[s, j], loc], x[s])
                filled[r.indices_SK[s, j], loc] = True
    assert torch.all(buf[~filled] == 0)


@pytest.mark.parametrize("k,cf,tutel", [(1, 0.5, False), (2, 1.0, False), (3, 0.6, True), (2, 0.0, True)])
def test_capacity_path_equals_dense_reference_and_passes_gradcheck(k, cf, tutel):
    S, E, M = 13, 4, 3
    r = _routing(S, E, k, cf, tutel=tutel)
    x = torch.randn(S, M, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(decode(encode(x, r) * 3.0, r), _dense_combine(x, r, 3.0))
    gates = r.gates_SK.detach().double().requires_grad_(True)

    def fn(x_SM, gates_SK):
        r.gates_SK = gates_SK
        return decode(encode(x_SM, r).sin(), r)

    assert torch.autograd.gradcheck(fn, (x, gates))


# torch operators with one block for all experts, with one block per expert; the compiled CPU loops.
@pytest.mark.parametrize("use_kernels,block_bytes", [(False, None), (False, 1), (True, None)])
@pytest.mark.parametrize("k,cf,tutel", [(1, 0.5, False), (2, 1.0, False), (3, 0.6, True), (2, 0.0, True)])
def test_grouped_path_equals_capacity_path_and_passes_gradcheck(k, cf, tutel, use_kernels, block_bytes,
                                                                 monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr(dispatch, "BLOCK_BYTES", block_bytes)
    S, E, M = 13, 4, 3
    r = _routing(S, E, k, cf, tutel=tutel)
    plan = grouped_plan(r, use_kernels=use_kernels)
    assert (plan.compiled is not None) == use_kernels
    assert sum(plan.rows_per_expert) == int(r.kept_SK.sum())
    x = torch.randn(S, M, dtype=torch.float64, requires_grad=True)
    per_expert = grouped_encode(x, plan)
    for e, x_nM in enumerate(per_expert):  # expert e gets its kept tokens in slot order
        expected = encode(x, r)[e, :plan.rows_per_expert[e]]
        assert torch.equal(x_nM, expected)
    y = grouped_decode([t * (e + 1) for e, t in enumerate(per_expert)], plan)
    y_ref = decode(encode(x, r) * torch.arange(1, E + 1, dtype=torch.float64).view(E, 1, 1), r)
    torch.testing.assert_close(y, y_ref)

    gates = r.gates_SK.detach().double().requires_grad_(True)

    def fn(x_SM, gates_SK):
        r.gates_SK = gates_SK
        p = grouped_plan(r, use_kernels=use_kernels)
        return grouped_decode([t.sin() * (e + 1) for e, t in enumerate(grouped_encode(x_SM, p))], p)

    assert torch.autograd.gradcheck(fn, (x, gates))


def test_bf16_decode_accumulates_in_fp32():
    S, E, M, k = 32, 4, 16, 4
    r = _routing(S, E, k, 0.0, tutel=True)
    r.gates_SK = r.gates_SK.float()
    x = torch.randn(S, M).bfloat16()
    y = decode(encode(x, r), r)
    ref = _dense_combine(x.double(), r).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=0, rtol=0)  # one rounding at the end only


@pytest.mark.parametrize("use_kernels", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_bf16_grouped_path_accumulates_in_fp32_forward_and_backward(k, use_kernels):
    S, E, M = 32, 4, 16
    r = _routing(S, E, k, 0.0, tutel=True)
    gates = r.gates_SK.detach().float().requires_grad_(True)
    r.gates_SK = gates
    x = torch.randn(S, M).bfloat16().requires_grad_(True)
    plan = grouped_plan(r, use_kernels=use_kernels)
    y = grouped_decode(list(grouped_encode(x, plan)), plan)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _dense_combine(x.detach().double(), r).to(torch.bfloat16), atol=0, rtol=0)

    dy = torch.randn(S, M).bfloat16()
    y.backward(dy)
    x64 = x.detach().double().requires_grad_(True)
    g64 = gates.detach().double().requires_grad_(True)
    r.gates_SK = g64
    _dense_combine(x64, r).backward(dy.double())
    assert x.grad.dtype == torch.bfloat16 and gates.grad.dtype == torch.float32
    torch.testing.assert_close(gates.grad.double(), g64.grad, atol=1e-5, rtol=1e-5)  # fp32 products and sums
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=0.05, rtol=0.02)


def test_blocks_cover_the_experts_in_order_within_the_byte_budget():
    rows = [5, 0, 7, 30, 2, 2, 9, 0]
    for budget in (1, 8, 40, 10**9):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dispatch, "BLOCK_BYTES", budget)
            blocks = dispatch._blocks(rows, 1)
        assert blocks[0][0] == 0 and blocks[-1][1] == len(rows)
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:])) and all(f < l for f, l in blocks)
        assert all(sum(rows[f:l]) <= budget or l - f == 1 for f, l in blocks)
    assert len(blocks) == 1  # the last budget holds every expert


@pytest.mark.parametrize("dtype,bucket_rows", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True)])
@pytest.mark.parametrize("k", [1, 2])
def test_grouped_results_do_not_depend_on_the_block_size(k, dtype, bucket_rows, monkeypatch):
    """Blocks change how many experts one operator call covers, never the order of additions: bitwise equal."""
    S, E, M = 300, 6, 8
    r = _routing(S, E, k, 2.0, seed=1)
    r.gates_SK = r.gates_SK.float()
    x0 = torch.randn(S, M).to(dtype)
    dy = torch.randn(S, M).to(dtype)
    weights = [torch.randn(M, M).to(dtype) for _ in range(E)]

    def run(block_bytes, call_bytes=dispatch.CALL_BYTES):
        monkeypatch.setattr(dispatch, "BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(dispatch, "CALL_BYTES", call_bytes)  # 0: one index_add_ per expert in every block
        x = x0.clone().requires_grad_(True)
        gates = r.gates_SK.detach().clone().requires_grad_(True)
        r.gates_SK = gates
        plan = grouped_plan(r, round_rows=round_rows if bucket_rows else None, use_kernels=False)
        outs = [x_pM @ w for x_pM, w in zip(grouped_encode(x, plan), weights)]
        y = grouped_decode(outs, plan)
        y.backward(dy)
        return plan, y.detach(), x.grad, gates.grad

    plan, *one = run(1 << 30)
    _, *each = run(1)
    _, *some = run(3 * M * 4 * 20)
    _, *direct = run(1 << 30, call_bytes=0)
    if bucket_rows:
        assert plan.expert_rows != plan.rows_per_expert, "the test needs at least one padded expert"
    for a, b, c, d in zip(one, each, some, direct):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("dtype,bucket_rows", [(torch.float32, False), (torch.bfloat16, False),
                                               (torch.bfloat16, True), (torch.float16, True),
                                               (torch.float64, False)])
@pytest.mark.parametrize("k,cf", [(1, 0.95), (2, 1.0), (3, 0.9), (4, 0.9)])
def test_compiled_loops_equal_the_torch_path(k, cf, dtype, bucket_rows):
    """Outputs, the tokens' and the experts' gradients bitwise (a token's choices added in row order, rounded
    alike); the gates' gradient is the same dot product summed in another order. Dropped choices included."""
    S, E, M = 257, 7, 24
    r = _routing(S, E, k, cf, seed=3, tutel=k > 2)
    assert not bool(r.kept_SK.all()), "the test needs dropped choices"
    r.gates_SK = r.gates_SK.float()
    x0 = torch.randn(S, M).to(dtype)
    dy = torch.randn(S, M).to(dtype)
    weights = [torch.randn(M, M).to(dtype) / 4 for _ in range(E)]

    def run(use_kernels):
        x = x0.clone().requires_grad_(True)
        gates = r.gates_SK.detach().clone().requires_grad_(True)
        r.gates_SK = gates
        plan = grouped_plan(r, round_rows=round_rows if bucket_rows else None, use_kernels=use_kernels)
        inputs = [t.detach().requires_grad_(True) for t in grouped_encode(x, plan)]
        outs = [x_pM @ w for x_pM, w in zip(inputs, weights)]
        y = grouped_decode(outs, plan)
        y.backward(dy)
        # the experts' input gradients go back through the gather on their own, as the layer's would
        torch.autograd.backward(grouped_encode(x, plan), [t.grad for t in inputs])
        return plan, y.detach(), x.grad, [t.grad for t in inputs], gates.grad

    plan, y_ref, dx_ref, dins_ref, dgates_ref = run(False)
    _, y, dx, dins, dgates = run(True)
    if bucket_rows:
        assert plan.expert_rows != plan.rows_per_expert, "the test needs at least one padded expert"
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref) if k <= 2 or dtype in (torch.float32, torch.float64) else \
        torch.allclose(dx.float(), dx_ref.float(), rtol=1e-2, atol=1e-2)  # half types: one rounding, not k-1
    assert all(torch.equal(a, b) for a, b in zip(dins, dins_ref))
    assert dgates.dtype == dgates_ref.dtype
    torch.testing.assert_close(dgates, dgates_ref, rtol=1e-5, atol=1e-5)
    assert bool((dgates[~r.kept_SK] == 0).all())


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal, any NaN equal to any NaN (its sign and payload depend on the instruction that made it) and
    either zero to either (the torch path scales a token's only row, the loops add it to 0: -0 comes out +0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    a, b = a + 0, b + 0
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    assert torch.equal(a.view(ints)[~nan_a], b.view(ints)[~nan_b])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compiled_loops_round_special_values_as_the_torch_path(dtype, k):
    """NaNs, infinities, signed zeros, subnormals, products that overflow and halfway cases of the rounding: the
    compiled loops' outputs and the experts' and tokens' gradients carry the torch path's bits. M is not a
    multiple of the loops' vector width, so their tails run too."""
    S, E, M = 211, 5, 37
    r = _routing(S, E, k, 1.0, seed=5, tutel=k > 2)
    r.gates_SK = r.gates_SK.float()
    gen = torch.Generator().manual_seed(11)
    pool = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 2.0 ** -130, -3e38, 1.00390625,
                         1.01171875, 65504.0, 6e-8])

    def values() -> torch.Tensor:
        special = pool[torch.randint(0, len(pool), (S, M), generator=gen)]
        return torch.where(torch.rand(S, M, generator=gen) < 0.3, special, torch.randn(S, M, generator=gen))

    x0, dy = values().to(dtype), values().to(dtype)

    def run(use_kernels):
        x = x0.clone().requires_grad_(True)
        gates = r.gates_SK.detach().clone().requires_grad_(True)
        r.gates_SK = gates
        plan = grouped_plan(r, use_kernels=use_kernels)
        inputs = [t.detach().requires_grad_(True) for t in grouped_encode(x, plan)]
        y = grouped_decode([t * 1.5 for t in inputs], plan)
        y.backward(dy)
        torch.autograd.backward(grouped_encode(x, plan), [t.grad for t in inputs])
        return y.detach(), x.grad, [t.grad for t in inputs]

    y_ref, dx_ref, dins_ref = run(False)
    y, dx, dins = run(True)
    _assert_same_bits(y, y_ref)
    if k <= 2 or dtype == torch.float32:  # half types with k > 2: the torch path rounds k - 1 times
        _assert_same_bits(dx, dx_ref)
    for a, b in zip(dins, dins_ref):
        _assert_same_bits(a, b)
