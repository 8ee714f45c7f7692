"""wsg's custom metrics reach the node's Prometheus endpoint, the one the Ray
dashboard's Metrics tab (through Prometheus/Grafana) reads."""
import time
import urllib.request

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


def _scrape() -> str:
    import ray

    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _sample(text: str, name: str, loss: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'loss="{loss}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_from_a_worker_and_the_driver_are_exported(ray_local):
    import ray
    from wsg.core import telemetry

    @ray.remote(num_cpus=0)
    class Cell:  # stands for a Train worker: metrics come from its process
        def step(self):
            telemetry.train_step("dpo", 7, 0.25, 123.0)
            return True

    cell = Cell.remote()
    assert ray.get(cell.step.remote())
    telemetry.cell_finished("dpo", ok=True)  # from the driver, as the grid does
    telemetry.rollout_throughput(42.0)
    want = {"ray_wsg_train_step": 7.0, "ray_wsg_train_loss": 0.25, "ray_wsg_train_tokens_per_s": 123.0,
            "ray_wsg_cells_done_total": 1.0}
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:
        text = _scrape()
        if all(_sample(text, k, "dpo") == v for k, v in want.items()) and "ray_wsg_rollout_tokens_per_s" in text:
            break
        time.sleep(2)
    for k, v in want.items():
        assert _sample(text, k, "dpo") == v, (k, [line for line in text.splitlines() if "wsg" in line])
    assert "ray_wsg_rollout_tokens_per_s" in text
