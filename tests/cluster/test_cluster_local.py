"""scripts/cluster_local.py: the local-provider cluster file derived from
cluster.yaml (docs/cluster.md, "Try it on one machine"). The slow tests in
test_cluster_up.py run `ray up` with it; these check the derivation itself."""
from __future__ import annotations

import shlex
import tomllib

import pytest
import yaml
from _cluster import ROOT, cluster_local
from ray.autoscaler._private.util import prepare_config, validate_config

BASE = yaml.safe_load((ROOT / "cluster.yaml").read_text())
OPTS = cluster_local.LocalOptions(ssh_key="/keys/k", ssh_user="alice", ssh_port=2222, name="t",
                                  venv="/v/.venv", temp_dir="/t/head", gcs_port=41000,
                                  dashboard_port=41001, metrics_port=41002, client_port=41003, agent_port=41004)


def ray_start_words(command: str) -> list[str]:
    words = shlex.split(command.split(";")[-1])
    return words[words.index("ray"):]


def test_set_ray_start_options_by_hand():
    cmd = "ulimit -n 65536; X=1 ray start --head --port=6379 --object-manager-port=8076 --foo=a"
    got = cluster_local.set_ray_start_options(
        cmd, {"--port": 7000, "--object-manager-port": None, "--resources": '{"a":1}', "--temp-dir": "/t d"})
    assert got == ("ulimit -n 65536; X=1 ray start --head --foo=a --port=7000 "
                   """'--resources={"a":1}' '--temp-dir=/t d'""")
    # The shell reads back exactly the options that were set.
    assert ray_start_words(got) == ["ray", "start", "--head", "--foo=a", "--port=7000",
                                    '--resources={"a":1}', "--temp-dir=/t d"]
    with pytest.raises(ValueError):
        cluster_local.set_ray_start_options("ray stop", {"--port": 1})


def test_local_file_validates_with_ray_and_keeps_cluster_yaml_commands():
    cfg = cluster_local.local_cluster(BASE, OPTS)
    full = prepare_config(cfg)   # what `ray up` does: the local provider's defaults, then the schema
    validate_config(full)
    assert full["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    assert cfg["auth"] == {"ssh_user": "alice", "ssh_private_key": "/keys/k", "ssh_proxy_command": "nc 127.0.0.1 2222"}
    # Head: cluster.yaml's command, its fixed ports replaced, its head resources as options.
    base_head = ray_start_words(BASE["head_start_ray_commands"][-1])
    head = ray_start_words(cfg["head_start_ray_commands"][-1])
    replaced = {"--port", "--metrics-export-port", "--object-manager-port"}
    assert [w for w in base_head if w.split("=")[0] not in replaced] == head[:len(base_head) - len(replaced)]
    assert {"--port=41000", "--metrics-export-port=41002", "--dashboard-port=41001", "--ray-client-server-port=41003",
            "--dashboard-agent-listen-port=41004", "--temp-dir=/t/head",
            "--num-cpus=0", '--resources={"wsg_trial_slot":1000}'} <= set(head)
    assert not any(w.startswith("--object-manager-port") for w in head)
    assert BASE["available_node_types"]["head"]["resources"] == {"CPU": 0, "wsg_trial_slot": 1000}
    # The rest of each command (ray stop, ulimit, the auth mode) is cluster.yaml's.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert len(cfg[key]) == len(BASE[key])
        for mine, theirs in zip(cfg[key], BASE[key]):
            assert mine.split("ray start")[0] == theirs.split("ray start")[0]
    worker = ray_start_words(cfg["worker_start_ray_commands"][-1])
    assert "--address=$RAY_HEAD_IP:41000" in worker and "RAY_AUTH_MODE=token" in cfg["worker_start_ray_commands"][-1]


def test_file_mounts_follow_cluster_yaml():
    cfg = cluster_local.local_cluster(BASE, OPTS)
    assert len(cfg["file_mounts"]) == len(BASE["file_mounts"])
    for remote, local in BASE["file_mounts"].items():
        mine = "~/" + remote.removeprefix("/home/ray/")
        want = local if local.startswith("~") else str((ROOT / local).resolve())
        assert cfg["file_mounts"][mine] == want
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("~/wsg/.venv" in c and "/v/.venv" in c and "scripts/setup.sh" in c for c in cfg["setup_commands"])
    # cluster.yaml's other setup commands are kept; its CUDA install is not.
    kept = [c for c in BASE["setup_commands"] if "requirements/gpu.txt" not in c]
    assert kept and cfg["setup_commands"][:len(kept)] == kept
    assert not any("requirements/gpu.txt" in c for c in cfg["setup_commands"])
    assert cfg["rsync_filter"] == BASE["rsync_filter"]


def test_cluster_yaml_mounts_every_part_of_the_package():
    """`pip install -e` on a node needs every package of pyproject.toml (and the
    stages read configs/): a new top-level package must be mounted too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    need = set(project["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "README.md", "requirements",
                                                             "configs", "scripts"}
    mounted = {r.removeprefix("/home/ray/wsg/") for r in BASE["file_mounts"] if r.startswith("/home/ray/wsg/")}
    assert need <= mounted, need - mounted
    for remote, local in BASE["file_mounts"].items():
        if remote.startswith("/home/ray/wsg/"):
            assert (ROOT / local).exists() and local.removeprefix("./") == remote.removeprefix("/home/ray/wsg/")
