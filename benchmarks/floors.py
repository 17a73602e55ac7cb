"""The floors an MoE layer is measured against.

Compute floor: every expert's FFN forward+backward on exactly the tokens routed to it (its kept choices, taken
from the layer's own `last_routing`, so it is the same set the layer computed), inputs already gathered, one
autograd call over all experts: no gate, no dispatch, no combine, no empty capacity slots.

Memory floor: the bytes dispatch must move. Encode reads J rows of M elements and writes them, decode reads
them and writes them back into tokens; backward does the same again: 8 * J * M elements in all, J = kept
choices (at most S * K). Reported as a time at the copy bandwidth measured in the same run (a large tensor
copy, read + write bytes over its median time).

Router floor (router_products_seconds): the router's fp32 products alone, the arithmetic a layer that routes as
DeepSpeed's does cannot skip. With the two above it makes an ideal layer: floor + router products + bytes.

Shape legend: S tokens, M model dim, K choices per token, J kept choices, n rows of one expert.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import List, Sequence

import torch
from torch import nn

from benchmarks.timing import interleaved

DISPATCH_PASSES = 8  # (encode + decode) x (read + write) x (forward + backward)


@dataclass
class ExpertWork:
    """Each non-empty expert's module with its gathered input rows and output gradient."""

    experts: List[nn.Module]
    inputs_nM: List[torch.Tensor]
    grads_nM: List[torch.Tensor]
    kept_choices: int
    params: List[nn.Parameter] = field(default_factory=list)  # the experts' parameters, listed once


def tokens_per_expert(routing, num_experts: int) -> List[torch.Tensor]:
    """Token ids of each expert's kept choices, in slot order (the order the layer fills its buffer)."""
    kept_SK = routing.locations_SK >= 0
    S, K = kept_SK.shape
    token_J = torch.arange(S, device=kept_SK.device).unsqueeze(1).expand(S, K)[kept_SK]
    expert_J = routing.indices_SK[kept_SK]
    slot_J = routing.locations_SK[kept_SK]
    order_J = torch.argsort(expert_J * (routing.capacity + 1) + slot_J)
    counts = torch.bincount(expert_J, minlength=num_experts).tolist()
    return list(torch.split(token_J[order_J], counts))


def expert_work(experts: Sequence[nn.Module], routing, x_SM: torch.Tensor, dy_SM: torch.Tensor) -> ExpertWork:
    """Gathers, once and outside any timing, what each expert would see (experts with no token left out)."""
    chosen, inputs, grads, kept = [], [], [], 0
    for expert, token_n in zip(experts, tokens_per_expert(routing, len(experts))):
        if token_n.numel() == 0:
            continue
        chosen.append(expert)
        inputs.append(x_SM.index_select(0, token_n).detach().requires_grad_(True))
        grads.append(dy_SM.index_select(0, token_n).contiguous())
        kept += token_n.numel()
    return ExpertWork(chosen, inputs, grads, kept, [p for expert in chosen for p in expert.parameters()])


def floor_step(work: ExpertWork) -> None:
    """The compute floor: forward of every expert on its rows, then one backward (input and weight grads)."""
    for param in work.params:  # listed once, as the layers' zero_grads lists theirs
        param.grad = None
    for x_nM in work.inputs_nM:
        x_nM.grad = None
    outs_nM = [expert(x_nM) for expert, x_nM in zip(work.experts, work.inputs_nM)]
    torch.autograd.backward(outs_nM, work.grads_nM)


def floor_output(experts: Sequence[nn.Module], routing, x_SM: torch.Tensor) -> torch.Tensor:
    """y_SM = sum over kept choices of gate * expert(x_token), computed expert by expert in fp32.

    Equal to the layer's output when the floor's token sets are the layer's (the correctness mode checks it).
    """
    y_SM = torch.zeros(x_SM.shape, dtype=torch.float32, device=x_SM.device)
    kept_SK = routing.locations_SK >= 0
    with torch.no_grad():
        for e, expert in enumerate(experts):
            s_n, k_n = torch.nonzero(kept_SK & (routing.indices_SK == e), as_tuple=True)
            if s_n.numel() == 0:
                continue
            out_nM = expert(x_SM.index_select(0, s_n)).float()
            y_SM.index_add_(0, s_n, out_nM * routing.gates_SK[s_n, k_n].float().unsqueeze(1))
    return y_SM.to(x_SM.dtype)


def dispatch_bytes(kept_choices: int, model_dim: int, dtype: torch.dtype) -> int:
    """Bytes encode + decode must read and write, forward and backward."""
    return DISPATCH_PASSES * kept_choices * model_dim * dtype.itemsize


def router_products_seconds(tokens: int, model_dim: int, num_experts: int, dtype: torch.dtype,
                            device: torch.device, reps: int = 21) -> float:
    """Median seconds of the router's fp32 products on one point's shapes, forward and backward, as DeepSpeed's
    gate runs them (`F.linear(x.float(), w)` under autograd: the conversion, the logits, the tokens' and the
    weight's gradients). A layer that routes exactly as DeepSpeed's does pays at least this besides its experts;
    in bf16 the experts run at about twice fp32's rate, so counting these products at the experts' rate (the
    FLOP share) would understate them."""
    x_SM = torch.randn(tokens, model_dim, device=device).to(dtype).requires_grad_(True)
    w_EM = torch.randn(num_experts, model_dim, device=device, requires_grad=True)
    grad_SE = torch.randn(tokens, num_experts, device=device)

    def clear_grads() -> None:
        x_SM.grad = w_EM.grad = None

    def products() -> None:
        torch.nn.functional.linear(x_SM.float(), w_EM).backward(grad_SE)

    # One untimed call first: it pays for first use (pages, kernels).
    times = interleaved({"router": products}, device, warmup=1, reps=reps, min_reps=reps,
                        prepare={"router": clear_grads})["router"]
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 128 << 20, reps: int = 7) -> float:
    """Bytes per second of a large tensor copy (bytes read + bytes written over the median time)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:  # the first copy faults the destination pages in
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)
