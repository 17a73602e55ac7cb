"""Binding plans (disjoint, each core at most once, on the GPU's NUMA node) and the rank start-up that applies them."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import pytest

from ds_tutel.launch import binding as B
from ds_tutel.launch import fabric
from ds_tutel.launch.machine import Machine, TopologyError, format_cpulist, local_machine, ndv4, read_machine
from fixtures.fake_sysfs import make_ndv4, make_two_socket_cpu_box

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_valid(m: Machine, slots):
    """Disjoint shares, each CPU used at most once, every share inside one NUMA node of the machine."""
    used = [c for s in slots for c in s.cpus]
    assert len(used) == len(set(used)), "a CPU is in two shares"
    assert all(s.cpus for s in slots)
    for s in slots:
        assert set(s.cpus) <= set(m.numa_node(s.numa_node).cpus)
    assert [s.local_rank for s in slots] == list(range(len(slots)))


@pytest.mark.parametrize("nproc", range(1, 9))
def test_ndv4_gpu_ranks_follow_their_gpu(nproc):
    m = ndv4()
    slots = B.plan_node(m, nproc, "gpu")
    assert_valid(m, slots)
    for s in slots:
        assert s.gpu == s.local_rank
        assert s.numa_node == m.gpu(s.gpu).numa
        assert s.nic == f"mlx5_{s.gpu}"
        sharing = sum(1 for t in slots if t.numa_node == s.numa_node)
        assert len(s.cpus) == 24 // sharing


def test_ndv4_eight_ranks_use_every_core_once():
    slots = B.plan_node(ndv4(), 8, "gpu")
    assert sorted(c for s in slots for c in s.cpus) == list(range(96))
    assert [format_cpulist(s.cpus) for s in slots] == ["24-35", "36-47", "0-11", "12-23",
                                                       "72-83", "84-95", "48-59", "60-71"]


def test_visible_gpus_pick_the_numa_node():
    slots = B.plan_node(ndv4(), 2, "gpu", gpus=[4, 6])
    assert [(s.gpu, s.numa_node, format_cpulist(s.cpus), s.nic) for s in slots] == [
        (4, 3, "72-95", "mlx5_4"), (6, 2, "48-71", "mlx5_6")]
    assert B.visible_gpus({"CUDA_VISIBLE_DEVICES": "4,6"}, 2) == [4, 6]
    assert B.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"}, 2) is None
    assert B.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 2) is None


def test_gpus_without_numa_fall_back_to_disjoint_cpu_shares(tmp_path):
    m = read_machine(make_ndv4(str(tmp_path), gpu_numa_known=False))
    slots = B.plan_node(m, 8, "gpu")
    assert_valid(m, slots)
    assert [s.gpu for s in slots] == list(range(8))
    assert [s.numa_node for s in slots] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("nproc", [1, 2, 3, 4, 6, 8, 16, 31, 32, 33, 64])
def test_two_socket_cpu_ranks(tmp_path, nproc):
    m = read_machine(make_two_socket_cpu_box(str(tmp_path)))
    slots = B.plan_node(m, nproc, "auto")
    assert_valid(m, slots)
    assert all(s.gpu is None and s.nic is None for s in slots)
    if nproc <= 2:  # a rank per NUMA node, each with the whole node
        assert [s.numa_node for s in slots] == list(range(nproc))
        assert all(len(s.cpus) == 32 for s in slots)
    else:  # ranks spread over both nodes in blocks
        assert [s.numa_node for s in slots] == sorted(s.numa_node for s in slots)
        assert abs(sum(s.numa_node == 0 for s in slots) - sum(s.numa_node == 1 for s in slots)) <= 1
    if nproc <= 32:  # while there are cores enough, SMT siblings stay in one rank
        for s in slots:
            assert all((c + 32 if c < 32 else c - 32) in s.cpus for c in s.cpus)


def test_too_many_ranks(tmp_path):
    with pytest.raises(TopologyError, match="has 8 GPUs per node; 9 GPU ranks"):
        B.plan_node(ndv4(), 9, "gpu")
    box = read_machine(make_two_socket_cpu_box(str(tmp_path)))
    with pytest.raises(TopologyError, match="has 64 CPUs; 65 ranks"):
        B.plan_node(box, 65, "cpu")
    with pytest.raises(TopologyError, match="has no GPUs"):
        B.plan_node(box, 1, "gpu")
    with pytest.raises(TopologyError, match="distinct GPUs"):
        B.plan_node(ndv4(), 2, "gpu", gpus=[3, 3])


def test_local_rank_and_size_from_each_launcher():
    assert B.local_rank_and_size({"LOCAL_RANK": "1", "LOCAL_SIZE": "2"}) == (1, 2)
    assert B.local_rank_and_size({"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == (3, 4)
    assert B.local_rank_and_size({"LOCAL_SIZE": "8"}, local_rank=5) == (5, 8)
    with pytest.raises(TopologyError, match="cannot tell this rank's local rank"):
        B.local_rank_and_size({})
    with pytest.raises(TopologyError, match="outside a node of 2"):
        B.local_rank_and_size({"LOCAL_RANK": "2", "LOCAL_SIZE": "2"})


def _rank_args(**kw):
    base = dict(topology="ndv4", sysfs="/sys", device="auto", fabric="auto", local_rank=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_prepare_rank_on_ndv4(monkeypatch, tmp_path):
    """GPU rank start-up on an NDm A100 v4 (the affinity call itself stubbed: this machine has 2 CPUs)."""
    bound = []
    monkeypatch.setattr(B, "bind_cpus", lambda cpus: bound.append(tuple(cpus)) or tuple(cpus))
    monkeypatch.setattr(B, "online_cpus", lambda root="/sys": tuple(range(96)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    env = {"LOCAL_RANK": "0", "LOCAL_SIZE": "4", "CUDA_VISIBLE_DEVICES": "4,5,6,7", "NCCL_IB_SL": "0"}
    slot = B.prepare_rank(_rank_args(), env)
    assert (slot.gpu, slot.numa_node, format_cpulist(slot.cpus), slot.nic) == (4, 3, "72-83", "mlx5_4")
    assert bound == [tuple(range(72, 84))]
    assert env["OMP_NUM_THREADS"] == "12" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["NCCL_IB_SL"] == "0"  # the user's setting wins
    assert env["NCCL_IB_AR_THRESHOLD"] == "0" and env["NCCL_IB_HCA"].startswith("=mlx5_0,")
    with open(env["NCCL_TOPO_FILE"]) as f:
        assert f.read() == fabric.nccl_topology_xml(ndv4())
    assert os.path.dirname(env["NCCL_TOPO_FILE"]) == str(tmp_path)
    assert json.loads(env[B.BINDING_ENV])["cpus"] == "72-83"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO


def test_prepare_rank_refuses_cpus_this_machine_lacks():
    with pytest.raises(TopologyError, match="use --topology local"):
        B.prepare_rank(_rank_args(), {"LOCAL_RANK": "0", "LOCAL_SIZE": "8"})


REPORT = ("import json, os, sys; print(json.dumps({'cpus': sorted(os.sched_getaffinity(0)), 'argv': sys.argv[1:], "
          "'omp': os.environ.get('OMP_NUM_THREADS'), 'local_size': os.environ.get('LOCAL_SIZE'), "
          "'binding': json.loads(os.environ['DS_TUTEL_BINDING'])}))")


def _run_entry(tmp_path, env_extra, *args):
    script = tmp_path / "report.py"
    script.write_text(REPORT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_RANK", "LOCAL_SIZE")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=REPO, **env_extra)
    return subprocess.run([sys.executable, "-m", "ds_tutel.launch.binding", *args, str(script), "--flag", "x"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))


def test_rank_entry_binds_then_runs_the_script(tmp_path):
    """The real thing on this machine: the script starts already bound, with the planned thread count."""
    nproc = min(2, len(local_machine().cpus))
    expected = B.plan_node(local_machine(), nproc, "cpu")[nproc - 1]
    # Open MPI's variables, and the deepspeed launcher's --local_rank handed on to the script.
    out = _run_entry(tmp_path, {"OMPI_COMM_WORLD_LOCAL_RANK": str(nproc - 1),
                                "OMPI_COMM_WORLD_LOCAL_SIZE": str(nproc)}, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cpus"] == list(expected.cpus)
    assert report["omp"] == str(len(expected.cpus)) and report["local_size"] == str(nproc)
    assert report["binding"]["cpus"] == format_cpulist(expected.cpus)
    assert report["argv"] == ["--flag", "x"]
    out = _run_entry(tmp_path, {"LOCAL_SIZE": str(nproc)}, "--local_rank=0", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["argv"] == ["--local_rank=0", "--flag", "x"]


def test_rank_entry_bad_input_exits_before_the_script(tmp_path):
    out = _run_entry(tmp_path, {})
    assert out.returncode == 2 and "cannot tell this rank's local rank" in out.stderr and not out.stdout
    out = _run_entry(tmp_path, {"LOCAL_RANK": "0", "LOCAL_SIZE": "1"}, "--topology", "nope")
    assert out.returncode == 2 and "unknown topology 'nope'" in out.stderr and not out.stdout


def test_bind_cpus_takes_the_overlap_with_an_outer_binding():
    code = ("import os; from ds_tutel.launch.binding import bind_cpus; cpu = min(os.sched_getaffinity(0)); "
            "print(bind_cpus([cpu, 100000]), sorted(os.sched_getaffinity(0)) == [cpu], bind_cpus([100001]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cpu = min(os.sched_getaffinity(0))
    assert out.stdout.split() == [f"({cpu},)", "True", f"({cpu},)"]
    assert "only part of the planned" in out.stderr and "keeping those" in out.stderr
