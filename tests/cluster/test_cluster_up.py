"""The cluster path as users take it (docs/cluster.md, "Try it on one machine").

One cluster serves every test of this module, on this machine:

- `ray up -y` of a local-provider file generated from cluster.yaml
  (scripts/cluster_local.py) starts the head over SSH on loopback: the OS's
  sshd on a free port with keys made here, its sessions' HOME a folder of
  the test (never the user's ~/.ssh or home);
- two worker nodes run cluster.yaml's worker start commands as separate
  processes, each with its own Ray temp dir, CPUs and WSG_CACHE, so the head
  (CPU 0, as in cluster.yaml) trains nothing;
- run directories are s3:// URIs on moto's S3 server on loopback.

Then: `ray exec`; `ray job submit` of `wsg run configs/tiny.yaml` watched
through the dashboard's job API and the head's metrics endpoint, with a
screenshot of the job page in headless Chromium; a second run driven from
"the laptop" with `--address` during which a worker node's raylet is killed
(the grid completes; a rerun skips everything; its adapters equal the first
run's bit for bit); `wsg status`, `wsg report` and `wsg geometry --out s3://`
against it; `ray down`. Every process started is ended by its pid.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from _cluster import (
    CHROMIUM,
    ROOT,
    VENV_BIN,
    Chromium,
    Dashboard,
    S3Server,
    SSHServer,
    cluster_local,
    end,
    free_port,
    hiding,
    in_pid_namespace,
    metric_names,
    missing_tools,
    namespace_pids,
    raylet_of,
    tail,
)

_missing = missing_tools()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),  # the module's cluster starts in the first test's setup
              pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} (scripts/setup.sh --test as root)")]

CONFIG = "configs/tiny.yaml"
# The killed run: tiny's four SFT-family cells (its adapters are compared with
# the job's cells of the same name; the online cells are the job's to show).
KILLED_LOSSES = ["sft", "rft", "dft", "rift"]
WORKERS = ("worker1", "worker2")
WORKER_CPUS = 2          # an online cell holds a trainer and an engine CPU (sweep/grid.py cell_resources)
JOB_TIMEOUT = 2400       # seconds; the tiny run takes ~5 min on an idle 2-core box, 25 on a crowded one


def run_cli(argv: list[str], env: dict, log: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """A command of the user's shell ("the laptop"), output kept in `log`."""
    p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n{p.stdout}\n{p.stderr}\n[rc={p.returncode}]\n")
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:4])} ... exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@dataclass
class Cluster:
    root: Path
    s3: S3Server
    ssh: SSHServer
    cluster_file: Path
    laptop_env: dict
    node_env: dict
    dashboard: Dashboard
    gcs_port: int
    head_metrics_port: int
    workers: dict = field(default_factory=dict)        # name -> unshare Popen
    worker_metrics: dict = field(default_factory=dict)  # name -> metrics port
    head_node_id: str = ""
    down: bool = False
    seconds: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.root / "commands.log"

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli([str(VENV_BIN / "ray"), *args], self.laptop_env, self.log, timeout, check)

    def wsg(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        return run_cli([str(VENV_BIN / "wsg"), *args], self.laptop_env, self.log, timeout, check)

    def worker_node_ids(self) -> dict[str, str]:
        return {name: r[1] for name, p in self.workers.items() if (r := raylet_of(p))}

    def alive_nodes(self) -> list[dict]:
        status, body = self.dashboard.get("/api/v0/nodes?limit=100")
        if status != 200 or not isinstance(body, dict):
            return []
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def scratch(root: Path, but: str) -> list[Path]:
    """The scratch folders (temp dirs, WSG_CACHE) of every node but one;
    "laptop" is where `ray up` and the second run's driver run."""
    where = {"laptop": ["laptop-tmp", "cache-laptop"], "head": ["head", "node-tmp", "cache-head"],
             **{w: [w, f"{w}-tmp", f"cache-{w}"] for w in WORKERS}}
    out = [root / d for node, dirs in where.items() if node != but for d in dirs]
    for d in out:
        d.mkdir(exist_ok=True)
    return out


def _start_worker(c: Cluster, name: str, commands: list[str], attempts: int = 5) -> None:
    """cluster.yaml's worker start commands, as the autoscaler runs them over
    SSH (login shell, ~/.bashrc, RAY_HEAD_IP), in a PID namespace of the
    node's own; returns once the node is alive in the cluster. `ray start`
    gives a raylet 30 s to register, which a loaded 2-core box can miss: a
    failed start is ended and tried again."""
    log = c.root / f"{name}.log"
    # Nothing may assume another node's disk (issue 17): in this node's mount
    # namespace the scratch folders of the laptop, the head and the other
    # workers are covered by empty tmpfs mounts, so a path handed over from
    # there is not found here, as on separate machines.
    mounts = hiding(scratch(c.root, but=name))
    for attempt in range(attempts):
        port = free_port()
        node_opts = {"--temp-dir": str(c.root / name), "--num-cpus": WORKER_CPUS,
                     "--dashboard-agent-listen-port": free_port(), "--metrics-export-port": port}
        cmds = [cluster_local.set_ray_start_options(x, node_opts) if "ray start" in x else x for x in commands]
        script = (mounts + "source ~/.bashrc; export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore; "
                  + " && ".join(f"({x})" for x in cmds) + " || exit 1; exec sleep infinity")
        env = {**c.node_env, "WSG_CACHE": str(c.root / f"cache-{name}"), "TMPDIR": str(c.root / f"{name}-tmp"),
               "RAY_TMPDIR": str(c.root / f"{name}-tmp"), "RAY_HEAD_IP": "127.0.0.1", "PATH": os.environ["PATH"]}
        proc = in_pid_namespace(["bash", "-c", script], env, log)
        c.workers[name], c.worker_metrics[name] = proc, port
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            mine = raylet_of(proc)
            if mine and any(n["node_id"] == mine[1] for n in c.alive_nodes()):
                return
            time.sleep(2)
        end(proc)
        time.sleep(10)  # let a busy head settle before the next try
    raise AssertionError(f"{name} did not join the cluster in {attempts} attempts:\n{tail(log)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A short root: Ray's unix sockets live under each node's temp dir (<= 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="wsgc-"))
    c = None
    s3 = ssh = None
    try:
        s3 = S3Server(root / "s3").start()
        s3.make_bucket("wsg")
        laptop, node = root / "laptop", root / "node"
        laptop.mkdir()
        node.mkdir()
        scratch(root, but="")  # every node's scratch folder exists before any node hides another's
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
        laptop_env = {**base, **s3.env, "HOME": str(laptop), "RAY_TMPDIR": str(root / "laptop-tmp"),
                      "TMPDIR": str(root / "laptop-tmp"), "WSG_CACHE": str(root / "cache-laptop"),
                      "RAY_AUTH_MODE": "token", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
        node_env = {**s3.env, "HOME": str(node), "RAY_TMPDIR": str(root / "node-tmp"),
                    "TMPDIR": str(root / "node-tmp"), "WSG_CACHE": str(root / "cache-head")}
        ssh = SSHServer(root / "ssh", node_env, hide=scratch(root, but="head")).start()
        ports = {k: free_port() for k in ("gcs", "dashboard", "metrics", "client", "agent")}
        cfile = root / "cluster-local.yaml"
        c = Cluster(root, s3, ssh, cfile, laptop_env, node_env, Dashboard(ports["dashboard"], ""),
                    ports["gcs"], ports["metrics"])
        # docs/cluster.md: the token first, then the cluster file, then `ray up`.
        c.ray("get-auth-token", "--generate")
        run_cli([str(VENV_BIN / "python"), "scripts/cluster_local.py", "--out", str(cfile),
                 "--ssh-key", str(ssh.client_key), "--ssh-port", str(ssh.port),
                 "--name", f"wsg-test-{uuid.uuid4().hex[:8]}", "--temp-dir", str(root / "head"),
                 "--gcs-port", str(ports["gcs"]), "--dashboard-port", str(ports["dashboard"]),
                 "--metrics-port", str(ports["metrics"]), "--client-port", str(ports["client"]),
                 "--agent-port", str(ports["agent"])], laptop_env, c.log)
        t = time.time()
        if c.ray("up", "-y", str(cfile), timeout=900, check=False).returncode != 0:
            # A loaded box can miss `ray start`'s 30 s raylet registration; `ray up` again
            # restarts Ray on the head (commands.log keeps the first attempt).
            c.ray("up", "-y", str(cfile), timeout=900)
        c.seconds["ray up"] = time.time() - t
        c.dashboard.token = (node / ".ray" / "auth_token").read_text().strip()
        for name in WORKERS:  # one after the other: each start is CPU-heavy
            _start_worker(c, name, yaml.safe_load(cfile.read_text())["worker_start_ray_commands"])
        assert len(c.alive_nodes()) == 3, c.alive_nodes()
        c.head_node_id = next(n["node_id"] for n in c.alive_nodes() if n["is_head_node"])
        c.seconds["cluster ready"] = time.time() - t
        yield c
    finally:
        if c is not None and not c.down:
            c.ray("down", "-y", str(c.cluster_file), timeout=300, check=False)
        for p in (c.workers.values() if c else []):
            end(p)
        if ssh:
            ssh.stop()
        if s3:
            s3.stop()
        if c is not None:
            print(f"\ncluster test timings (s): { {k: round(v) for k, v in c.seconds.items()} }")
        keep = tmp_path_factory.getbasetemp() / "cluster-logs"  # the logs, for a person to read
        try:
            shutil.copytree(root, keep, ignore=shutil.ignore_patterns("session_*", "s3", "cache-*", "wsg", "pymp-*"),
                            dirs_exist_ok=True, ignore_dangling_symlinks=True, symlinks=True)
        except shutil.Error:
            pass  # sockets and other special files are not copied
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class JobRun:
    run: str
    submission_id: str
    entrypoint: str
    info: dict
    logs: str
    jobs: list
    head_metrics: set
    worker_metrics: set
    seconds: float
    screenshot: Path | None
    page_text: str


@pytest.fixture(scope="module")
def job_run(cluster, tmp_path_factory) -> JobRun:
    """`ray job submit` of the tiny study (docs/cluster.md step 3), watched as
    a user watches it: the Jobs API, the metrics endpoints, the job page."""
    c, run = cluster, "s3://wsg/job"
    sid = f"wsg-tiny-{uuid.uuid4().hex[:6]}"
    entry = f"wsg run {CONFIG} --run {run}"
    t = time.time()
    c.ray("job", "submit", "--address", c.dashboard.url, "--no-wait", "--submission-id", sid,
          "--working-dir", ".", "--", *entry.split())
    head_metrics, worker_metrics, jobs, errors = set(), set(), [], []
    info = {"status": "UNKNOWN"}
    while True:
        status, got = c.dashboard.get(f"/api/jobs/{sid}")
        if status == 200:
            info = got
        else:  # a busy dashboard may time out once; a persistent error shows below
            errors.append((status, str(got)[:300]))
            assert len(errors) < 20, f"job API: {errors[-3:]}"
        if not jobs:
            jobs = c.dashboard.get("/api/jobs/")[1]
        head_metrics |= metric_names(c.head_metrics_port)
        for port in c.worker_metrics.values():
            worker_metrics |= metric_names(port)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if time.time() - t > JOB_TIMEOUT:
            c.ray("job", "stop", "--address", c.dashboard.url, sid, check=False)
            break
        time.sleep(3)
    seconds = time.time() - t
    c.seconds["job"] = seconds
    logs = c.dashboard.get(f"/api/jobs/{sid}/logs")[1]
    logs = logs.get("logs", "") if isinstance(logs, dict) else str(logs)
    (c.root / "job.log").write_text(logs)
    shot, text = None, ""
    if CHROMIUM:
        shot = c.root / "dashboard-job.png"
        browser = Chromium(c.root / "chromium-profile", c.root / "chromium.log")
        try:
            login = browser.login(c.dashboard)
            assert login["status"] == 200, login
            browser.open(f"{c.dashboard.url}/#/jobs/{sid}")
            text = browser.wait_text([sid, info["status"], "wsg run"], 60)
            time.sleep(2)  # let the log panel and charts settle for the picture
            browser.screenshot(shot)
        finally:
            browser.close()
        keep = tmp_path_factory.getbasetemp() / "dashboard-job.png"
        shutil.copy(shot, keep)
        print(f"\ndashboard job page screenshot: {keep}")
    return JobRun(run, sid, entry, info, logs, jobs if isinstance(jobs, list) else [], head_metrics,
                  worker_metrics, seconds, shot, text)


def cell_status(c: Cluster, run: str) -> dict[str, dict]:
    import json

    out = {}
    for path in c.s3.files(f"{run}/cells"):
        parts = path.split("/")
        if len(parts) == 2 and parts[1] == "status.json":
            out[parts[0]] = json.loads(c.s3.read(f"{run}/cells/{path}"))
    return out


def adapters(c: Cluster, run: str) -> dict[str, bytes]:
    """cell/step_N/adapter_model.safetensors -> bytes, for every cell and checkpoint."""
    return {p: c.s3.read(f"{run}/cells/{p}") for p in c.s3.files(f"{run}/cells")
            if p.endswith("/adapter_model.safetensors")}


# --- the tests ------------------------------------------------------------------------------
class Problems(list):
    """Every failed check of a test, reported together: one run of these
    minutes-long tests shows all that is wrong, not only the first thing."""

    def check(self, ok, what: str) -> None:
        if not ok:
            self.append(what)

    def assert_none(self) -> None:
        assert not self, "\n\n".join(self)


def test_ray_up_job_submit_and_dashboard(cluster, job_run):
    c, j, p = cluster, job_run, Problems()
    # `ray exec` runs on the head, in its environment: the three nodes with
    # cluster.yaml's head resources (CPU 0, the trial slots) and the workers' CPUs.
    out = c.ray("exec", str(c.cluster_file), "ray status", check=False).stdout
    p.check("wsg_trial_slot" in out and f"/{2 * WORKER_CPUS}.0 CPU" in out, f"ray exec 'ray status':\n{out[-2000:]}")
    # Token authentication is on: the job API refuses a request without the token.
    p.check(c.dashboard.get("/api/jobs/", auth=False)[0] == 401, "the job API answers without the token")
    p.check(j.info["status"] == "SUCCEEDED", f"job {j.info['status']}: {j.info.get('message')}\n{j.logs[-4000:]}")
    listed = [x for x in j.jobs if isinstance(x, dict) and x.get("submission_id") == j.submission_id]
    p.check(listed and listed[0]["entrypoint"] == j.entrypoint, f"job not listed with its entrypoint: {j.jobs}")
    p.check("wsg: finished" in j.logs and "[grid] done" in j.logs, f"job log:\n{j.logs[-3000:]}")
    # The run directory on the object store holds the whole study.
    p.check(c.s3.exists(f"{j.run}/report/index.html"), f"no {j.run}/report/index.html")
    # Custom metrics during the run: the driver (rollouts) lives on the head; the
    # cells, each in its shared worker process (its Tune trial), on the workers
    # (docs/monitoring.md).
    p.check("wsg_rollout_tokens_per_s" in j.head_metrics,
            f"head metrics endpoint showed {sorted(j.head_metrics)} during the run")
    p.check({"wsg_train_step", "wsg_cells_done"} <= j.worker_metrics,
            f"worker metrics endpoints showed {sorted(j.worker_metrics)}")
    # Cells ran on the worker nodes, never on the head (status.json node_id).
    statuses = cell_status(c, j.run)
    workers = set(c.worker_node_ids().values())
    p.check(statuses and all(s.get("node_id") in workers for s in statuses.values()),
            f"cell node ids {({k: s.get('node_id') for k, s in statuses.items()})}, head {c.head_node_id}, "
            f"workers {workers}")
    if CHROMIUM:
        p.check(j.screenshot is not None and j.screenshot.exists() and j.screenshot.stat().st_size > 20_000,
                "the job page screenshot is missing or (nearly) blank")
        p.check(j.submission_id in j.page_text and "SUCCEEDED" in j.page_text and j.entrypoint in j.page_text,
                f"the job page shows:\n{j.page_text[:2000]}")
    p.assert_none()


def test_worker_killed_mid_grid_then_status_report_geometry(cluster, job_run):
    c, ref, p = cluster, job_run, Problems()
    run = "s3://wsg/killed"
    address = f"127.0.0.1:{c.gcs_port}"
    log = c.root / "driver.log"
    config = c.root / "tiny-offline.yaml"
    body = yaml.safe_load((ROOT / CONFIG).read_text())
    body["grid"]["losses"] = KILLED_LOSSES
    config.write_text(yaml.safe_dump(body, sort_keys=False))
    t = time.time()
    with open(log, "wb") as out:
        driver = subprocess.Popen([str(VENV_BIN / "wsg"), "run", str(config), "--run", run, "--address", address],
                                  env=c.laptop_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    killed = done_before = None
    try:
        # Mid-grid: a cell is complete and another one's trainer runs on a worker node
        # (a Ray Train worker, or a shared worker process: Tune's ImplicitFunc trial actor).
        while killed is None and driver.poll() is None and time.time() - t < JOB_TIMEOUT:
            done = [x.split("/")[0] for x in c.s3.files(f"{run}/cells") if x.endswith("/_COMPLETE")
                    and x.count("/") == 1]
            if done:
                for name, ns in c.workers.items():
                    if any("RayTrainWorker" in cmd or "ImplicitFunc" in cmd for cmd in namespace_pids(ns).values()):
                        pid, _ = raylet_of(ns)
                        os.kill(pid, 9)  # the node's raylet, by pid
                        killed, done_before = name, set(done)
                        break
            time.sleep(1)
        assert killed, f"no worker node was running a cell after the first one finished:\n{tail(log)}"
        rc = driver.wait(timeout=JOB_TIMEOUT)
    finally:
        end(driver)
    c.seconds["killed run"] = time.time() - t
    # The grid is what the kill tests; a later stage's failure is reported, and
    # the checks below still run on the cells.
    p.check(rc == 0, f"wsg run exited {rc}:\n{tail(log, 4000)}")
    assert c.s3.exists(f"{run}/stages/grid/_COMPLETE"), f"the grid did not complete:\n{tail(log, 4000)}"
    survivor = next(n for n in c.workers if n != killed)
    ids = {n: r[1] for n, x in c.workers.items() if (r := raylet_of(x))}
    p.check(killed not in ids and survivor in ids, f"raylets after the kill: {ids}")

    # Rerun: every stage and every cell is skipped.
    t = time.time()
    out = c.wsg("run", str(config), "--run", run, "--address", address, check=False).stdout
    c.seconds["rerun"] = time.time() - t
    p.check((" 0 to run" in out or "[grid] complete, skipped" in out) and "[rollouts] complete, skipped" in out,
            f"rerun:\n{out[-3000:]}")

    # The adapters equal the uninterrupted run's, bit for bit, every cell and checkpoint.
    mine, theirs = adapters(c, run), adapters(c, ref.run)
    p.check(mine and len({k.split("/")[0] for k in mine}) == len(KILLED_LOSSES) and set(mine) <= set(theirs),
            f"adapters {sorted(mine)} vs {sorted(theirs)}")
    differ = [k for k in mine if k in theirs and mine[k] != theirs[k]]
    p.check(not differ, f"adapters differ from the uninterrupted run: {differ}")

    # The object-store run from the laptop: status, report, geometry to s3.
    statuses = cell_status(c, run)
    status = c.wsg("status", run, check=False).stdout
    p.check(statuses and status.count(" done") == len(statuses) and "not complete" not in status,
            f"wsg status:\n{status}")
    p.check("report:" in c.wsg("report", run, check=False).stdout and c.s3.exists(f"{run}/report/index.html"),
            "wsg report wrote no report/index.html")
    t = time.time()
    c.wsg("geometry", "--run", run, "--out", "s3://wsg/geometry-out", "--address", address, check=False)
    c.seconds["geometry"] = time.time() - t
    tables = c.s3.files("s3://wsg/geometry-out")
    p.check("global_pairs.parquet" in tables and "module_pairs.parquet" in tables, f"geometry --out wrote {tables}")

    # Cells ran on worker nodes only; those finished after the kill on the survivor.
    head = c.head_node_id
    p.check(statuses and all(s.get("node_id") not in (None, head) for s in statuses.values()),
            f"cell node ids {({k: s.get('node_id') for k, s in statuses.items()})}, head {head}")
    after = [cid for cid in statuses if cid not in (done_before or ())]
    p.check(after and all(statuses[cid].get("node_id") == ids.get(survivor) for cid in after),
            f"cells after the kill ran on {({cid: statuses[cid].get('node_id') for cid in after})}, "
            f"survivor {survivor} = {ids.get(survivor)}")
    p.assert_none()


def test_ray_down_ends_the_cluster(cluster):
    c = cluster
    t = time.time()
    c.ray("down", "-y", str(c.cluster_file), timeout=300)
    c.seconds["ray down"] = time.time() - t
    c.down = True
    # `ray down` ran `ray stop` on the head: none of its Ray processes is left
    # (the namespace holds only sshd and its sessions now).
    left = [cmd for cmd in namespace_pids(c.ssh.proc).values() if "ray" in cmd.split()[0] or "/ray/" in cmd]
    assert not left, left
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", c.dashboard.port)) != 0, "the dashboard still listens"
