"""Packaging (pyproject.toml): the wheel installs a working `wsg` under one
import namespace, and its declared dependencies are the pins scripts/setup.sh
and cluster.yaml install (requirements/*.txt)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _reqs(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            out[r.name.lower()] = str(r)
    return out


def test_declared_dependencies_are_the_requirement_files():
    deps = _reqs(PROJECT["dependencies"])
    extras = {k: _reqs(v) for k, v in PROJECT["optional-dependencies"].items()}
    for extra, fname in (("cpu", "cpu.txt"), ("gpu", "gpu.txt"), ("test", "test.txt")):
        files = _reqs((ROOT / "requirements" / fname).read_text().splitlines())
        declared = {**deps, **extras[extra]} if extra != "test" else extras[extra]
        assert files == declared, (fname, set(files.items()) ^ set(declared.items()))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built from this checkout, installed without dependencies into
    a fresh venv that sees this environment's packages only through a .pth line
    (so neither the checkout nor its editable install is importable there)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             "runs", ".cache", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=600)
    wheels = list((tmp / "dist").glob("wsg-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheels[0])],
                   check=True, capture_output=True, timeout=600)
    return env_dir, Path(site), tmp


def _run(env_dir: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_installs_a_working_wsg(installed):
    env_dir, site, tmp = installed
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    # A researcher's own analysis.py in the working directory shadows nothing of wsg's.
    (cwd / "analysis.py").write_text("raise SystemExit('the user module was imported')\n")
    where = _run(env_dir, cwd, str(env_dir / "bin" / "python"), "-c",
                 "import wsg.sweep.cli, wsg.analysis.geometry, wsg.train.losses, wsg.rollouts.reward as r; "
                 "print(wsg.sweep.cli.__file__); print(r.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    for line in where.stdout.split():
        assert line.startswith(str(site / "wsg")), where.stdout
    assert _run(env_dir, cwd, str(env_dir / "bin" / "python"), "-c", "import sweep").returncode != 0
    helped = _run(env_dir, cwd, str(env_dir / "bin" / "wsg"), "--help")
    assert helped.returncode == 0 and "usage: wsg" in helped.stdout, helped.stderr[-3000:]
    shown = _run(env_dir, cwd, str(env_dir / "bin" / "wsg"), "config", "show")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "# wsg resolved config, hash" in shown.stdout and "smollm2-135m-instruct" in shown.stdout


def test_installed_metadata_lists_the_dependencies(installed):
    env_dir, _, tmp = installed
    shown = _run(env_dir, tmp, sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"),
                 "show", "wsg")
    assert shown.returncode == 0, shown.stderr
    requires = next(line for line in shown.stdout.splitlines() if line.startswith("Requires:"))
    for dep in ("ray", "transformers", "peft", "pyarrow", "mlflow-skinny"):
        assert dep in requires, requires
