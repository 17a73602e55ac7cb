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
    from ds_tutel import kernels
    from ds_tutel.experts import grouped_linear_reference
    from helpers import expert_ffn, run_step
    M = 6
    experts = sys.argv[1]
    # How the Triton backend's experts run: "loop" (no grouped GEMM registered: each expert on its rows),
    # "reference" (the torch reference registered as the grouped GEMM), "kernel" (the Triton kernel, registered by
    # triton_kernels/register.py).
    assert kernels.provider_loaded("triton")
    if experts == "loop":
        kernels._table.pop(("triton", "grouped_linear"), None)
    elif experts == "reference":
        kernels.register("triton", "grouped_linear", grouped_linear_reference)
    elif "grouped_linear" not in kernels.registered("triton"):
        print("no kernel")
        sys.exit(0)
    used = []
    registered = kernels._table.get(("triton", "grouped_linear"))
    if registered is not None:
        def counting(*args):
            used.append(1)
            return registered.fn(*args)
        kernels.register("triton", "grouped_linear", counting, accepts=registered.accepts)

    class Swiglu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(M, 8, bias=False), torch.nn.Linear(M, 8, bias=False)
            self.down_proj, self.act_fn = torch.nn.Linear(8, M, bias=False), torch.nn.SiLU()
        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    cases = [dict(k=1), dict(k=2, capacity_factor=0.5), dict(k=3, capacity_mode="tutel", capacity_factor=0),
             dict(k=2, capacity_mode="tutel", capacity_factor=0.5, batch_prioritized_routing=True),
             dict(k=2, expert=Swiglu), dict(k=1, used_token=True), dict(k=2, dtype=torch.bfloat16)]
    for case in cases:
        case = dict(case)
        make = case.pop("expert", lambda: expert_ffn(M))
        used_token = case.pop("used_token", False)
        dtype = case.pop("dtype", torch.float32)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.manual_seed(0)
        common = dict(num_experts=4, use_rts=False, top2_2nd_expert_sampling=False, min_capacity=0, **case)
        reference = ds_tutel.MoE(M, make(), dispatch_backend="torch", **common).to(dtype)
        kernels_ = ds_tutel.MoE(M, make(), dispatch_backend="triton", **common).to(dtype)
        kernels_.load_state_dict(reference.state_dict())
        assert kernels_.deepspeed_moe.strategy(torch.device("cpu")) == "grouped"
        x = torch.randn(13, M).to(dtype)
        used.clear()
        if used_token:  # a few tokens routed nowhere
            mask = (torch.arange(13) % 4 != 1).float()
            got, want = [], []
            for layer, out in ((kernels_, got), (reference, want)):
                x_ = x.clone().requires_grad_(True)
                y, l_aux, counts = layer(x_, mask)
                (y.square().sum() + l_aux).backward()
                out.extend([y.detach(), l_aux.detach(), counts, x_.grad,
                            {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}])
        else:
            got, want = run_step(kernels_, x), run_step(reference, x)
        assert bool(used) == (experts != "loop"), (experts, len(used))
        for a, b in zip(got[:4], want[:4]):
            torch.testing.assert_close(a, b, **tol)
        assert set(got[4]) == set(want[4])
        for name in want[4]:
            torch.testing.assert_close(got[4][name], want[4][name], **tol, msg=name)
        print("ok", case)
""")


@pytest.mark.parametrize("experts", ["loop", "reference", "kernel"])
def test_triton_backend_layer_equals_torch_backend(experts):
    """The GPU path (grouped strategy on the device plan) gives the torch path's outputs, l_aux, exp_counts and
    gradients, whichever way its experts run."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": REPO,
           "DS_TUTEL_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, experts], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    if out.stdout.strip() == "no kernel":
        pytest.skip("triton_kernels registers no grouped_linear yet")
    assert out.stdout.count("ok") == 7


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
