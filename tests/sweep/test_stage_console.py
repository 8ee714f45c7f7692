"""Stage commands keep third-party output in the run's log, as `wsg run` does:
`wsg geometry` (over a run, and standalone over --adapter folders) run as the
user runs them, a real local Ray started and shut down by the command; Ray's
start-up lines land in `<run>/logs/wsg.log`, and on the terminal only with
--verbose."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from wsg.core import rundir
from wsg.core.config import dump_config
from wsg.sweep.config import parse_config

REPO = Path(__file__).resolve().parents[2]
RAY_STARTED = "Started a local Ray instance"


def _adapter(folder: Path, rng, layers: int = 2, d: int = 8, r: int = 2) -> str:
    """A PEFT LoRA folder of random factors (q_proj, v_proj of `layers` blocks)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": r, "lora_alpha": 2 * r, "peft_type": "LORA", "target_modules": ["q_proj", "v_proj"]}))
    t = {}
    for layer in range(layers):
        for p in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{p}"
            t[f"{key}.lora_A.weight"] = rng.normal(size=(r, d)).astype(np.float32)
            t[f"{key}.lora_B.weight"] = rng.normal(size=(d, r)).astype(np.float32)
    save_file(t, str(folder / "adapter_model.safetensors"))
    rundir.mark_complete(str(folder))
    return str(folder)


def _wsg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "wsg.sweep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_geometry_over_a_run_keeps_ray_output_in_the_log(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    cfg = parse_config({"name": "geo", "model": {"name": "tiny-qwen3"}, "grid": {"losses": ["sft", "dpo"]}})
    rundir.write_text(str(run / "config.yaml"), dump_config(cfg))
    for cell in ("sft-s42-lr1e-04", "dpo-s42-lr1e-05"):
        for step in (1, 2):
            _adapter(run / "cells" / cell / f"step_{step}", rng)
    out = _wsg("geometry", "--run", str(run), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    term = out.stdout + out.stderr
    assert RAY_STARTED not in term and "INFO" not in term
    lines = out.stdout.splitlines()
    assert lines[-1].startswith("wsg: [geometry] 4 adapters, 6 pairs;"), lines
    assert all(line.startswith(("wsg:", "  ")) for line in lines), lines  # wsg's lines and its progress
    log = (run / "logs" / "wsg.log").read_text()
    assert RAY_STARTED in log and "'adapters': 4" in log  # Ray's start-up and the whole summary
    assert (run / "geometry" / "global_pairs.parquet").exists()


@pytest.mark.slow  # two Ray start-ups: over a minute on a 2-core box
def test_geometry_standalone_verbose_shows_ray_output(tmp_path):
    rng = np.random.default_rng(1)
    a, b = _adapter(tmp_path / "a", rng), _adapter(tmp_path / "b", rng)
    out = _wsg("geometry", "--adapter", f"a={a}", "--adapter", f"b={b}", "--out", "tables", "--verbose",
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert RAY_STARTED in out.stdout + out.stderr
    assert f"tables in {tmp_path / 'tables'}" in out.stdout and "global_pairs: 1 rows" in out.stdout
    assert not (tmp_path / "tables" / "logs").exists()
    # Quiet (the default): the same command keeps Ray's lines in <out>/logs/wsg.log.
    out = _wsg("geometry", "--adapter", f"a={a}", "--adapter", f"b={b}", "--out", "quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert RAY_STARTED not in out.stdout + out.stderr and "global_pairs: 1 rows" in out.stdout
    assert RAY_STARTED in (tmp_path / "quiet" / "logs" / "wsg.log").read_text()


@pytest.mark.slow  # a real Ray Train cell of tiny-qwen3
def test_train_keeps_ray_output_in_the_log(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    from train_fixtures import tiny_cfg, write_run
    from wsg.core.models import load_tokenizer

    run = write_run(str(tmp_path / "run"), load_tokenizer("tiny-qwen3"))
    (tmp_path / "cfg.yaml").write_text(dump_config(tiny_cfg(cpus_per_worker=1)))
    out = _wsg("train", str(tmp_path / "cfg.yaml"), "--run", run, "--loss", "sft", "--seed", "42", "--lr", "1e-4",
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    term = out.stdout + out.stderr
    assert RAY_STARTED not in term and "INFO" not in term, term
    lines = out.stdout.splitlines()
    assert lines and lines[-1].startswith("wsg: [train]") and all(line.startswith(("wsg:", "  ")) for line in lines)
    assert RAY_STARTED in (Path(run) / "logs" / "wsg.log").read_text()
    assert rundir.is_complete(str(Path(run) / "cells" / "sft-s42-lr1e-04"))
