"""The layer on the Triton backend (run here through Triton's interpreter) equals the torch backend."""
import os
import subprocess
import sys
import textwrap

import pytest

import ds_tutel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import copy, sys, torch
    sys.path.insert(0, "tests")
    import ds_tutel
    from helpers import expert_ffn, run_step
    M = 6
    cases = [dict(k=1), dict(k=2, capacity_factor=0.5), dict(k=3, capacity_mode="tutel", capacity_factor=0),
             dict(k=2, capacity_mode="tutel", capacity_factor=0.5, batch_prioritized_routing=True)]
    for case in cases:
        torch.manual_seed(0)
        common = dict(num_experts=4, use_rts=False, top2_2nd_expert_sampling=False, min_capacity=0, **case)
        reference = ds_tutel.MoE(M, expert_ffn(M), dispatch_backend="torch", **common)
        kernels = ds_tutel.MoE(M, expert_ffn(M), dispatch_backend="triton", **common)
        kernels.load_state_dict(reference.state_dict())
        x = torch.randn(13, M)
        got, want = run_step(kernels, x), run_step(reference, x)
        for a, b in zip(got[:4], want[:4]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for name in want[4]:
            torch.testing.assert_close(got[4][name], want[4][name], atol=1e-5, rtol=1e-5, msg=name)
        print("ok", case)
""")


def test_triton_backend_layer_equals_torch_backend():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("ok") == 4


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do():
    import torch
    from helpers import expert_ffn
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this process runs the Triton interpreter")
    layer = ds_tutel.MoE(6, expert_ffn(6), num_experts=2, dispatch_backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(3, 6))


def test_unknown_backend_rejected():
    from helpers import expert_ffn
    with pytest.raises(ValueError, match="dispatch_backend"):
        ds_tutel.MoE(6, expert_ffn(6), num_experts=2, dispatch_backend="cuda")
