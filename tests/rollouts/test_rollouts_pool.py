"""Engine pool sizing and the first shard submissions (rollouts/stage.py), by
hand-worked examples; no Ray, no vLLM."""
import pytest
from wsg.core.errors import WsgError
from wsg.rollouts.stage import QUEUE_DEPTH, first_submissions, pool_size


def test_first_submissions_are_breadth_first():
    # The default run: 2 engines, 2 shards -> one each (depth-first gave engine 0 both).
    assert first_submissions(2, 2) == [0, 1]
    assert first_submissions(2, 3) == [0, 1, 0]
    assert first_submissions(3, 10, depth=2) == [0, 1, 2, 0, 1, 2]
    assert first_submissions(1, 5) == [0] * QUEUE_DEPTH
    assert first_submissions(4, 0) == []
    counts = [first_submissions(5, 7).count(e) for e in range(5)]
    assert counts == [2, 2, 1, 1, 1]  # no engine gets a second before all have one


def test_pool_size_on_a_cpu_box_and_a_gpu_cluster():
    box = {"CPU": 2.0}
    assert pool_size("auto", cpus_per_engine=1, gpus_per_engine=0, n_shards=8, resources=box) == (1, 0.0)
    assert pool_size(2, cpus_per_engine=1, gpus_per_engine=0, n_shards=8, resources=box) == (2, 0.0)
    # never more engines than shards
    assert pool_size(2, cpus_per_engine=1, gpus_per_engine=0, n_shards=1, resources=box) == (1, 0.0)
    gpus = {"CPU": 64.0, "GPU": 8.0}
    assert pool_size("auto", cpus_per_engine=4, gpus_per_engine=0, n_shards=20, resources=gpus) == (8, 1.0)
    assert pool_size("auto", cpus_per_engine=4, gpus_per_engine=2, n_shards=20, resources=gpus) == (4, 2.0)
    assert pool_size("auto", cpus_per_engine=1, gpus_per_engine=0.5, n_shards=20, resources=gpus) == (16, 0.5)


@pytest.mark.parametrize("kw, field", [
    (dict(num_engines=3, cpus_per_engine=1, gpus_per_engine=0, resources={"CPU": 2.0}), "rollouts.cpus_per_engine"),
    (dict(num_engines=3, cpus_per_engine=1, gpus_per_engine=1, resources={"CPU": 8.0, "GPU": 2.0}),
     "rollouts.num_engines"),
])
def test_pool_size_refuses_what_the_cluster_cannot_hold(kw, field):
    n = kw.pop("num_engines")
    with pytest.raises(WsgError, match=field):
        pool_size(n, n_shards=10, **kw)
