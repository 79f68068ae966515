"""The FSDP2 mesh decision as a pure function: HSDP (nodes x workers per node) across nodes
where each node can hold a copy of the sharded state, the flat mesh everywhere else."""

import pytest
import torch

from rlhf.distributed.fsdp import HSDP_MEMORY_SHARE, mesh_shape, sharded_state_bytes

GB = 10**9
H100 = 80 * GB


@pytest.mark.parametrize("world, local, expected", [
    (1, 1, (1,)),        # one process
    (8, 8, (8,)),        # one node of 8 GPUs
    (16, 8, (2, 8)),     # 2 nodes x 8
    (32, 8, (4, 8)),     # 4 nodes x 8
    (2, 1, (2, 1)),      # 2 nodes x 1 (the test's fake nodes)
    (12, 8, (12,)),      # nodes of unequal size: no mesh row is a node
    (8, 16, (8,)),       # a launcher that over-reports the local size
    (4, 0, (4,)),
])
def test_hsdp_needs_several_equal_nodes(world, local, expected):
    assert mesh_shape(world, local) == expected


def test_hsdp_only_where_a_node_holds_the_state():
    # 16 bytes per trained parameter (fp32 weight, gradient, two AdamW moments).
    eight_b, seventy_b = 8 * 10**9 * 16, 70 * 10**9 * 16
    # 8B over 8 GPUs of a node: 16 GB each, within 40 GB (half of 80 GB): HSDP.
    assert mesh_shape(16, 8, eight_b, H100) == (2, 8)
    # 70B over one node: 140 GB a GPU, far over: shard over all 16 GPUs.
    assert mesh_shape(16, 8, seventy_b, H100) == (16,)
    # The boundary: exactly the share fits, a byte more does not.
    limit = int(HSDP_MEMORY_SHARE * H100) * 8
    assert mesh_shape(16, 8, limit, H100) == (2, 8)
    assert mesh_shape(16, 8, limit + 8, H100) == (16,)
    # Memory unknown (CPU workers, or state offloaded to the host): the layout decides.
    assert mesh_shape(16, 8, seventy_b, None) == (2, 8)


def test_state_bytes_count_optimizer_state_for_trained_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))  # 20 parameters each
    model[1].requires_grad_(False)
    assert sharded_state_bytes(model) == 20 * 16 + 20 * 4
