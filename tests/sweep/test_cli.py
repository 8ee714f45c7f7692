"""The `wsg` command line: help, config errors as exit 2 without traceback."""
import subprocess
import sys

import pytest

WSG = [sys.executable, "-m", "wsg.sweep.cli"]


def _run(args, **kw):
    return subprocess.run(WSG + args, capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_stage_commands():
    out = _run(["--help"])
    assert out.returncode == 0
    for cmd in ("run", "rollouts", "train", "eval", "geometry", "report", "status", "config"):
        assert cmd in out.stdout


def test_config_show_prints_resolved_config_and_hash():
    out = _run(["config", "show"])
    assert out.returncode == 0
    assert out.stdout.startswith("# wsg resolved config, hash ")
    assert "name: smoke" in out.stdout


@pytest.mark.parametrize("body,needle", [
    ("train:\n  lora:\n    rnak: 8\n", "train.lora.rnak"),
    ("rollouts:\n  temperature: hot\n", "rollouts.temperature"),
])
def test_bad_config_exits_2_without_traceback(tmp_path, body, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    out = _run(["config", "show", str(p)])
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) <= 4


def test_status_of_a_non_run_is_a_clear_error(tmp_path):
    out = _run(["status", str(tmp_path)])
    assert out.returncode == 2 and "not a wsg run directory" in out.stderr


def test_train_refuses_nonpositive_lr(tmp_path):
    out = _run(["train", "configs/smoke.yaml", "--loss", "sft", "--seed", "1", "--lr", "0", "--run", str(tmp_path / "r")])
    assert out.returncode == 2 and "--lr must be > 0" in out.stderr


def test_relative_run_dir_is_made_absolute(tmp_path, monkeypatch):
    """Tune trials and Ray workers run elsewhere: a relative run path must not leave the CLI."""
    from wsg.core import rundir
    from wsg.core.config import default_config_path
    from wsg.sweep import pipeline
    from wsg.sweep.config import load_config

    monkeypatch.chdir(tmp_path)
    run = pipeline.prepare_run(load_config(default_config_path()), "runs/rel")
    assert run == str(tmp_path / "runs" / "rel")
    assert (tmp_path / "runs" / "rel" / "config.yaml").exists()
    assert rundir.canonical("s3://bucket/run") == "s3://bucket/run"
    assert rundir.canonical("~/x") == str(rundir.Path("~/x").expanduser())
