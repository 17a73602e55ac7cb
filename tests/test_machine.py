"""Machine descriptions: the built-in NDm A100 v4 and what the sysfs reader derives from fake and real trees."""
import os

import pytest

from ds_tutel.launch import machine as M
from fixtures.fake_sysfs import NDV4_NVIDIA_SMI_TOPO, make_ndv4, make_two_socket_cpu_box

NDV4_GPU_NUMA = (1, 1, 0, 0, 3, 3, 2, 2)


def test_ndv4_layout():
    m = M.ndv4()
    assert [n.id for n in m.numa_nodes] == [0, 1, 2, 3]
    assert [n.cpus for n in m.numa_nodes] == [tuple(range(24 * n, 24 * n + 24)) for n in range(4)]
    assert m.cpus == tuple(range(96))
    assert tuple(g.numa for g in m.gpus) == NDV4_GPU_NUMA
    for g in m.gpus:
        nic = m.nic_for_gpu(g.index)
        assert nic.name == f"mlx5_{g.index}" and nic.numa == g.numa
    for node in m.numa_nodes:  # each NUMA node: one PCIe switch with 2 GPUs and 2 NICs
        assert sum(g.numa == node.id for g in m.gpus) == 2 and sum(n.numa == node.id for n in m.nics) == 2


def _layout(m: M.Machine):
    return ([(n.id, n.cpus) for n in m.numa_nodes], [(g.index, g.pci, g.numa) for g in m.gpus],
            [(n.name, n.pci, n.numa) for n in m.nics])


def test_reader_derives_ndv4_from_its_sysfs(tmp_path):
    read = M.read_machine(make_ndv4(str(tmp_path)))
    assert _layout(read) == _layout(M.ndv4())  # NVSwitches, host bridge and the Ethernet VF left out


def test_reader_asks_nvidia_smi_only_for_unknown_numa(tmp_path):
    root = make_ndv4(str(tmp_path), gpu_numa_known=False)
    calls = []

    def smi():
        calls.append(1)
        return NDV4_NVIDIA_SMI_TOPO

    assert [g.numa for g in M.read_machine(root).gpus] == [None] * 8
    assert _layout(M.read_machine(root, nvidia_smi_topo=smi)) == _layout(M.ndv4()) and calls == [1]
    M.read_machine(make_ndv4(str(tmp_path / "known")), nvidia_smi_topo=smi)
    assert calls == [1]


def test_parse_nvidia_smi_topo():
    assert M.parse_nvidia_smi_topo(NDV4_NVIDIA_SMI_TOPO) == dict(enumerate(NDV4_GPU_NUMA))
    assert M.parse_nvidia_smi_topo("No devices were found") == {}


def test_reader_two_socket_box_groups_smt_siblings(tmp_path):
    m = M.read_machine(make_two_socket_cpu_box(str(tmp_path)))
    assert m.gpus == ()
    assert [n.cpus for n in m.numa_nodes] == [tuple(range(16)) + tuple(range(32, 48)),
                                              tuple(range(16, 32)) + tuple(range(48, 64))]
    assert m.numa_nodes[0].cores[:2] == ((0, 32), (1, 33)) and len(m.numa_nodes[1].cores) == 16
    assert [(n.name, n.numa) for n in m.nics] == [("mlx5_0", 0)]  # RoCE NIC: no InfiniBand HCA here


def test_reader_respects_offline_cpus_and_container_cpuset(tmp_path):
    root = make_two_socket_cpu_box(str(tmp_path))
    with open(os.path.join(root, "devices/system/cpu/online"), "w") as f:
        f.write("0-62\n")
    os.makedirs(os.path.join(root, "fs/cgroup"))
    with open(os.path.join(root, "fs/cgroup/cpuset.cpus.effective"), "w") as f:
        f.write("0-7,16-23,48-63\n")
    m = M.read_machine(root)
    assert m.numa_nodes[0].cpus == tuple(range(8))
    assert m.numa_nodes[1].cpus == tuple(range(16, 24)) + tuple(range(48, 63))


def test_reader_on_this_machine_sees_the_cpus_we_run_on():
    m = M.local_machine()
    assert set(os.sched_getaffinity(0)) <= set(m.cpus)
    assert all(g.numa is None or g.numa in {n.id for n in m.numa_nodes} for g in m.gpus)


def test_unreadable_sysfs_is_a_clear_error(tmp_path):
    with pytest.raises(M.TopologyError, match="cannot read CPUs"):
        M.read_machine(str(tmp_path))


def test_get_machine():
    assert M.get_machine("ndv4") == M.ndv4()
    with pytest.raises(M.TopologyError, match=r"unknown topology 'ndv5'; known: local, ndv4"):
        M.get_machine("ndv5")


@pytest.mark.parametrize("text,cpus", [("0-3,8", (0, 1, 2, 3, 8)), ("5", (5,)), ("", ()),
                                       ("2,0-1", (0, 1, 2))])
def test_cpulist_round_trip(text, cpus):
    assert M.parse_cpulist(text) == cpus
    assert M.parse_cpulist(M.format_cpulist(cpus)) == cpus
    assert M.format_cpulist([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize("bad", ["3-1", "a", "1,,2", "1-"])
def test_bad_cpulist(bad):
    with pytest.raises(M.TopologyError, match="not a CPU list"):
        M.parse_cpulist(bad)
