"""Services and clients for the cluster tests (tests/cluster/test_cluster_up.py).

Everything here starts real programs (the OS's sshd, moto's S3 server, Ray
nodes, headless Chromium) and ends each by its own pid. Ray nodes live in PID
namespaces of their own (`unshare --pid --fork --mount-proc --kill-child`):
inside one, `ray stop` — which `ray up` runs before `ray start` and `ray down`
runs on the head — sees and ends only that node's processes, never another
Ray instance of this machine; SIGKILL to the `unshare` process ends the whole
namespace (Ray's autoscaler monitor ignores SIGTERM).
"""
from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SSHD = "/usr/sbin/sshd"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


cluster_local = _load_script("cluster_local")  # the generator of the local cluster file


def missing_tools() -> list[str]:
    """What the cluster tests need from the OS (scripts/setup.sh --test installs it as root)."""
    need = {"sshd (openssh-server)": os.access(SSHD, os.X_OK), "ssh": shutil.which("ssh"),
            "ssh-keygen": shutil.which("ssh-keygen"), "rsync": shutil.which("rsync"),
            "nc (netcat-openbsd)": shutil.which("nc"), "unshare": shutil.which("unshare"),
            "moto_server (requirements/test.txt)": (VENV_BIN / "moto_server").exists()}
    return [k for k, ok in need.items() if not ok]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def tail(path: Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def end(proc: subprocess.Popen | None) -> None:
    """SIGKILL one process we started (by its pid) and reap it."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# --- PID namespaces ----------------------------------------------------------------------
def in_pid_namespace(argv: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start argv as pid 1 of a new PID namespace; `end()` of the result ends it all."""
    with open(log, "ab") as out:
        return subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", *argv],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def hiding(dirs) -> str:
    """Shell commands that cover each folder with an empty tmpfs, for the
    mount namespace they run in (unshare made it private): a node started
    after them cannot see another node's scratch (its files are not found)."""
    return "".join(f"mount -t tmpfs -o size=1m wsg-hidden {d} || exit 1; " for d in dirs)


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def namespace_pids(unshare: subprocess.Popen) -> dict[int, str]:
    """pid -> command line of every process in the namespace `unshare` made."""
    try:
        child = int(Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return {}
    ns = _ns(child)
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and _ns(int(d)) == ns:
            try:
                out[int(d)] = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def raylet_of(unshare: subprocess.Popen) -> tuple[int, str] | None:
    """(pid, Ray node id) of the raylet in a node's namespace, if it runs."""
    for pid, cmd in namespace_pids(unshare).items():
        m = re.search(r"/raylet/raylet .*--node_id=([0-9a-f]+)", cmd)
        if m:
            return pid, m.group(1)
    return None


# --- sshd on loopback ------------------------------------------------------------------
@dataclass
class SSHServer:
    """The OS's sshd on a free loopback port, in a PID namespace of its own:
    host key, client key and authorized_keys live in `root`, and its sessions
    get `env` (HOME among it: the node's home is a folder of the test)."""

    root: Path
    env: dict[str, str]
    hide: list = field(default_factory=list)   # folders this node must not see (hiding())
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_key"

    def start(self) -> "SSHServer":
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "wsg-test",
                            "-f", str(self.root / name)], check=True)
        auth = self.root / "authorized_keys"
        auth.write_text((self.root / "client_key.pub").read_text())
        auth.chmod(0o600)
        setenv = " ".join(f"{k}={v}" for k, v in self.env.items())
        assert not re.search(r"\s", "".join(self.env.values())), "SetEnv values must have no spaces"
        cfg = self.root / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            f"HostKey {self.root / 'host_key'}", f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {auth}", "PermitRootLogin prohibit-password",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "PrintMotd no", "MaxSessions 50", "MaxStartups 50",
            f"SetEnv {setenv}", ""]))
        # sshd refuses to start without its privilege-separation folder (made by
        # the Debian service, which is not running here).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = in_pid_namespace(["bash", "-c", hiding(self.hide) + f"exec {SSHD} -D -e -f {cfg}"],
                                     env={"PATH": os.environ["PATH"]}, log=self.root / "sshd.log")
        wait_port(self.port, 20, self.proc, "sshd")
        return self

    def stop(self) -> None:
        end(self.proc)


# --- moto's S3 server --------------------------------------------------------------------
@dataclass
class S3Server:
    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """What every process that reads or writes s3:// needs (pyarrow reads these)."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> "S3Server":
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "moto.log", "ab") as out:
            self.proc = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_port(self.port, 60, self.proc, "moto_server")
        return self

    def fs(self, create_buckets: bool = False):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{self.port}", scheme="http",
                                 access_key="testing", secret_key="testing", region="us-east-1",
                                 allow_bucket_creation=create_buckets)

    def make_bucket(self, name: str) -> None:
        self.fs(create_buckets=True).create_dir(name)

    def read(self, uri: str) -> bytes:
        with self.fs().open_input_stream(uri.removeprefix("s3://")) as f:
            return f.read()

    def exists(self, uri: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs().get_file_info(uri.removeprefix("s3://")).type != pafs.FileType.NotFound

    def files(self, uri: str) -> list[str]:
        """Every file under a prefix, relative to it."""
        import pyarrow.fs as pafs

        base = uri.removeprefix("s3://").rstrip("/")
        if not self.exists(uri):
            return []
        infos = self.fs().get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        end(self.proc)


# --- the dashboard -------------------------------------------------------------------------
@dataclass
class Dashboard:
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, auth: bool = True, timeout: float = 20):
        """(HTTP status, parsed JSON or text) of a GET on the dashboard."""
        req = urllib.request.Request(self.url + path)
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body, status = r.read().decode(), r.status
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as err:  # not listening (yet, or any more)
            return 0, str(err)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body


def metric_names(port: int, prefix: str = "wsg_") -> set[str]:
    """Names of the `prefix` metrics a node's Prometheus endpoint exports now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return set()
    # Ray exports custom metrics under a "ray_" namespace prefix.
    names = {m.group(1) for m in re.finditer(r"^(?:ray_)?(\w+?)(?:_total)?(?:\{|\s)", text, re.M)}
    return {n for n in names if n.startswith(prefix)}


# --- headless Chromium through the DevTools protocol on a pipe ------------------------------
class Chromium:
    """Headless Chromium driven over --remote-debugging-pipe (no extra package):
    log in to the dashboard as its login dialog does, open a page, read its
    text and take a screenshot."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", "--window-size=1400,1000"]

    def __init__(self, profile: Path, log: Path):
        self._to_r, self._to_w = os.pipe()      # commands: our end writes, Chromium reads fd 3
        self._from_r, self._from_w = os.pipe()  # replies: Chromium writes fd 4, we read
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{self._to_r} 4>&{self._from_w}', CHROMIUM,
                 *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
                pass_fds=(self._to_r, self._from_w), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(self._to_r)
        os.close(self._from_w)
        self._buf = b""
        self._id = 0
        self.session = None

    def _send(self, method: str, params: dict | None = None, session: str | None = None,
              timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or self.proc.poll() is not None:
                raise TimeoutError(f"Chromium did not answer {method}")
            if select.select([self._from_r], [], [], left)[0]:
                chunk = os.read(self._from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buf += chunk

    def page(self, s: str, params: dict | None = None, timeout: float = 60) -> dict:
        return self._send(s, params, self.session, timeout)

    def open(self, url: str) -> None:
        if self.session is None:
            target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.page("Emulation.setDeviceMetricsOverride",
                      {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        self.page("Page.navigate", {"url": url})

    def eval(self, js: str):
        r = self.page("Runtime.evaluate", {"expression": js, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{js[:80]}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def wait_text(self, needles: list[str], timeout: float) -> str:
        """The page's visible text once it holds every needle (else the last text read)."""
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            try:
                text = self.eval("document.body ? document.body.innerText : ''") or ""
            except RuntimeError:
                text = ""
            if all(n in text for n in needles):
                return text
            time.sleep(1)
        return text

    def login(self, dashboard: Dashboard) -> dict:
        """What the dashboard's token dialog does: POST the token to
        /api/authenticate, which sets the session cookie."""
        self.open(dashboard.url + "/")
        self.wait_text([], 2)
        return self.eval(
            f"fetch('/api/authenticate', {{method: 'POST', headers: {{Authorization: 'Bearer {dashboard.token}'}}}})"
            ".then(r => r.json().then(j => ({status: r.status, body: j})))")

    def screenshot(self, path: Path) -> None:
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass
        end(self.proc)
