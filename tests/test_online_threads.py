"""An online cell's trainer borrows its idle CPU engine's cores only when the
engine shares its node and has no GPU (train/online.py `_idle_engine_cpus`)."""
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def pg():
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    group = placement_group([{"CPU": 1}, {"CPU": 2}], strategy="PACK")
    ray.get(group.ready())
    yield group
    remove_placement_group(group)
    ray.shutdown()


def test_trainer_borrows_the_colocated_cpu_engine(pg):
    from train.online import _idle_engine_cpus

    assert _idle_engine_cpus(pg, SimpleNamespace(engine_gpus=0, engine_cpus=2.0)) == 2.0


def test_trainer_never_borrows_a_gpu_engine(pg):
    from train.online import _idle_engine_cpus

    assert _idle_engine_cpus(pg, SimpleNamespace(engine_gpus=1, engine_cpus=2.0)) == 0.0
