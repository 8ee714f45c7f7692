"""Where an online cell's processes run and how many threads each uses
(train/task.py `placement`): a CPU engine sits inside its trainer's bundle
and both use the whole bundle's cores; a GPU engine holds its own."""
from wsg.sweep.config import parse_config
from wsg.train.task import placement


def _cfg(**online):
    return parse_config({"grid": {"losses": ["online_grpo"]}, "analysis": {"reference_loss": "online_grpo"},
                         "train": {"cpus_per_worker": 1}, "online": {"engine_cpus": 2, **online}})


def test_a_colocated_cpu_engine_shares_its_trainers_bundle_and_cores():
    p = placement(_cfg(), online=True)
    assert p.worker == {"CPU": 3.0} and p.engine is None
    assert p.trainer_threads == 3 and p.engine_threads == 3
    assert p.total == {"CPU": 3.0}


def test_a_gpu_or_remote_engine_holds_its_own_resources_and_lends_nothing():
    p = placement(_cfg(engine_gpus=1), online=True)
    assert p.worker == {"CPU": 1.0} and p.engine == {"CPU": 2.0, "GPU": 1.0}
    assert p.trainer_threads == 1 and p.engine_threads is None
    spread = placement(_cfg(colocate=False), online=True)
    assert spread.engine == {"CPU": 2.0} and spread.trainer_threads == 1


def test_an_offline_cell_holds_its_worker_only():
    p = placement(_cfg(), online=False)
    assert p.worker == {"CPU": 1.0} and p.engine is None and p.trainer_threads == 1
