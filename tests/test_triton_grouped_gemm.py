"""The Triton grouped GEMM (triton_kernels/grouped_gemm.py) against per-expert nn.Linear, forward and backward,
under Triton's CPU interpreter.

Every kernel output is allocated poisoned (NaN), so an element no kernel writes fails the comparison. Row splits
have experts with no rows (first, middle, last), uneven counts and counts that are not multiples of the
interpreter's 16-row tile; I = 24 leaves a partial reduction tile (I = 32 none), O = 20 a partial column tile.

Shape legend: N rows, I input features, O output features, L experts, L1 = L + 1 offsets.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from test_triton_interpreter import _is_interpreted, load_interpreted, poisoning_empty


def _load() -> ModuleType:
    """triton_kernels.grouped_gemm with its kernels interpreted (see test_triton_interpreter.load_interpreted)."""
    load_interpreted()
    module = importlib.import_module("triton_kernels.grouped_gemm")
    assert _is_interpreted(module._bias_grad_kernel)
    return module


gg = _load()


@pytest.fixture(autouse=True)
def _interpreted_and_poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gg, "_empty", poisoning_empty(gg._empty))


def _offsets(counts: Sequence[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()), dtype=dtype)


def _experts(L: int, I: int, O: int, dtype: torch.dtype, bias: str, seed: int) -> List[nn.Linear]:
    """L nn.Linear experts; bias "all", "none" or "some" (every other expert)."""
    torch.manual_seed(seed)
    return [nn.Linear(I, O, bias=bias == "all" or (bias == "some" and l % 2 == 0)).to(dtype) for l in range(L)]


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> dict:
    """fp32: both sides sum the same fp32 products in different orders. bf16/fp16: both accumulate in fp32 and
    round once, so they differ by an ulp or two of the result's scale."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * max(1.0, float(ref.detach().abs().max()) if ref.numel() else 1.0))
    eps = torch.finfo(dtype).eps
    scale = float(ref.detach().float().abs().max()) if ref.numel() else 1.0
    return dict(rtol=2 * eps, atol=2 * eps * max(scale, 1e-3))


def _run(counts: Sequence[int], I: int, O: int, dtype: torch.dtype, bias: str, offsets_dtype: torch.dtype,
         seed: int) -> None:
    """Forward and backward of grouped_linear against the experts applied one by one to their rows."""
    L, N = len(counts), sum(counts)
    experts = _experts(L, I, O, dtype, bias, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_NI = torch.randn(N, I, generator=gen).to(dtype)
    dy_NO = torch.randn(N, O, generator=gen).to(dtype)
    offsets_L1 = _offsets(counts, offsets_dtype)

    x_ref = x_NI.clone().requires_grad_()
    y_ref = torch.cat([e(x_ref[int(offsets_L1[l]):int(offsets_L1[l + 1])]) for l, e in enumerate(experts)])
    y_ref.backward(dy_NO)
    ref_w = [e.weight.grad for e in experts]
    ref_b = [None if e.bias is None else e.bias.grad for e in experts]
    for e in experts:
        e.zero_grad(set_to_none=True)

    x_tri = x_NI.clone().requires_grad_()
    y_tri = gg.grouped_linear(x_tri, offsets_L1, [e.weight for e in experts], [e.bias for e in experts])
    assert y_tri.shape == (N, O) and y_tri.dtype == dtype
    torch.testing.assert_close(y_tri, y_ref, **_tolerance(dtype, y_ref))
    y_tri.backward(dy_NO)
    torch.testing.assert_close(x_tri.grad, x_ref.grad, **_tolerance(dtype, x_ref.grad))
    for l, e in enumerate(experts):
        want_w = ref_w[l] if ref_w[l] is not None else torch.zeros_like(e.weight)
        assert e.weight.grad.dtype == dtype
        torch.testing.assert_close(e.weight.grad, want_w, **_tolerance(dtype, want_w))
        if counts[l] == 0:
            assert torch.equal(e.weight.grad, torch.zeros_like(e.weight))
        if e.bias is not None:
            want_b = ref_b[l] if ref_b[l] is not None else torch.zeros_like(e.bias)
            torch.testing.assert_close(e.bias.grad, want_b, **_tolerance(dtype, want_b))
            if counts[l] == 0:
                assert torch.equal(e.bias.grad, torch.zeros_like(e.bias))


# Zero rows first, in the middle and last; counts below, at and above the 16-row tile, not multiples of it.
SPLITS = [(0, 5, 17, 0, 1, 16, 0), (33, 0, 2), (0, 0, 9)]


@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("bias", ["all", "some", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_per_expert_linear(dtype, bias, offsets_dtype):
    case = [torch.float32, torch.bfloat16].index(dtype) * 6 + ["all", "some", "none"].index(bias) * 2 \
        + (offsets_dtype == torch.int64)
    counts = SPLITS[case % len(SPLITS)]
    I = 24 if case % 2 else 32
    _run(counts, I, 20, dtype, bias, offsets_dtype, seed=case)


def test_fp16():
    _run((7, 0, 20), 24, 20, torch.float16, "all", torch.int64, seed=50)


def test_one_expert_and_no_rows_at_all():
    _run((37,), 32, 20, torch.float32, "all", torch.int32, seed=51)
    _run((0, 0, 0), 24, 20, torch.float32, "all", torch.int64, seed=52)


def test_many_experts_few_rows():
    # 20 experts (more than a power of two's worth of offsets: LP = 32), most with one or two rows.
    _run([1, 2, 0, 1, 3, 0, 2, 1, 1, 0, 4, 1, 2, 0, 1, 1, 5, 0, 2, 1], 24, 20, torch.float32, "some", torch.int64,
         seed=53)


def test_rows_of_no_expert_are_left_alone():
    """Rows before offsets[0] and from offsets[L] on (a padded buffer; more than a tile of them): not computed
    (left poisoned) in y or dx, and nothing from them reaches the experts' rows or any parameter gradient."""
    experts = _experts(3, 24, 20, torch.float32, "all", seed=57)
    x_NI = torch.randn(60, 24, requires_grad=True)
    offsets_L1 = torch.tensor([5, 12, 12, 30])  # rows 0-4 and 30-59 belong to no expert
    y_NO = gg.grouped_linear(x_NI, offsets_L1, [e.weight for e in experts], [e.bias for e in experts])
    torch.testing.assert_close(y_NO[5:12], experts[0](x_NI[5:12]))
    torch.testing.assert_close(y_NO[12:30], experts[2](x_NI[12:30]))
    assert torch.isnan(y_NO[:5]).all() and torch.isnan(y_NO[30:]).all()
    dy_NO = torch.ones_like(y_NO)
    y_NO.backward(dy_NO)
    assert torch.isnan(x_NI.grad[:5]).all() and torch.isnan(x_NI.grad[30:]).all()
    torch.testing.assert_close(x_NI.grad[5:12], experts[0].weight.sum(0).expand(7, 24))
    torch.testing.assert_close(experts[2].weight.grad, x_NI[12:30].detach().sum(0).expand(20, 24))
    torch.testing.assert_close(experts[2].bias.grad, torch.full((20,), 18.0))
    assert torch.equal(experts[1].weight.grad, torch.zeros(20, 24))


def test_only_the_gradients_asked_for():
    experts = _experts(3, 24, 20, torch.float32, "all", seed=54)
    experts[1].weight.requires_grad_(False)
    experts[2].bias.requires_grad_(False)
    x_NI = torch.randn(30, 24)  # no gradient wanted
    y_NO = gg.grouped_linear(x_NI, _offsets((10, 12, 8)), [e.weight for e in experts], [e.bias for e in experts])
    y_NO.sum().backward()
    assert experts[1].weight.grad is None and experts[2].bias.grad is None
    assert experts[0].weight.grad is not None and experts[2].weight.grad is not None
    torch.testing.assert_close(experts[1].bias.grad, torch.full((20,), 12.0))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 20), min_size=1, max_size=6).filter(lambda c: sum(c) <= 64),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 1000))
def test_any_row_split(counts, dtype, seed):
    _run(counts, 24, 20, dtype, "some", torch.int64, seed)


def test_no_host_sync():
    """Forward and backward dispatch no op that would sync a GPU host (tests/test_sync_budget.py's counter)."""
    from test_sync_budget import SyncCounter
    experts = _experts(4, 24, 20, torch.bfloat16, "all", seed=55)
    x_NI = torch.randn(40, 24, dtype=torch.bfloat16, requires_grad=True)
    offsets_L1 = _offsets((10, 0, 25, 5))
    counter = SyncCounter()
    with counter:
        y_NO = gg.grouped_linear(x_NI, offsets_L1, [e.weight for e in experts], [e.bias for e in experts])
        y_NO.backward(torch.ones_like(y_NO))
    assert counter.total == 0, counter.sites


def test_weight_addresses_are_cached_while_the_weights_stay():
    weights = [torch.randn(4, 3) for _ in range(3)]
    first = gg.addresses(weights, torch.device("cpu"))
    assert gg.addresses(weights, torch.device("cpu")) is first
    assert first.tolist() == [w.data_ptr() for w in weights]
    weights[1] = torch.randn(4, 3)
    second = gg.addresses(weights, torch.device("cpu"))
    assert second is not first and second.tolist() == [w.data_ptr() for w in weights]
    assert gg.addresses([None, weights[0]], torch.device("cpu")).tolist() == [0, weights[0].data_ptr()]


def test_registered_with_what_it_accepts(monkeypatch):
    from ds_tutel import kernels
    experts = _experts(2, 24, 20, torch.float32, "some", seed=56)
    weights, biases = [e.weight for e in experts], [e.bias for e in experts]
    x_NI, offsets_L1 = torch.randn(9, 24), _offsets((4, 5))
    assert "grouped_linear" in kernels.registered("triton")
    fn = kernels.lookup("triton", "grouped_linear", x_NI, offsets_L1, weights, biases)
    assert fn is not None
    torch.testing.assert_close(fn(x_NI, offsets_L1, weights, biases),
                               torch.cat([experts[0](x_NI[:4]), experts[1](x_NI[4:])]))
    torch.testing.assert_close(fn(x_NI, offsets_L1, weights),  # biases left out: none
                               torch.cat([x_NI[:4] @ weights[0].t(), x_NI[4:] @ weights[1].t()]))
    declined: List[Tuple[torch.Tensor, torch.Tensor, list, Optional[list]]] = [
        (x_NI.double(), offsets_L1, weights, biases),                           # dtype
        (x_NI.bfloat16(), offsets_L1, weights, biases),                         # weights' dtype differs
        (x_NI, offsets_L1.float(), weights, biases),                            # offsets' dtype
        (x_NI, offsets_L1[:2], weights, biases),                                # offsets' length
        (x_NI.t().contiguous().t(), offsets_L1, weights, biases),               # x's feature stride
        (x_NI, offsets_L1, [weights[0], weights[1].t().contiguous().t()], biases),  # non-contiguous weight
        (x_NI, offsets_L1, [weights[0], weights[1][:10]], biases),              # shapes differ
        (x_NI, offsets_L1, weights, biases[:1]),                                # one bias entry short
        (x_NI, offsets_L1, [weights[0], torch.randn(20 * 24 + 1)[1:].view(20, 24)], biases),  # not 16-byte aligned
    ]
    for args in declined:
        assert kernels.lookup("triton", "grouped_linear", *args) is None
        with pytest.raises(ValueError, match="grouped_linear"):
            gg.grouped_linear(*args)
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors without the interpreter: not where the kernels run
    assert kernels.lookup("triton", "grouped_linear", x_NI, offsets_L1, weights, biases) is None


@pytest.mark.parametrize("major, smem_kib, dtype, kept", [
    (8, 163, torch.bfloat16, "all"), (8, 163, torch.float32, "all"), (8, 99, torch.float32, "some"),
    (9, 227, torch.bfloat16, "all"), (9, 227, torch.float32, "some"), (9, 48, torch.float32, "one")])
def test_autotuning_keeps_this_generations_configs_that_fit(monkeypatch, major, smem_kib, dtype, kept):
    """A100 (163 KiB of shared memory per block), SM86 cards (99 KiB), H100 (227 KiB); where none fits (48 KiB),
    the smallest tile is kept."""
    from types import SimpleNamespace
    props = SimpleNamespace(major=major, shared_memory_per_block_optin=smem_kib * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    every = [gg._config(*c) for c in gg._AMPERE + gg._HOPPER]
    mine = gg._AMPERE if major < 9 else gg._HOPPER
    pruned = gg._prune(every, {"a_ptr": torch.empty(1, dtype=dtype), "N": 1})
    shapes = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)
              for c in pruned]
    assert set(shapes) <= set(mine) and pruned
    assert {"all": len(shapes) == len(mine), "some": 1 <= len(shapes) < len(mine), "one": len(shapes) == 1}[kept]
    for bm, bn, bk, stages, _ in shapes if kept != "one" else []:
        assert (bm + bn) * bk * torch.finfo(dtype).bits // 8 * stages <= smem_kib * 1024


# Compiles one configuration of each GEMM kernel ahead of time for a GPU generation (no GPU needed: Triton's
# compiler and ptxas run on the CPU) and prints what the PTX uses. Run in a fresh process: this one interprets.
_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton_kernels.grouped_gemm as gg

def jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel

for arch, kernel, extra in ((a, k, e) for a in (80, 90) for k, e in (
        (gg._grouped_mm_kernel, dict(HAS_BIAS=True, LP=16, EVEN_K=True, stride_bk=1)), (gg._weight_grad_kernel, {}))):
    bm, bn, bk, stages, warps = (gg._AMPERE if arch < 90 else gg._HOPPER)[0]
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PRECISION="ieee", UPCAST=False)
    fn = jit_fn(kernel)
    const = {**meta, **extra}
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("b_addrs_ptr", "bias_addrs_ptr", "dw_addrs_ptr", "offsets_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        else:
            sig[name] = "i32"
    # What a launch specializes: 16-byte aligned pointers, sizes and strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and name not in ("L", "N", "ROWS_BUCKET")}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "no-mma"
    print(f"{fn.__name__}@{arch}", mma, "cp.async" if "cp.async" in ptx else "no-cp.async", compiled.metadata.shared)
"""


@pytest.mark.slow
def test_compiles_for_ampere_and_hopper(tmp_path):
    """The kernels compile for SM80 and SM90 with tensor-core MMAs (warpgroup MMA on Hopper) and pipelined,
    asynchronous loads of both operands, the weights read through the pointer array included: shared memory holds
    more than two stages' worth of a single operand (it held one operand's stages when the weights' unaligned
    addresses kept them out of the pipeline)."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                          + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
    for arch in (80, 90):
        mma = "wgmma" if arch >= 90 else "mma.sync"
        bm, bn, bk, _, _ = (gg._AMPERE if arch < 90 else gg._HOPPER)[0]
        for kernel in ("_grouped_mm_kernel", "_weight_grad_kernel"):
            kind, copies, shared = lines[f"{kernel}@{arch}"].split()
            assert (kind, copies) == (mma, "cp.async"), (kernel, arch, lines[f"{kernel}@{arch}"])
            assert int(shared) > 2 * (bm + bn) * bk * 2, (kernel, arch, lines[f"{kernel}@{arch}"])
