"""sweep/capacity.py without a cluster: which cells some node can ever hold
(alive nodes and an autoscaler's node types), and what a trial driver holds
on a Ray without `wsg_trial_slot` (tests/cluster/test_cluster_capacity.py
runs the same on a real head + worker made by `ray start`)."""
from __future__ import annotations

from wsg.sweep import capacity as cap

HEAD_NODE = ("node 10.0.0.1 aaaa (head)", {"CPU": 1.0, cap.HEAD: 1.0, "memory": 1e9}, 1)
WORKER = ("node 10.0.0.2 bbbb", {"CPU": 2.0, "memory": 1e9}, 1)


def test_copies_of_a_bundle_in_a_node():
    assert cap._copies({"CPU": 1.0}, {"CPU": 2.0}) == 2
    assert cap._copies({"CPU": 0.7}, {"CPU": 2.1}) == 3  # 2.1 / 0.7 rounds to 2.9999...
    assert cap._copies({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}) == 0
    assert cap._copies({"CPU": 0.0}, {}) > 1000  # asks for nothing


def test_unplaceable_names_each_cell_its_ask_and_the_largest_node():
    shapes = [HEAD_NODE, WORKER]
    demands = {"a": ({"CPU": 2.0}, 1, None),        # the worker holds it
               "b": ({"CPU": 1.0}, 3, None),        # spread: head 1 + worker 2
               "c": ({"CPU": 1.0}, 4, None),        # 3 CPUs in all
               "d": ({"CPU": 3.0}, 1, None),        # no node has 3
               "e": ({"CPU": 1.0}, 1, {"GPU": 1.0})}  # no GPU anywhere
    bad = cap.unplaceable(demands, shapes)
    assert [ln.split(":")[0].strip() for ln in bad] == ["c", "d", "e"]
    assert bad[1] == "  d: asks for {CPU: 3} per Ray Train worker x 1; the largest node is node 10.0.0.2 bbbb {CPU: 2, GPU: 0}"
    assert "+ an engine {GPU: 1}" in bad[2]


def test_an_autoscaler_node_type_counts_as_a_node_it_may_add():
    gpu_type = ("node type 'gpu' (autoscaler, up to 2)", {"CPU": 8.0, "GPU": 1.0}, 2)
    demands = {"d": ({"CPU": 3.0}, 1, None), "e": ({"CPU": 1.0}, 1, {"GPU": 1.0}),
               "f": ({"CPU": 4.0}, 5, None), "g": ({"CPU": 4.0}, 4, None)}
    assert [ln.split(":")[0].strip() for ln in cap.unplaceable(demands, [HEAD_NODE, WORKER, gpu_type])] == ["f"]
    unbounded = ("node type 'cpu' (autoscaler, up to -1)", {"CPU": 4.0}, -1)
    assert cap.unplaceable(demands, [HEAD_NODE, unbounded]) == [
        "  e: asks for {CPU: 1} per Ray Train worker x 1 + an engine {GPU: 1}; the largest node is "
        "node type 'cpu' (autoscaler, up to -1) {CPU: 4, GPU: 0}"]
    # a head with no CPU (cluster.yaml's) and no worker yet: nothing fits
    assert cap.largest([("node h (head)", {"CPU": 0.0}, 1)]) == "node h (head) {CPU: 0, GPU: 0}"
    assert cap.largest([]) == "no alive node"


def test_without_trial_slot_drivers_hold_a_sliver_of_the_head_and_no_cpu(ray_module):
    """A local Ray started without wsg_trial_slot (one node, the head, 2 CPUs):
    the drivers' bundles are placed and the 2 CPUs stay free for a cell."""
    from ray.util.placement_group import placement_group, remove_placement_group

    res = cap.trial_driver_resources()
    assert res == {"CPU": 0, cap.HEAD: cap.HEAD_SLICE}
    drivers = [placement_group([res]) for _ in range(5)]
    cell = placement_group([{"CPU": 2.0}], strategy="PACK")
    try:
        assert all(pg.wait(60) for pg in drivers) and cell.wait(60)
    finally:
        for pg in [*drivers, cell]:
            remove_placement_group(pg)
    shapes = cap.node_shapes()
    assert len(shapes) == 1 and shapes[0][0].endswith("(head)") and shapes[0][1]["CPU"] == 2.0


def test_a_local_ray_is_a_fixed_cluster_and_refuses_a_cell_too_large(ray_module):
    """Ray's read-only autoscaler (a local Ray) reports one node type per node:
    nothing will be added, so a cell larger than the box is refused by name."""
    import time

    import pytest
    from wsg.core.errors import WsgError

    deadline = time.time() + 30
    while not cap.fixed_cluster() and time.time() < deadline:  # the monitor's first report
        time.sleep(0.5)
    assert cap.fixed_cluster()
    cap.check_cells_fit({"sft-s42-lr0.001": ({"CPU": 2.0}, 1, None)})
    with pytest.raises(WsgError, match=r"online_grpo-s42-lr0.001: asks for \{CPU: 3\} per Ray Train worker x 1; "
                                       r"the largest node is node .* \(head\) \{CPU: 2, GPU: 0\}"):
        cap.check_cells_fit({"online_grpo-s42-lr0.001": ({"CPU": 3.0}, 1, None)})
