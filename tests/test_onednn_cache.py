"""benchmarks/onednn_cache.py: oneDNN's verbose lines counted per step, and a child run end to end."""
import torch

from benchmarks.onednn_cache import measure, parse_verbose

VERBOSE = """\
onednn_verbose,v1,info,oneDNN v3.12.0
@@step 0
onednn_verbose,v1,primitive,create:cache_miss,cpu,eltwise,jit:avx512_core,forward_training,data:f32,,alg:eltwise_gelu_erf,29x1024,0.25
onednn_verbose,v1,primitive,exec,cpu,eltwise,jit:avx512_core,forward_training,data:f32,,alg:eltwise_gelu_erf,29x1024,0.05
onednn_verbose,v1,primitive,create:cache_miss,cpu,matmul,brg:avx512_core,undef,src:bf16,,,29x512:512x1024,0.75
@@step 1
onednn_verbose,v1,primitive,create:cache_hit,cpu,eltwise,jit:avx512_core,forward_training,data:f32,,alg:eltwise_gelu_erf,29x1024,0.01
onednn_verbose,v1,primitive,exec,cpu,eltwise,jit:avx512_core,forward_training,data:f32,,alg:eltwise_gelu_erf,29x1024,0.05
unrelated output
"""


def test_parse_counts_misses_time_and_kinds_per_step():
    steps = parse_verbose(VERBOSE.splitlines())
    assert [s.misses for s in steps] == [2, 0]
    assert abs(steps[0].create_ms - 1.0) < 1e-9 and steps[1].create_ms == 0.0
    assert steps[0].kinds == {"eltwise": 1, "matmul": 1} and steps[1].kinds == {}
    assert [s.executions for s in steps] == [1, 1]


def test_child_run_reports_every_step():
    steps = measure("2,1.0,4,32,bf16", "ours", steps=3, tokens=64, timeout=300)
    assert len(steps) == 3
    if torch.backends.mkldnn.is_available():
        # bf16 GELU runs through oneDNN: at least the first step compiles a primitive
        assert steps[0].misses >= 1 and sum(s.executions for s in steps) >= 3
