"""The router's backward on the GPU code path (routing/router_linear.py) allocates no fp32 [S, M] temporary for
half-precision tokens: it works in blocks of rows there too. Counted with a dispatch mode that sees every tensor
an aten op returns; results unchanged against autograd's F.linear(x.float(), w).

Shape legend: S tokens, M model dim, E experts.
"""
from __future__ import annotations

from typing import Any, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ds_tutel.routing import router_linear as rl

S, M, E = 96, 16, 4


class LargestFp32(TorchDispatchMode):
    """Records the element counts of the fp32 tensors the aten ops return (views included: a view of a large
    buffer is the buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: List[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numels.append(t.numel())
        return out


def _as_on_a_gpu(monkeypatch: pytest.MonkeyPatch, block_rows: int) -> None:
    """The backward picks its blocks as for GPU tensors, with a block budget of block_rows fp32 rows."""
    gpu_rows = rl._rows_per_block
    monkeypatch.setattr(rl, "GPU_BLOCK_BYTES", block_rows * 4 * M)
    monkeypatch.setattr(rl, "_rows_per_block", lambda device_type, M_: gpu_rows("cuda", M_))


@pytest.mark.parametrize("passing", [False, True])
def test_bf16_backward_keeps_no_fp32_copy_of_the_tokens(monkeypatch, passing):
    torch.manual_seed(0)
    x_SM = torch.randn(S, M).bfloat16()
    w_EM = torch.randn(E, M)
    grad_SE = torch.randn(S, E)
    grad_tokens_SM = torch.randn(S, M).bfloat16()

    def run():
        x, w = x_SM.clone().requires_grad_(True), w_EM.clone().requires_grad_(True)
        if passing:
            logits_SE, tokens_SM = rl.router_linear_passing(x, w)
            torch.autograd.backward([logits_SE, tokens_SM], [grad_SE, grad_tokens_SM.clone()])
        else:
            logits_SE = rl.router_linear(x, w)
            logits_SE.backward(grad_SE)
        return logits_SE.detach(), x.grad, w.grad

    _as_on_a_gpu(monkeypatch, block_rows=16)
    assert rl._rows_per_block("cpu", M) == 16  # the patched choice, as a GPU makes it
    counter = LargestFp32()
    x, w = x_SM.clone().requires_grad_(True), w_EM.clone().requires_grad_(True)
    if passing:
        logits_SE, tokens_SM = rl.router_linear_passing(x, w)
        with counter:
            torch.autograd.backward([logits_SE, tokens_SM], [grad_SE, grad_tokens_SM.clone()])
    else:
        logits_SE = rl.router_linear(x, w)
        with counter:
            logits_SE.backward(grad_SE)
    assert counter.numels and max(counter.numels) <= 16 * M, sorted(counter.numels)[-3:]

    # Results: those of one block (the GPU's choice before) and of autograd's fp32 linear; rows are independent,
    # so only the weight gradient's sum over blocks may round differently.
    got = run()
    monkeypatch.setattr(rl, "GPU_BLOCK_BYTES", S * 4 * M)
    whole = run()
    monkeypatch.undo()
    torch.testing.assert_close(got[:2], whole[:2], rtol=0, atol=0)
    torch.testing.assert_close(got[2], whole[2], rtol=1e-5, atol=1e-5)
    x, w = x_SM.clone().requires_grad_(True), w_EM.clone().requires_grad_(True)
    logits_SE = F.linear(x.float(), w)
    if passing:
        torch.autograd.backward([logits_SE, x], [grad_SE, grad_tokens_SM.clone()])
    else:
        logits_SE.backward(grad_SE)
    torch.testing.assert_close(got[0], logits_SE.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got[1], x.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[2], w.grad, rtol=1e-5, atol=1e-5)


def test_gpu_blocks_are_bounded_by_bytes_and_the_cpu_keeps_its_rows():
    assert rl._rows_per_block("cpu", 4096) == rl.ROWS_PER_BLOCK
    rows = rl._rows_per_block("cuda", 4096)
    assert rows * 4096 * 4 <= rl.GPU_BLOCK_BYTES and rows >= 1024
    assert rl._rows_per_block("cuda", 1 << 30) == 1
