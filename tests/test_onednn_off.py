"""fp32 experts on the CPU run with oneDNN off in their forward and backward, and the setting comes back after.

Shape legend: S tokens, M model dim.
"""
import os
import subprocess
import sys
from typing import List

import pytest
import torch
from torch import nn

import ds_tutel
from ds_tutel.kernels.cpu import onednn
from helpers import run_step

M = 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SharedLog(dict):
    """What the probes saw; the layer deep-copies the expert per local expert, and every copy logs here."""

    def __deepcopy__(self, memo):
        return self


class FlagProbe(nn.Module):
    """Identity that records torch's oneDNN setting when its forward runs and when its gradient is computed."""

    def __init__(self, log: dict) -> None:
        super().__init__()
        self.log = log

    def forward(self, x_nM: torch.Tensor) -> torch.Tensor:
        self.log.setdefault("forward", set()).add(torch.backends.mkldnn.enabled)
        if x_nM.requires_grad:
            x_nM.register_hook(lambda grad: self.log.setdefault("backward", set()).add(torch.backends.mkldnn.enabled))
        return x_nM


def probed_layer(log: dict, **kwargs) -> ds_tutel.MoE:
    torch.manual_seed(0)
    expert = nn.Sequential(nn.Linear(M, 2 * M), FlagProbe(log), nn.GELU(), nn.Linear(2 * M, M))
    return ds_tutel.MoE(M, expert, num_experts=4, k=2, **kwargs)


def step(layer: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    x_SM = torch.randn(24, M, dtype=dtype, requires_grad=True)
    out_SM, l_aux, _ = layer(x_SM)
    (out_SM.float().square().sum() + l_aux).backward()


STEP_MARK = "@@step"
# One child: both layers (equal arguments) take `steps` fp32 forward+backward steps on new batches, a mark line
# before each. argv: steps.
_CHILD = """
import sys
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn
import ds_tutel
torch.set_num_threads(1)
M, steps = 32, int(sys.argv[1])
for name, cls in (("ours", ds_tutel.MoE), ("deepspeed", DeepSpeedMoE)):
    torch.manual_seed(0)
    layer = cls(M, nn.Sequential(nn.Linear(M, 2 * M), nn.GELU(), nn.Linear(2 * M, M)), num_experts=4, k=2,
                capacity_factor=1.0, min_capacity=0)
    for i in range(steps):
        print("@@step", name, i, flush=True)
        out, l_aux, _ = layer(torch.randn(64, M, requires_grad=True))
        (out.square().sum() + l_aux).backward()
        sys.stdout.flush()
"""


def primitives_created_per_step(steps: int):
    """oneDNN primitives each step created (its verbose log's cache misses): (ours per step, DeepSpeed's)."""
    env = dict(os.environ, ONEDNN_VERBOSE="all", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(steps)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = {"ours": [], "deepspeed": []}
    current: List[int] = []
    for line in done.stdout.splitlines():
        if line.startswith(STEP_MARK):
            current = counts[line.split()[1]]
            current.append(0)
        elif line.startswith("onednn_verbose") and "create:cache_miss" in line.split(",") and current:
            current[-1] += 1
    return counts["ours"], counts["deepspeed"]


@pytest.fixture(autouse=True)
def onednn_restored():
    before = torch.backends.mkldnn.enabled
    yield
    torch.backends.mkldnn.enabled = before


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
def test_fp32_experts_run_without_onednn_and_the_setting_comes_back():
    log = SharedLog()
    layer = probed_layer(log)
    step(layer)
    step(layer)
    assert log == {"forward": {False}, "backward": {False}}
    assert torch.backends.mkldnn.enabled


@needs_onednn
def test_onednn_stays_on_for_bf16_experts():
    log = SharedLog()
    step(probed_layer(log).to(torch.bfloat16), torch.bfloat16)
    assert log == {"forward": {True}, "backward": {True}}


@needs_onednn
def test_cpu_autocast_keeps_onednn_for_its_bf16_matmuls():
    log = SharedLog()
    layer = probed_layer(log)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(layer)
    assert log["forward"] == {True}


@needs_onednn
def test_reduced_precision_fp32_matmuls_keep_onednn():
    log = SharedLog()
    layer = probed_layer(log)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # lets oneDNN run fp32 matmuls in bf16
    try:
        step(layer)
    finally:
        torch.set_float32_matmul_precision(before)
    assert log == {"forward": {True}, "backward": {True}}


@needs_onednn
def test_a_user_setting_of_off_stays_off():
    log = SharedLog()
    torch.backends.mkldnn.enabled = False
    step(probed_layer(log))
    assert not torch.backends.mkldnn.enabled and log == {"forward": {False}, "backward": {False}}


@needs_onednn
def test_no_grad_forward_and_a_failing_expert_restore_the_setting():
    log = SharedLog()
    layer = probed_layer(log)
    with torch.no_grad():
        layer(torch.randn(8, M))
    assert log == {"forward": {False}} and torch.backends.mkldnn.enabled

    class Failing(nn.Module):
        def forward(self, x_nM):
            raise RuntimeError("expert failed")

    failing = ds_tutel.MoE(M, Failing(), num_experts=2)
    with pytest.raises(RuntimeError, match="expert failed"):
        failing(torch.randn(8, M, requires_grad=True))
    assert torch.backends.mkldnn.enabled


def test_same_step_with_and_without_onednn(monkeypatch):
    """Only the GELU's kernel changes: outputs, l_aux and gradients agree to fp32 rounding (oneDNN on: the
    registry's "run_experts" told not to switch it off)."""
    log_off, log_on = SharedLog(), SharedLog()
    off, on = probed_layer(log_off), probed_layer(log_on)
    on.load_state_dict(off.state_dict())
    x_SM = torch.randn(40, M)
    result_off = run_step(off, x_SM)
    monkeypatch.setattr(onednn, "should_switch_off", lambda inputs_nM: False)
    result_on = run_step(on, x_SM)
    if torch.backends.mkldnn.is_available():
        assert log_off == {"forward": {False}, "backward": {False}}
        assert log_on == {"forward": {True}, "backward": {True}}
    for a, b in zip(result_off, result_on):
        if isinstance(a, dict):
            assert a.keys() == b.keys()
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_new_row_counts_compile_no_onednn_primitives():
    """End to end in a child with oneDNN's verbose log: ours' fp32 steps on new batches (new row counts per
    expert every step) create no primitive at all; DeepSpeed's layer compiles its GELU once."""
    ours, deepspeed = primitives_created_per_step(steps=4)
    assert len(ours) == 4 and sum(ours) == 0
    assert len(deepspeed) == 4 and deepspeed[0] >= 1


@needs_onednn
def test_after_a_backward_that_failed_inside_the_experts_the_next_call_gives_the_setting_back():
    class FailingBackward(nn.Module):
        def forward(self, x_nM):
            if x_nM.requires_grad:
                x_nM.register_hook(fail)
            return x_nM

    def fail(grad):
        raise RuntimeError("backward failed")

    torch.manual_seed(0)
    layer = ds_tutel.MoE(M, nn.Sequential(nn.Linear(M, M), FailingBackward(), nn.GELU()), num_experts=2)
    out_SM, _, _ = layer(torch.randn(8, M, requires_grad=True))
    with pytest.raises(RuntimeError, match="backward failed"):
        out_SM.sum().backward()
    assert not torch.backends.mkldnn.enabled  # the failed backward's region is still open
    log = SharedLog()
    step(probed_layer(log))
    assert log == {"forward": {False}, "backward": {False}} and torch.backends.mkldnn.enabled
    with torch.no_grad():
        layer(torch.randn(8, M))  # the failed region, freed or not, no longer counts
    assert torch.backends.mkldnn.enabled


@needs_onednn
def test_two_layers_on_one_input_give_the_setting_back_once_both_are_done():
    log = SharedLog()
    first, second = probed_layer(log), probed_layer(log)
    x_SM = torch.randn(24, M, requires_grad=True)
    (first(x_SM)[0] + second(x_SM)[0]).square().sum().backward()
    assert log == {"forward": {False}, "backward": {False}} and torch.backends.mkldnn.enabled
