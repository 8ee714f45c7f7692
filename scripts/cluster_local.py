"""Write a local-provider cluster file for `ray up` from cluster.yaml.

cluster.yaml describes the AWS GPU cluster (docs/cluster.md). To try the same
cluster path on one machine (the slow tests in tests/cluster/test_cluster_up.py do),
this script derives a `provider: local` file from it instead of keeping a
second copy: the head and worker start commands, the head's resources, the
file mounts and the rsync filters all come from cluster.yaml, and only what
cannot hold on a single box is rewritten:

- provider: `local`, head at --head-ip, reached over SSH as the current user
  (an SSH server on another port is reached through `nc`, which is what
  Ray's `ssh_proxy_command` is for: Ray has no SSH port setting);
- no Docker image: the node runs the CPU stack of `scripts/setup.sh` from an
  existing virtual environment (--venv) instead of requirements/gpu.txt;
- ports: several Ray nodes (and other Ray instances) share one host, so the
  fixed ports of cluster.yaml are replaced by the given ones and the object
  manager port is left to Ray (a free one per node);
- the head's resources of cluster.yaml (`CPU: 0`, `wsg_trial_slot`) become
  `ray start` options: a local cluster has no node types and takes each
  node's resources from its own `ray start`;
- file mounts under /home/ray (the image's user) go to the SSH user's home.

Usage: python scripts/cluster_local.py --out local.yaml --ssh-key KEY [--ssh-port N] ...
then `ray up -y local.yaml` from the repository root.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE_HOME = "/home/ray/"


@dataclass
class LocalOptions:
    """Everything of the local file that cluster.yaml cannot know."""

    ssh_key: str
    ssh_user: str = field(default_factory=getpass.getuser)
    ssh_port: int = 22
    head_ip: str = "127.0.0.1"
    name: str = "wsg-local"
    venv: str = str(ROOT / ".venv")
    temp_dir: str | None = None          # the head's Ray temp dir (default: Ray's)
    gcs_port: int = 6379
    dashboard_port: int = 8265
    metrics_port: int = 8080
    client_port: int = 10001
    agent_port: int = 52365              # the dashboard agent's HTTP port


# --- `ray start` option rewriting ------------------------------------------------
_RAY_START = re.compile(r"(?P<cmd>\bray start\b[^;&|]*)")


def set_ray_start_options(command: str, options: dict[str, object | None]) -> str:
    """Return `command` with the options of its `ray start` set: an option
    given a value replaces the one there (or is appended), None removes it.
    Values are shell-quoted; the rest of the command is left as it is."""
    m = _RAY_START.search(command)
    if not m:
        raise ValueError(f"no `ray start` in {command!r}")
    words = shlex.split(m.group("cmd"), posix=True)
    kept = [w for w in words if w.split("=", 1)[0] not in options]
    for name, value in options.items():
        if value is not None:
            kept.append(f"{name}={value}")
    new = " ".join(w if re.fullmatch(r"[\w\-./:=,~$]+", w) else shlex.quote(w) for w in kept)
    tail = command[m.end("cmd"):]
    gap = " " if m.group("cmd") != m.group("cmd").rstrip() else ""
    return command[:m.start("cmd")] + new + gap + tail


def _resource_options(resources: dict) -> dict[str, object | None]:
    """A node type's `resources` as `ray start` options."""
    res = dict(resources)
    out: dict[str, object | None] = {}
    if "CPU" in res:
        out["--num-cpus"] = int(res.pop("CPU"))
    if "GPU" in res:
        out["--num-gpus"] = int(res.pop("GPU"))
    if res:
        out["--resources"] = json.dumps(res, separators=(",", ":"), sort_keys=True)
    return out


# --- the local file ----------------------------------------------------------------
def local_cluster(base: dict, opts: LocalOptions, base_dir: Path = ROOT) -> dict:
    """The local-provider cluster config derived from cluster.yaml's `base`."""
    head_type = base["available_node_types"][base["head_node_type"]]
    auth = {"ssh_user": opts.ssh_user, "ssh_private_key": str(Path(opts.ssh_key).absolute())}
    if int(opts.ssh_port) != 22:
        auth["ssh_proxy_command"] = f"nc {opts.head_ip} {int(opts.ssh_port)}"

    mounts = {}
    for remote, local in base.get("file_mounts", {}).items():
        if remote.startswith(IMAGE_HOME):
            remote = "~/" + remote[len(IMAGE_HOME):]
        # `~` stays for `ray up` to expand (the home of whoever runs it); relative
        # paths are relative to cluster.yaml's folder, the repository root.
        mounts[remote] = local if local.startswith("~") else str((base_dir / local).resolve())
    # Where the checkout lands on the node: the folder of the mounted pyproject.toml.
    checkout = next((r.rsplit("/", 1)[0] for r, l in mounts.items()
                     if not l.startswith("~") and Path(l) == (base_dir / "pyproject.toml").resolve()), None)
    if checkout is None:
        raise ValueError("cluster.yaml mounts no pyproject.toml of the repository; nothing to set up")

    venv = str(Path(opts.venv).absolute())
    # cluster.yaml's setup, but the CPU stack instead of requirements/gpu.txt.
    setup = [c for c in base.get("setup_commands", []) if "requirements/gpu.txt" not in c] + [
        # The node's Python: the existing virtual environment, made the
        # checkout's .venv so that scripts/setup.sh finds it (its stamp skips
        # pip when the CPU stack is already installed).
        f"ln -sfn {shlex.quote(venv)} {checkout}/.venv && bash {checkout}/scripts/setup.sh",
        # `ray` and `wsg` on the PATH of every later command (the image has them there).
        f"grep -qs 'wsg-local-path' ~/.bashrc || "
        f"echo 'export PATH={checkout}/.venv/bin:$PATH  # wsg-local-path' >> ~/.bashrc",
    ]

    common = {"--object-manager-port": None}
    head_opts = {
        **common, "--port": opts.gcs_port, "--dashboard-port": opts.dashboard_port,
        "--metrics-export-port": opts.metrics_port, "--ray-client-server-port": opts.client_port,
        "--dashboard-agent-listen-port": opts.agent_port, **_resource_options(head_type.get("resources", {})),
    }
    if opts.temp_dir:
        head_opts["--temp-dir"] = opts.temp_dir
    worker_opts = {**common, "--address": f"$RAY_HEAD_IP:{opts.gcs_port}"}

    def rewrite(commands: list[str], options: dict) -> list[str]:
        return [set_ray_start_options(c, options) if _RAY_START.search(c) else c for c in commands]

    out = {
        "cluster_name": opts.name,
        "max_workers": 0,   # worker nodes join with `ray start` (worker_start_ray_commands)
        "upscaling_speed": base.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": base.get("idle_timeout_minutes", 5),
        "provider": {"type": "local", "head_ip": opts.head_ip, "worker_ips": []},
        "auth": auth,
        "file_mounts": mounts,
        "setup_commands": setup,
        "head_start_ray_commands": rewrite(base["head_start_ray_commands"], head_opts),
        "worker_start_ray_commands": rewrite(base["worker_start_ray_commands"], worker_opts),
    }
    for key in ("rsync_exclude", "rsync_filter"):
        if key in base:
            out[key] = list(base[key])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(ROOT / "cluster.yaml"), help="the cluster file to derive from")
    ap.add_argument("--out", required=True, help="where to write the local cluster file")
    d = LocalOptions(ssh_key="")
    ap.add_argument("--ssh-key", required=True, help="private key the SSH server accepts")
    ap.add_argument("--ssh-user", default=d.ssh_user)
    ap.add_argument("--ssh-port", type=int, default=d.ssh_port)
    ap.add_argument("--head-ip", default=d.head_ip)
    ap.add_argument("--name", default=d.name, help="cluster_name (unique per cluster on this machine)")
    ap.add_argument("--venv", default=d.venv, help="virtual environment with the CPU stack (scripts/setup.sh)")
    ap.add_argument("--temp-dir", default=None, help="the head node's Ray temp dir")
    for opt in ("gcs_port", "dashboard_port", "metrics_port", "client_port", "agent_port"):
        ap.add_argument("--" + opt.replace("_", "-"), type=int, default=getattr(d, opt))
    a = ap.parse_args(argv)
    opts = LocalOptions(**{k: v for k, v in vars(a).items() if k not in ("base", "out")})
    base_path = Path(a.base)
    cfg = local_cluster(yaml.safe_load(base_path.read_text()), opts, base_path.resolve().parent)
    Path(a.out).write_text(
        f"# Generated by scripts/cluster_local.py from {base_path.name}; do not edit.\n"
        + yaml.safe_dump(cfg, sort_keys=False, width=200))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
