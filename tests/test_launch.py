"""The launch helper: dry-run plans for 1 and 2 NDm A100 v4 nodes, bad input, fabric files, DeepSpeed's numactl
binding, and real 2-rank CPU jobs started through the deepspeed launcher and through mpirun."""
import json
import os
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from ds_tutel.launch import fabric
from ds_tutel.launch import cli as launch
from ds_tutel.launch.binding import plan_node
from ds_tutel.launch.machine import format_cpulist, local_machine, ndv4, parse_cpulist, read_machine
from fixtures.fake_sysfs import make_two_socket_cpu_box

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NDV4_CPUS = ["24-35", "36-47", "0-11", "12-23", "72-83", "84-95", "48-59", "60-71"]
NDV4_NUMA = [1, 1, 0, 0, 3, 3, 2, 2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "OMP_NUM_THREADS", "LOCAL_"))}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=REPO, **extra)
    return env


def _dry_run(*args, env=None):
    out = subprocess.run([sys.executable, "-m", "ds_tutel.launch", "--dry-run", *args, "--", "train.py", "--lr", "1"],
                         env=env or _env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def test_dry_run_one_ndv4_node():
    plans, stderr = _dry_run("--topology", "ndv4", env=_env(NCCL_IB_SL="0"))
    assert [p["rank"] for p in plans] == list(range(8))
    assert [(p["node"], p["host"], p["local_rank"], p["gpu"]) for p in plans] == [(0, "localhost", i, i)
                                                                                  for i in range(8)]
    assert [p["numa_node"] for p in plans] == NDV4_NUMA
    assert [p["cpus"] for p in plans] == NDV4_CPUS
    assert [p["nic"] for p in plans] == [f"mlx5_{i}" for i in range(8)]
    env = plans[0]["env"]
    assert env["OMP_NUM_THREADS"] == "12" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["NCCL_IB_SL"] == "0"  # the user's environment wins over the preset
    assert {s.name for s in fabric.ndv4_preset(ndv4())} <= set(env)
    assert env["NCCL_TOPO_FILE"] == fabric.nccl_topology_path(ndv4())
    assert "would run:" in stderr and "deepspeed.launcher.runner --num_gpus 8" in stderr
    assert "--module ds_tutel.launch.binding --topology ndv4 --device gpu --fabric ndv4 train.py --lr 1" in stderr


def test_dry_run_two_ndv4_nodes_mpirun():
    plans, stderr = _dry_run("--topology", "ndv4", "--nnodes", "2", "--launcher", "mpirun")
    assert [p["rank"] for p in plans] == list(range(16))
    assert [(p["node"], p["host"]) for p in plans] == [(0, "node0")] * 8 + [(1, "node1")] * 8
    assert [p["local_rank"] for p in plans] == list(range(8)) * 2
    assert [p["cpus"] for p in plans] == NDV4_CPUS * 2
    assert [p["gpu"] for p in plans] == list(range(8)) * 2
    assert "-np 16 --map-by ppr:8:node --bind-to none" in stderr


def test_dry_run_hostfile_and_two_socket_cpu_box(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two CPU servers\ncpu-a slots=4\n\ncpu-b slots=4  # second\n")
    root = make_two_socket_cpu_box(str(tmp_path / "sys"))
    plans, stderr = _dry_run("--sysfs", root, "--hostfile", str(hostfile))
    assert [(p["host"], p["local_rank"], p["numa_node"], p["gpu"]) for p in plans] == [
        (h, r, r // 2, None) for h in ("cpu-a", "cpu-b") for r in range(4)]
    assert [p["cpus"] for p in plans[:4]] == ["0-7,32-39", "8-15,40-47", "16-23,48-55", "24-31,56-63"]
    assert plans[0]["env"] == {"OMP_NUM_THREADS": "16"}  # CPU ranks: no NCCL preset
    assert f"--hostfile {hostfile} --num_nodes 2" in stderr


def test_deepspeed_bind_core_list_reproduces_the_plan():
    """--deepspeed-bind: DeepSpeed's own parsing and slicing of the list give every local rank exactly our CPUs
    (CPU ranks on NDm A100 v4's cores, whose shares ascend with the local rank)."""
    from deepspeed.utils.numa import parse_range_list
    plans = launch.plan_job(ndv4(), [("localhost", None)], 8, "cpu", "none", {})
    cores = parse_range_list(launch.deepspeed_bind_core_list(plans))
    per_rank = len(cores) // len(plans)
    for p in plans:
        assert cores[per_rank * p.slot.local_rank:per_rank * (p.slot.local_rank + 1)] == list(p.slot.cpus)
    _, stderr = _dry_run("--topology", "ndv4", "--device", "cpu", "--nproc-per-node", "8", "--deepspeed-bind")
    assert "--bind_cores_to_rank --bind_core_list=0,1,2," in stderr


def test_deepspeed_bind_refuses_split_smt_shares(tmp_path):
    box = read_machine(make_two_socket_cpu_box(str(tmp_path)))
    plans = launch.plan_job(box, [("localhost", None)], 4, "cpu", "none", {})
    with pytest.raises(launch.LaunchError, match="would bind local rank 0 to CPUs 0-15, but its share is 0-7,32-39"):
        launch.deepspeed_bind_core_list(plans)


def test_deepspeed_bind_refuses_ndv4():
    """DeepSpeed's list must ascend, so it cannot give GPU 0 (NUMA node 1) cores 24-35: say so, start nothing."""
    plans = launch.plan_job(ndv4(), [("localhost", None)], None, "gpu", "ndv4", {})
    with pytest.raises(launch.LaunchError, match="would bind local rank 0 to CPUs 0-11, but its share is 24-35 "
                                                 r"\(NUMA node 1\)"):
        launch.deepspeed_bind_core_list(plans)


BAD_INPUT = [
    (["--topology", "ndv5"], "unknown topology 'ndv5'; known: local, ndv4"),
    (["--topology", "ndv4", "--nproc-per-node", "9"], "has 8 GPUs per node; 9 GPU ranks per node asked"),
    (["--sysfs", "{box}", "--nproc-per-node", "65"], "has 64 CPUs; 65 ranks per node"),
    (["--sysfs", "{box}", "--device", "gpu"], "has no GPUs"),
    (["--topology", "ndv4", "--device", "cpu", "--fabric", "ndv4", "--nproc-per-node", "97"], "96 CPUs"),
    (["--sysfs", "{box}", "--device", "cpu"], None),  # valid: the one case that starts (the control)
    (["--sysfs", "{box}", "--device", "cpu", "--fabric", "ndv5"], "unknown fabric preset 'ndv5'"),
    (["--sysfs", "{box}", "--device", "cpu", "--launcher", "srun"], "invalid choice: 'srun'"),
    (["--hostfile", "{hf:node0 8}"], "line 1: expected '<host> slots=<n>', got 'node0 8'"),
    (["--hostfile", "{hf:a slots=2\na slots=2}"], "line 2: host a is listed twice"),
    (["--hostfile", "{hf:# nothing\n}"], "lists no hosts"),
    (["--hostfile", "{hf:a slots=0}"], "a has slots=0"),
    (["--hostfile", "{missing}"], "cannot read hostfile"),
    (["--hostfile", "{hf:a slots=2\nb slots=2}", "--nnodes", "3"], "--nnodes 3 but hostfile"),
    (["--topology", "ndv4", "--hostfile", "{hf:a slots=4}", "--nproc-per-node", "8"], "host a has 4 slots"),
    (["--nnodes", "2"], "--nnodes 2 needs --hostfile"),
    (["--nnodes", "0"], "--nnodes must be at least 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be at least 1"),
    ([], "script {script} not found"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_exits_2_and_starts_nothing(tmp_path, monkeypatch, capsys, args, message):
    started = []
    monkeypatch.setattr(os, "execve", lambda *a: started.append(a))
    monkeypatch.setattr(os, "execv", lambda *a: started.append(a))
    box = make_two_socket_cpu_box(str(tmp_path / "sys"))
    subs = {"{box}": box, "{missing}": str(tmp_path / "nope")}
    real = []
    for a in args:
        if a.startswith("{hf:"):
            path = tmp_path / f"hostfile{len(real)}"
            path.write_text(a[4:-1] + "\n")
            a = str(path)
        real.append(subs.get(a, a))
    script = str(tmp_path / ("train.py" if message is None else "absent.py"))
    if message is None:
        open(script, "w").close()
    with pytest.raises(SystemExit) as exit_info:
        launch.main([*real, "--", script])
    if message is None:
        assert exit_info.value.code == 0 and len(started) == 1
        return
    assert exit_info.value.code == 2 and not started
    assert message.format(script=script) in capsys.readouterr().err


def test_bad_input_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "ds_tutel.launch", "--dry-run", "--topology", "ndv4",
                          "--nproc-per-node", "9", "--", "train.py"], env=_env(), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().endswith("error: topology ndv4 has 8 GPUs per node; 9 GPU ranks per node asked "
                                       "(use --device cpu for CPU ranks)")


def test_shipped_ndv4_fabric_files_match_the_generators():
    with open(os.path.join(REPO, "launch/ndv4/nccl.env")) as f:
        assert f.read() == fabric.render_env_file("ndv4", ndv4())
    with open(os.path.join(REPO, "launch/ndv4/nccl-topo.xml")) as f:
        assert f.read() == fabric.nccl_topology_xml(ndv4())


def test_nccl_topology_file_groups_gpus_and_nics_by_numa_node():
    m = ndv4()
    system = ET.fromstring(fabric.nccl_topology_xml(m))
    assert len(system.findall("cpu")) == 4
    for cpu in system.findall("cpu"):
        node = int(cpu.get("numaid"))
        mask = int(cpu.get("affinity").replace(",", ""), 16)
        assert [c for c in range(96) if mask >> c & 1] == list(m.numa_node(node).cpus)
        (switch,) = cpu.findall("pci")
        ids = {p.get("busid"): p.get("class") for p in switch.findall("pci")}
        assert sorted(b for b, c in ids.items() if c == "0x030200") == sorted(g.pci for g in m.gpus if g.numa == node)
        assert sorted(b for b, c in ids.items() if c == "0x020700") == sorted(n.pci for n in m.nics if n.numa == node)


def test_preset_never_overrides_the_user():
    settings = fabric.preset_for("ndv4", ndv4())
    env = {"NCCL_IB_HCA": "=mlx5_ib0"}
    applied = fabric.apply_preset(settings, env, topo_file="/x/topo.xml")
    assert env["NCCL_IB_HCA"] == "=mlx5_ib0" and "NCCL_IB_HCA" not in applied
    assert env["NCCL_TOPO_FILE"] == "/x/topo.xml" and env["NCCL_IB_ADAPTIVE_ROUTING"] == "1"
    assert all(s.why for s in settings)


# ---- real jobs: 2 CPU ranks, one MoE training step, each rank reports its binding ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_recipe(recipe: str, report_dir) -> subprocess.CompletedProcess:
    env = _env(DEVICE="cpu", NPROC_PER_NODE="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
    proc = subprocess.Popen([os.path.join(REPO, "launch", recipe), os.path.join(REPO, "launch/moe_step.py"),
                             "--report-dir", str(report_dir)], env=env, cwd=str(report_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        output, _ = proc.communicate()
        pytest.fail(f"{recipe} hung:\n{output[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


@pytest.mark.slow
@pytest.mark.parametrize("recipe,launcher", [("run_deepspeed.sh", "deepspeed"), ("run_mpirun.sh", "mpirun")])
def test_two_cpu_ranks_run_one_moe_step(tmp_path, recipe, launcher):
    out = _run_recipe(recipe, tmp_path)
    assert out.returncode == 0, out.stdout[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    plan = plan_node(local_machine(), 2, "cpu")
    for r, report in enumerate(reports):
        assert (report["rank"], report["world_size"], report["launched_by"]) == (r, 2, launcher)
        assert report["cpus"] == format_cpulist(plan[r].cpus) == report["binding"]["cpus"]
        assert report["torch_threads"] == len(plan[r].cpus)
        assert sum(report["exp_counts"]) > 0 and report["loss"] > 0
    assert not set(parse_cpulist(reports[0]["cpus"])) & set(parse_cpulist(reports[1]["cpus"]))
    assert out.stdout.count("DS_TUTEL_STEP ") == 2
