"""No silent hang on a hand-made cluster (issue 23; sweep/capacity.py).

The layout a new user makes by hand: a head (`ray start --head
--num-cpus=1`), one worker (`ray start --address ... --num-cpus=2`), no
`wsg_trial_slot` resource. Both are real `ray start` nodes, each in a PID
namespace of its own with its own temp dir and home (the token), ended by
the pid of their namespace. The drivers connecting to them are subprocesses
(Ray reads RAY_AUTH_MODE when it is imported)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from _cluster import end, free_port, in_pid_namespace, tail, wait_port
from wsg.sweep import capacity

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "3600"}


class TwoNodes:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        # PYTHONPATH: every Ray worker imports this checkout's wsg
        self.env = {**base, **TRAIN_ENV, "HOME": str(root), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT),
                    "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        self.head = self.worker = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        tmp = self.root / name
        tmp.mkdir()
        return in_pid_namespace(["ray", "start", *args, "--block", f"--temp-dir={tmp}", "--disable-usage-stats",
                                 "--object-store-memory=200000000"], {**self.env, "RAY_TMPDIR": str(tmp)},
                                self.root / f"{name}.log")

    def start(self) -> "TwoNodes":
        subprocess.run(["ray", "get-auth-token", "--generate"], env=self.env, check=True, capture_output=True)
        self.head = self._start("h", ["--head", "--num-cpus=1", f"--port={self.port}", "--include-dashboard=false"])
        wait_port(self.port, 180, self.head, "ray head")
        self.worker = self._start("w", [f"--address={self.address}", "--num-cpus=2"])
        out = self.driver("import ray, time\n"
                          "for _ in range(180):\n"
                          "    if sum(n['Alive'] for n in ray.nodes()) == 2: break\n"
                          "    time.sleep(1)\n"
                          "print(json.dumps(sorted(n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive'])))")
        assert json.loads(out.strip().splitlines()[-1]) == [1.0, 2.0], out + tail(self.root / "w.log")
        return self

    def driver(self, body: str, timeout: float = 300) -> str:
        """Run a Python snippet as a driver of this cluster; its stdout."""
        code = (f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n"
                + textwrap.dedent(body) + "\nray.shutdown()\n")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    def stop(self) -> None:
        end(self.worker)
        end(self.head)


@pytest.fixture(scope="module")
def nodes():
    # a short root: Ray's unix sockets live under each node's temp dir (<= 107 bytes)
    root = Path(tempfile.mkdtemp(prefix="wsgcap-"))
    c = TwoNodes(root)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_drivers_on_the_head_leave_the_worker_whole_for_an_online_cell(nodes, tmp_path):
    """Eight trial drivers' bundles (what Tune asks for them), then the online
    cell's {CPU: 2} PACK group is placed, on the worker."""
    out = nodes.driver("""
        from ray.util.placement_group import placement_group
        from wsg.sweep.capacity import trial_driver_resources, HEAD
        res = trial_driver_resources()
        drivers = [placement_group([res]) for _ in range(8)]
        placed = [pg.wait(60) for pg in drivers]
        cell = placement_group([{"CPU": 2.0}], strategy="PACK")
        ok = cell.wait(60)
        head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(HEAD))
        from ray.util.placement_group import placement_group_table
        where = set(placement_group_table(pg)["bundles_to_node_id"][0] for pg in drivers)
        print(json.dumps({"res": res, "placed": placed, "cell": ok, "drivers_on_head": where == {head},
                          "cell_on_head": placement_group_table(cell)["bundles_to_node_id"][0] == head}))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["res"] == {"CPU": 0, capacity.HEAD: capacity.HEAD_SLICE}
    assert all(got["placed"]) and got["drivers_on_head"]
    assert got["cell"] and not got["cell_on_head"]
    assert "declares no 'wsg_trial_slot'" in out


def test_a_cell_no_node_can_hold_fails_at_once_naming_it(nodes):
    out = nodes.driver("""
        from wsg.sweep.capacity import check_cells_fit
        from wsg.core.errors import WsgError
        try:
            check_cells_fit({"sft-s42-lr0.001": ({"CPU": 1.0}, 1, None),
                             "online_grpo-s42-lr0.001": ({"CPU": 3.0}, 1, None),
                             "dpo-s42-lr0.0001": ({"CPU": 1.0}, 4, None),
                             "online_dapo-s42-lr0.001": ({"CPU": 1.0}, 1, {"CPU": 1.0, "GPU": 1.0})})
            print("no error")
        except WsgError as e:
            print(json.dumps(str(e)))
    """)
    msg = json.loads(out.strip().splitlines()[-1])
    lines = msg.splitlines()
    assert lines[0].startswith("3 cell(s) ask for more than any node")
    bad = {ln.split(":")[0].strip(): ln for ln in lines[1:4]}
    assert set(bad) == {"online_grpo-s42-lr0.001", "dpo-s42-lr0.0001", "online_dapo-s42-lr0.001"}
    assert "asks for {CPU: 3} per Ray Train worker x 1" in bad["online_grpo-s42-lr0.001"]
    assert "{CPU: 1} per Ray Train worker x 4" in bad["dpo-s42-lr0.0001"]  # 3 CPUs in all: 4 never fit
    assert "an engine {CPU: 1, GPU: 1}" in bad["online_dapo-s42-lr0.001"]
    assert all("the largest node is node " in ln and "{CPU: 2, GPU: 0}" in ln for ln in bad.values())
    assert "lower train.cpus_per_worker" in lines[-1]


def test_a_cell_that_waits_says_so_naming_what_it_waits_for(nodes, tmp_path):
    """The worker's 2 CPUs held by one group, a second {CPU: 2} group waits:
    after wait_s the watcher names the cell that started and the demand."""
    run = tmp_path / "run"
    out = nodes.driver(f"""
        import time
        from ray.util.placement_group import placement_group
        from wsg.core import rundir
        from wsg.sweep.capacity import GroupWait
        from wsg.core.layout import RunLayout
        layout = RunLayout.of({str(run)!r})
        held = placement_group([{{"CPU": 2.0}}], strategy="PACK")
        assert held.wait(60)
        watch = GroupWait(layout, ["online_grpo-s42-lr0.001", "sft-s42-lr0.001"], set(), wait_s=2.0)
        rundir.write_json(layout.cell("online_grpo-s42-lr0.001").spec, {{"id": "online_grpo-s42-lr0.001"}})
        waiting = placement_group([{{"CPU": 2.0}}], strategy="PACK")
        lines = []
        t0 = time.time()
        while time.time() - t0 < 30 and not lines:
            lines = watch.check()
            time.sleep(0.5)
        print(json.dumps(lines))
    """)
    lines = json.loads(out.strip().splitlines()[-1])
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("wsg: cell online_grpo-s42-lr0.001 has waited ")
    assert "sft-s42" not in line  # not started: not named
    assert "a placement group of {CPU: 2} (PACK" in line and "largest node: node " in line
    assert "(head) {CPU: 1, GPU: 0}" in line  # what each node has free now


@pytest.mark.slow
def test_tiny_with_its_online_cells_completes_on_head_1cpu_worker_2cpu(nodes):
    """`wsg run configs/tiny.yaml` onto the hand-made cluster, no custom
    resource: every cell, online ones included, completes (it sat forever
    behind a driver's 0.01 CPU before; drivers on the head are tested above)."""
    from wsg.sweep.config import load_config
    from wsg.sweep.grid import is_online, plan_cells

    cells = plan_cells(load_config(str(ROOT / "configs" / "tiny.yaml")))
    assert sum(map(is_online, cells)) == 2
    # the run folder outside pytest's numbered temp folders (other sessions prune those)
    work = Path(tempfile.mkdtemp(prefix="wsgcap-run-"))
    run = work / "run"
    env = {**nodes.env, "WSG_WAIT_WARN_S": "120"}
    for k in ("WSG_CACHE", "HF_HOME", "XDG_CACHE_HOME"):  # the tiny model's cache, as the other tests use it
        if k in os.environ:
            env[k] = os.environ[k]
    cmd = [sys.executable, "-m", "wsg.sweep.cli", "run", "configs/tiny.yaml", "--run", str(run),
           "--address", nodes.address]
    try:
        t0 = time.time()
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=2400)
        wall = time.time() - t0
        print(out.stdout[-4000:])
        assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
        done = sorted(p.parent.name for p in (run / "cells").glob("*/_COMPLETE"))
        assert done == sorted(c.id for c in cells), done
        assert (run / "geometry" / "global_pairs.parquet").exists()
        # tiny's cells fit one CPU worker: each trains in its Tune trial's own
        # (shared) process, which holds the cell's CPUs, so no driver holds any.
        import json

        assert all(json.loads((run / "cells" / c / "_COMPLETE").read_text())["shared_worker"] for c in done)
        print(f"tiny on head (1 CPU) + worker (2 CPUs): {wall:.0f} s, {len(done)} cells")
    finally:
        shutil.rmtree(work, ignore_errors=True)
