"""Completion markers vouch for what they list; `wsg verify`; failed writes
(issue 23): checked against hashlib and the file system directly, on local
folders and on moto's S3 server."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from wsg.core import integrity, rundir
from wsg.core.errors import WsgError
from wsg.sweep.cli import main

CELL = "cells/sft-s1-lr1e-04"


def _fake_run(run: str, rng) -> dict[str, bytes]:
    """A run with one cell (two step folders and its tables) and an eval
    stage, written with the markers the stages write; returns what it wrote."""
    rundir.write_text(rundir.join(run, "config.yaml"), "# wsg resolved config hash 0\n")
    wrote = {}
    for step in (2, 4):
        src = {"adapter_config.json": json.dumps({"r": 4}).encode(), "adapter_model.safetensors": rng.bytes(5000),
               "README.md": b"card"}
        tmp = os.path.join(os.environ["TMP_FAKE"], f"{rng.integers(1 << 40)}-step_{step}")
        os.makedirs(tmp)
        for n, b in src.items():
            open(os.path.join(tmp, n), "wb").write(b)
            wrote[f"{CELL}/step_{step}/{n}"] = b
        rundir.upload_dir(tmp, rundir.join(run, CELL, f"step_{step}"), vouch=["adapter_config.json",
                                                                                 "adapter_model.safetensors"], root=run)
    for n in ("metrics.parquet", "cell.json"):
        wrote[f"{CELL}/{n}"] = rng.bytes(300)
        rundir.write_bytes(rundir.join(run, CELL, n), wrote[f"{CELL}/{n}"])
    files = [rundir.join(run, CELL, n) for n in ("metrics.parquet", "cell.json")]
    files += [rundir.join(run, CELL, f"step_{s}", "adapter_model.safetensors") for s in (2, 4)]
    rundir.mark_complete(rundir.join(run, CELL), {"cell_id": "sft-s1-lr1e-04"}, files=files, root=run)
    wrote["eval/accuracy.parquet"] = rng.bytes(700)
    rundir.write_bytes(rundir.join(run, "eval", "accuracy.parquet"), wrote["eval/accuracy.parquet"])
    rundir.mark_complete(rundir.join(run, "stages", "eval"), {"summary": {}},
                         files=[rundir.join(run, "eval", "accuracy.parquet")], root=run)
    return wrote


@pytest.fixture(autouse=True)
def _tmp_fake(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    monkeypatch.setenv("TMP_FAKE", str(tmp_path / "src"))


def _verify(run, capsys) -> tuple[int, str]:
    code = main(["verify", run])
    return code, capsys.readouterr().out


def test_markers_list_run_relative_size_and_sha256(tmp_path):
    run = str(tmp_path / "run")
    wrote = _fake_run(run, np.random.default_rng(0))
    marker = json.loads((tmp_path / "run" / CELL / "_COMPLETE").read_text())
    assert marker["cell_id"] == "sft-s1-lr1e-04" and marker["vouches"]["at"] == CELL
    listed = {f["path"]: (f["size"], f["sha256"]) for f in marker["vouches"]["files"]}
    want = [f"{CELL}/metrics.parquet", f"{CELL}/cell.json", f"{CELL}/step_2/adapter_model.safetensors",
            f"{CELL}/step_4/adapter_model.safetensors"]
    assert sorted(listed) == sorted(want)
    for p in want:
        assert listed[p] == (len(wrote[p]), hashlib.sha256(wrote[p]).hexdigest())
    step = json.loads((tmp_path / "run" / CELL / "step_2" / "_COMPLETE").read_text())["vouches"]
    assert [f["path"] for f in step["files"]] == [f"{CELL}/step_2/adapter_config.json",
                                                   f"{CELL}/step_2/adapter_model.safetensors"]  # not the card
    assert integrity.info(str(tmp_path / "run" / CELL)) == {"cell_id": "sft-s1-lr1e-04"}


def test_verify_clean_run_exits_0_with_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    wrote = _fake_run(run, np.random.default_rng(1))
    code, out = _verify(run, capsys)
    assert code == 0 and len(out.strip().splitlines()) == 1 and "clean" in out
    vouched = [p for p in wrote if "README" not in p]  # each read once, though two markers list the weights
    assert f"(4 markers, {len(vouched)} files" in out, out


def test_verify_lists_every_problem_and_exits_1(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(str(run), np.random.default_rng(2))
    with open(run / CELL / "step_4" / "adapter_model.safetensors", "r+b") as f:
        f.truncate(1000)  # the damage
    data = bytearray((run / CELL / "metrics.parquet").read_bytes())
    data[10] ^= 0xFF  # same size, other content
    (run / CELL / "metrics.parquet").write_bytes(bytes(data))
    (run / "eval" / "accuracy.parquet").unlink()
    (run / CELL / "step_4" / "README.md").write_text("eval adds accuracy to the card: not an artifact")
    code, out = _verify(str(run), capsys)
    assert code == 1
    lines = out.strip().splitlines()
    assert any(f"{CELL}/step_4/adapter_model.safetensors: size 1000 bytes" in ln and f"{CELL}/_COMPLETE" in ln
               for ln in lines)
    assert any(f"{CELL}/step_4/adapter_model.safetensors: size 1000" in ln and f"{CELL}/step_4/_COMPLETE" in ln
               for ln in lines)
    assert any(f"{CELL}/metrics.parquet: content differs" in ln for ln in lines)
    assert any("eval/accuracy.parquet: missing (vouched for by stages/eval/_COMPLETE)" in ln for ln in lines)
    assert "4 problem(s)" in lines[0] and not any("README" in ln for ln in lines)


def test_revoke_voids_a_damaged_marker_with_one_line(tmp_path):
    run = str(tmp_path / "run")
    _fake_run(run, np.random.default_rng(3))
    said = []
    cell = rundir.join(run, CELL)
    assert integrity.revoke(cell, "cell x", run=run, say=said.append) is True and said == []
    os.unlink(os.path.join(cell, "step_2", "adapter_model.safetensors"))
    assert integrity.revoke(cell, "cell x", run=run, say=said.append) is False
    assert said == [f"wsg: cell x: {CELL}/step_2/adapter_model.safetensors is damaged (missing); running it again"]
    assert not rundir.is_complete(cell)  # so the cell runs again
    assert integrity.revoke(cell, "cell x", run=run, say=said.append) is False and len(said) == 1


def test_old_markers_without_a_file_list_are_trusted_by_presence(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(str(run), np.random.default_rng(4))
    (run / "stages" / "eval" / "_COMPLETE").write_text(json.dumps({"summary": {}}))  # as the old code wrote it
    (run / "eval" / "accuracy.parquet").unlink()
    assert integrity.revoke(str(run / "stages" / "eval"), "[eval]", say=print) is True
    code, out = _verify(str(run), capsys)
    assert code == 0 and "1 old marker(s) without a file list checked by presence" in out
    (run / "stages" / "eval" / "_COMPLETE").write_text('{"summary": ')  # truncated marker
    code, out = _verify(str(run), capsys)
    assert code == 1 and "stages/eval/_COMPLETE: unreadable marker" in out


def test_a_copied_run_verifies_and_holds_no_path_of_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_run(str(run), np.random.default_rng(5))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(run)
    assert _verify(str(copy), capsys)[0] == 0
    for dirpath, _, names in os.walk(copy):
        for n in names:
            assert str(run).encode() not in open(os.path.join(dirpath, n), "rb").read(), n


def test_verify_an_s3_run(tmp_path, s3_bucket, capsys):
    s3 = s3_bucket
    run = "s3://wsg/runs/a"
    wrote = _fake_run(run, np.random.default_rng(6))
    assert s3.read(f"{run}/{CELL}/step_2/adapter_model.safetensors") == wrote[f"{CELL}/step_2/adapter_model.safetensors"]
    code, out = _verify(run, capsys)
    assert code == 0 and "clean" in out
    rundir.write_bytes(f"{run}/{CELL}/step_2/adapter_model.safetensors", b"x" * 1000)
    code, out = _verify(run, capsys)
    assert code == 1 and f"{CELL}/step_2/adapter_model.safetensors: size 1000 bytes" in out


def test_a_failed_write_keeps_the_old_file_leaves_no_temp_and_says_what_to_do(tmp_path, monkeypatch):
    target = tmp_path / "run" / "eval" / "accuracy.parquet"
    rundir.write_bytes(str(target), b"old")
    monkeypatch.setenv("WSG_FAULT_FAIL_WRITE", "eval/accuracy.parquet")
    with pytest.raises(rundir.WriteError) as err:
        rundir.write_bytes(str(target), b"new" * 1000)
    assert isinstance(err.value, WsgError) and isinstance(err.value, OSError)
    assert str(target) in str(err.value) and "No space left" in str(err.value) and "rerun" in str(err.value)
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["accuracy.parquet"]


@pytest.mark.parametrize("fail", ["adapter_config.json", "adapter_model.safetensors", "README.md", "_COMPLETE"])
def test_an_adapter_folder_whose_write_fails_anywhere_stays_incomplete_then_resumes(tmp_path, monkeypatch, fail):
    rng = np.random.default_rng(7)
    src = tmp_path / "src" / "a"
    src.mkdir()
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": rng.bytes(4000), "README.md": b"card"}
    for n, b in files.items():
        (src / n).write_bytes(b)
    run = tmp_path / "run"
    dest = str(run / CELL / "step_2")
    monkeypatch.setenv("WSG_FAULT_FAIL_WRITE", f"step_2/{fail}")
    with pytest.raises(WsgError, match=fail):
        rundir.upload_dir(str(src), dest, root=str(run))
    assert not rundir.is_complete(dest)
    assert not [n for n in os.listdir(dest) if rundir.TMP_TAG in n]
    monkeypatch.delenv("WSG_FAULT_FAIL_WRITE")
    rundir.upload_dir(str(src), dest, root=str(run))  # the rerun
    assert integrity.check(dest, run=str(run)) == []
    assert {n: (run / CELL / "step_2" / n).read_bytes() for n in files} == files
