"""Nodes x local ranks from the launcher's environment: precedence, agreement, uneven nodes, group layouts."""
import pytest

from ds_tutel.parallel.topology import Topology, TopologyError, from_env


def test_launcher_variables_in_order_of_precedence():
    assert from_env(8, 0, environ={}).num_nodes == 1  # nothing set: one node
    assert from_env(8, 5, environ={"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "1"}).local_size == 4
    assert from_env(8, 5, environ={"LOCAL_SIZE": "2", "LOCAL_RANK": "1"}).num_nodes == 4
    topo = from_env(16, 9, environ={"OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (topo.num_nodes, topo.node_of(9), topo.local_rank_of(9), topo.source) == (2, 1, 1,
                                                                                     "OMPI_COMM_WORLD_LOCAL_SIZE")
    # The explicit setting and argument win over launchers that disagree with each other.
    env = {"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "8", "DS_TUTEL_LOCAL_SIZE": "2", "LOCAL_RANK": "1"}
    assert from_env(8, 3, environ=env).local_size == 2
    assert from_env(8, 1, local_size=4, environ=env).local_size == 4


@pytest.mark.parametrize("world, rank, env, match", [
    (6, 0, {"LOCAL_SIZE": "4"}, "uneven nodes"),
    (4, 0, {"LOCAL_SIZE": "8"}, "exceeds"),
    (8, 0, {"LOCAL_WORLD_SIZE": "4", "LOCAL_SIZE": "8"}, "disagree"),
    (8, 5, {"LOCAL_SIZE": "4", "LOCAL_RANK": "3"}, "node by node"),
    (8, 0, {"LOCAL_SIZE": "four"}, "not an integer"),
    (8, 0, {"DS_TUTEL_LOCAL_SIZE": "0"}, ">= 1"),
])
def test_bad_layouts_raise_clear_errors(world, rank, env, match):
    with pytest.raises(TopologyError, match=match):
        from_env(world, rank, environ=env)


def test_group_layouts():
    topo = Topology(8, 4)
    whole = topo.group_layout(range(8))
    assert (whole.num_nodes, whole.ranks_per_node) == (2, 4)
    assert whole.intra_ranks(1) == [4, 5, 6, 7] and whole.inter_ranks(2) == [2, 6]
    strided = topo.group_layout([1, 3, 5, 7])  # DeepSpeed's data-before-expert groups
    assert (strided.num_nodes, strided.ranks_per_node, strided.intra_ranks(1), strided.inter_ranks(0)) == (
        2, 2, [5, 7], [1, 5])
    assert topo.group_layout([0, 1]).num_nodes == 1
    assert topo.group_layout([0, 4]).ranks_per_node == 1
    assert topo.group_layout([0, 1, 2, 4]) is None  # 3 ranks on one node, 1 on the other
    assert topo.group_layout([4, 0]) is None        # not in node order
