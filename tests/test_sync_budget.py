"""Host syncs of the layer's CUDA code path, counted on the CPU (issue 29, "a sync budget").

On a GPU, an op whose output size or value the host needs waits for the device: a step that syncs several times
keeps the GPU idle between its kernels. Without a GPU the same code path runs here: `ds_tutel.MoE` with
dispatch_backend="triton" under Triton's interpreter, with the CPU backend of the kernel registry switched off
(DS_TUTEL_CPU_KERNELS=0, and no registry backend for the device type, as on CUDA), so every stage runs the
operators it runs on a GPU. A `TorchDispatchMode` sees every aten op and counts the ones that sync a GPU host:
  _local_scalar_dense         .item(), int(t), float(t), bool(t)
  nonzero, masked_select, unique*, equal
  bincount                    always on CUDA (it reads the largest value to size its output, minlength or not)
  repeat_interleave           without output_size
  index / index_put_          with a boolean (mask) index: a nonzero underneath
`.tolist()` of a CPU tensor dispatches nothing, so calls to it are counted separately (torch.Tensor.tolist is
patched for the test). Blind spots: `.cpu()` / `.to("cpu")` / `.numpy()` of a CPU tensor dispatch nothing either
(the CUDA path has none of them at ep_size 1), and scalars copied host -> device are not syncs and not counted.

Not counted: the checks F.one_hot makes on CPU tensors (their min and max read back); on CUDA, one_hot with a
given num_classes skips them and relies on a device assert.

The counts are asserted as upper bounds (`CURRENT_BOUND`), so that a change that adds a sync fails. The issue's
budget, at most 1 sync per forward+backward at ep_size 1 at default options (`ISSUE_BUDGET`), holds; expert
parallelism's budget (the split sizes an uneven all-to-all needs) is not counted here yet.

Shape legend: S tokens, M model dim, E experts.
"""
from __future__ import annotations

import collections
import traceback
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from test_triton_interpreter import load_interpreted

import ds_tutel
from ds_tutel import kernels
from helpers import expert_ffn

# Ops that sync a GPU host whatever their arguments.
_ALWAYS_SYNC = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "bincount", "equal", "unique",
                          "_unique", "_unique2", "unique_consecutive", "unique_dim", "unique_dim_consecutive"})
# Ops that sync with a boolean (mask) index among their indices.
_MASK_INDEXED = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index"})

# The layer's options per case: DeepSpeed's defaults (the budget's subject), and Tutel's routing on the Triton gate.
CASES = {"k1": dict(k=1), "k2": dict(k=2), "k4": dict(k=4), "tutel_k2": dict(k=2, capacity_mode="tutel"),
         "tutel_dropless_k2": dict(k=2, capacity_mode="tutel", capacity_factor=0.0)}
# Syncs per forward+backward measured now, asserted as upper bounds:
#   k1, k2, k4, tutel_k2: none (expert counts are scatter-adds into fixed-size bins, routing/slots.count_groups; the
#       top-1 capacity rule counts own-column picks instead of indexing with a mask, routing/choices.py).
#   tutel_dropless_k2: the largest count, read for the capacity (routing/tutel.py), which a dropless capacity
#       needs on the host.
CURRENT_BOUND = {"k1": 0, "k2": 0, "k4": 0, "tutel_k2": 0, "tutel_dropless_k2": 1}
# The issue's budget at default options, ep_size 1: met (the bounds above are at or under it).
ISSUE_BUDGET = 1
# .tolist() calls per forward+backward: none at ep_size 1.
TOLIST_BOUND = 0


def _call_site() -> str:
    """The innermost frame of the project (ds_tutel/ or triton_kernels/) in the current stack."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        for root in ("ds_tutel/", "triton_kernels/"):
            if root in path:
                return f"{root}{path.rsplit(root, 1)[1]}:{frame.lineno} {frame.name}"
    return "outside the project"


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that would sync a GPU host, by op and by call site."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Dict[str, int] = collections.Counter()
        self.sites: List[str] = []
        self.skipped = 0  # CPU-only checks (see _CpuOnlyChecks)
        self.cpu_only_depth = 0

    @staticmethod
    def syncs(name: str, args: tuple, kwargs: dict) -> bool:
        if name in _ALWAYS_SYNC:
            return True
        if name == "repeat_interleave":
            return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None and (
                len(args) < 4 or args[3] is None)
        if name in _MASK_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.syncs(name, args, kwargs):
            if self.cpu_only_depth:
                self.skipped += 1
            else:
                self.by_op[name] += 1
                self.sites.append(f"{name} at {_call_site()}")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


class _CpuOnlyChecks(TorchFunctionMode):
    """Marks the time inside F.one_hot with a given num_classes: its reads of min and max happen on CPU tensors
    only (on CUDA it skips them), so the counter leaves them out."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        if func is torch.nn.functional.one_hot and num_classes != -1:
            self.counter.cpu_only_depth += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.counter.cpu_only_depth -= 1
        return func(*args, **kwargs)


@pytest.fixture
def cuda_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's interpreter on, the CPU backend of the registry off (as on a GPU, where no backend applies to the
    device by itself)."""
    load_interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DS_TUTEL_CPU_KERNELS", "0")
    monkeypatch.setattr(kernels, "DEVICE_BACKENDS", {})


def _step(layer: torch.nn.Module, x_SM: torch.Tensor) -> None:
    out_SM, l_aux, _ = layer(x_SM)
    (out_SM.float().pow(2).sum() + l_aux).backward()


def count_syncs(layer: torch.nn.Module, x_SM: torch.Tensor, monkeypatch: pytest.MonkeyPatch):
    """(SyncCounter, tolist calls) of one forward+backward, after one warm-up step (caches filled)."""
    _step(layer, x_SM)
    tolist_calls: List[str] = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> Any:
        tolist_calls.append(_call_site())
        return real_tolist(self)

    counter = SyncCounter()
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counting_tolist)
        with _CpuOnlyChecks(counter), counter:
            _step(layer, x_SM)
    return counter, tolist_calls


@pytest.mark.parametrize("case", list(CASES))
def test_syncs_per_step_stay_within_the_current_bound(cuda_code_path, monkeypatch, case):
    torch.manual_seed(len(case))
    S, M, E = 48, 16, 4
    layer = ds_tutel.MoE(M, expert_ffn(M), num_experts=E, dispatch_backend="triton", **CASES[case])
    assert layer.deepspeed_moe.strategy(torch.device("cpu")) == "capacity"
    x_SM = torch.randn(S, M, requires_grad=True)
    counter, tolist_calls = count_syncs(layer, x_SM, monkeypatch)

    bound = CURRENT_BOUND[case]
    owed = ""
    if case in ("k1", "k2", "k4") and bound > ISSUE_BUDGET:
        owed = f"; the issue's budget at default options is {ISSUE_BUDGET}: {bound - ISSUE_BUDGET} owed"
    print(f"\n{case}: {counter.total} syncs per forward+backward {dict(counter.by_op)} "
          f"(+{counter.skipped} CPU-only one_hot checks not counted), {len(tolist_calls)} .tolist(); "
          f"current bound {bound}{owed}")
    for site in counter.sites:
        print("  ", site)
    assert counter.total <= bound, f"a new host sync (bound {bound}):\n" + "\n".join(counter.sites)
    assert len(tolist_calls) <= TOLIST_BOUND, tolist_calls
    assert x_SM.grad is not None


def test_sync_counter_sees_what_syncs():
    counter = SyncCounter()
    t_S = torch.tensor([3, 0, 1, 3])
    with _CpuOnlyChecks(counter), counter:
        t_S.sum().item()
        int(t_S.max())
        t_S.nonzero()
        t_S[t_S > 0]
        torch.bincount(t_S, minlength=8)
        t_S.repeat_interleave(t_S)
        t_S.repeat_interleave(t_S, output_size=7)  # sized by the caller: no sync
        torch.nn.functional.one_hot(t_S, num_classes=4)  # CPU-only checks: skipped
        t_S.cumsum(0)
        t_S.sort()
        t_S[torch.tensor([0, 2])]  # an integer index: no sync
    assert dict(counter.by_op) == {"_local_scalar_dense": 2, "nonzero": 1, "index": 1, "bincount": 1,
                                   "repeat_interleave": 1}
    assert counter.skipped >= 1
