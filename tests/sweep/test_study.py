"""`wsg study` (sweep/study.py): the study section, one config per value, the
finished-run check, the combined claims table read back with pandas and
duckdb, and a study SIGKILLed mid-way and rerun (issue 24)."""
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from _kill import Wsg, tree_digest
from wsg.analysis.findings_run import claims_table
from wsg.core import rundir
from wsg.core.config import config_hash, dump_config
from wsg.core.errors import WsgError
from wsg.core.layout import STAGES, RunLayout
from wsg.sweep.config import load_config
from wsg.sweep.study import combine, combined_path, finished, load_study, run_folder

VALUES = [{"label": "scripted-0.15", "set": {"rollouts.backend": "scripted", "rollouts.scripted_error_rate": 0.15}},
          {"label": "scripted-0.80", "set": {"rollouts.backend": "scripted", "rollouts.scripted_error_rate": 0.8}},
          {"label": "self", "set": {"rollouts.backend": "vllm"}}]


def _study_yaml(tmp_path, values=VALUES, **extra):
    base = yaml.safe_load(open("configs/tiny.yaml"))
    base["study"] = {"factor": "teacher", "values": values, **extra}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(base))
    return str(p)


def test_each_value_is_the_base_config_with_its_keys_set(tmp_path):
    study, runs = load_study(_study_yaml(tmp_path))
    assert study.factor == "teacher" and [v.label for v, _ in runs] == ["scripted-0.15", "scripted-0.80", "self"]
    base = load_config("configs/tiny.yaml")
    cfgs = [c for _, c in runs]
    assert [c.rollouts.backend for c in cfgs] == ["scripted", "scripted", "vllm"]
    assert [c.rollouts.scripted_error_rate for c in cfgs[:2]] == [0.15, 0.8]
    # Everything else is the base's, so the runs differ in the factor only.
    assert all(c.train == base.train and c.grid == base.grid for c in cfgs)
    assert len({config_hash(c) for c in cfgs}) == 3
    # The scripted value at the base's own error rate is the base config, hash and all.
    _, same = load_study(_study_yaml(tmp_path, values=[{"label": "base", "set": {"rollouts.scripted_error_rate": 0.5}}]))
    assert config_hash(same[0][1]) == config_hash(base)


def test_bad_study_sections_name_the_field(tmp_path):
    with pytest.raises(WsgError, match="study.values"):
        load_study(_study_yaml(tmp_path, values=[{"label": "a b", "set": {}}]))
    with pytest.raises(WsgError, match="labels repeat"):
        load_study(_study_yaml(tmp_path, values=[{"label": "a"}, {"label": "a"}]))
    with pytest.raises(WsgError, match=r"(?s)study.values\[0\].*rollouts.nope: unknown key"):
        load_study(_study_yaml(tmp_path, values=[{"label": "a", "set": {"rollouts.nope": 1}}]))
    plain = tmp_path / "plain.yaml"
    plain.write_text(open("configs/tiny.yaml").read())
    with pytest.raises(WsgError, match="no `study:` section"):
        load_study(str(plain))


def _fake_run(study_dir, v, cfg, teacher, drop_geometry=False):
    """A run folder as `wsg run` leaves it: config, stage markers, report, and
    a claims table with the teacher in its metadata (claims from empty tables:
    every claim not_measured, as analysis.claims writes them)."""
    run = run_folder(study_dir, v.label)
    lay = RunLayout.of(run)
    rundir.makedirs(run)
    rundir.write_text(lay.config, dump_config(cfg))
    from wsg.analysis.claims import CLAIMS_SCHEMA

    rows = claims_table({}).to_pylist()
    # One measured claim per run (the rest not_measured, as from empty tables).
    rows[0].update(value=teacher["teacher_accuracy"], ci_low=teacher["teacher_accuracy"] - 0.05,
                   ci_high=teacher["teacher_accuracy"] + 0.05, noise_floor=0.5, verdict="unsettled")
    t = pa.Table.from_pylist(rows, schema=CLAIMS_SCHEMA).replace_schema_metadata(
        {b"wsg.teacher": json.dumps(teacher).encode()})
    rundir.write_table(lay.geometry_table("claims"), t)
    for s in STAGES[:-1]:
        if not (drop_geometry and s == "geometry"):
            rundir.mark_complete(lay.stage_marker_dir(s), {})
    rundir.write_text(lay.report_index, "<html></html>")
    return run


def test_combined_claims_table_read_back_with_pandas_and_duckdb(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    import pandas as pd

    study, runs = load_study(_study_yaml(tmp_path))
    sdir = str(tmp_path / "s")
    acc = {"scripted-0.15": 0.85, "scripted-0.80": 0.23, "self": 0.17}
    for v, cfg in runs[:2]:
        _fake_run(sdir, v, cfg, {"teacher": f"t-{v.label}", "teacher_kind": "scripted",
                                 "teacher_error_rate": v.set["rollouts.scripted_error_rate"],
                                 "teacher_accuracy": acc[v.label], "teacher_token_jaccard": 0.7})
    run3 = _fake_run(sdir, runs[2][0], runs[2][1], {"teacher_kind": "vllm", "teacher_accuracy": 0.17},
                     drop_geometry=True)
    assert finished(run_folder(sdir, "scripted-0.15")) and not finished(run3)
    table = combine(sdir, study, runs)
    n = claims_table({}).num_rows
    assert table.num_rows == 3 * n  # the third run has a claims table too (only its marker is missing)

    df = pd.read_parquet(combined_path(sdir))
    assert len(df) == 3 * n and set(df["run"]) == set(acc)
    assert set(df["factor"]) == {"teacher"}
    hashes = {v.label: config_hash(c) for v, c in runs}
    assert (df["config_hash"] == df["run"].map(hashes)).all()
    assert df.groupby("run")["teacher_accuracy"].first().to_dict() == pytest.approx(acc)
    assert df.loc[df["run"] == "self", "teacher_error_rate"].isna().all()
    assert json.loads(df.loc[df["run"] == "scripted-0.80", "factor_value"].iloc[0]) == VALUES[1]["set"]

    path = combined_path(sdir)
    got = duckdb.sql(f"SELECT run, count(*) AS claims, count(DISTINCT claim) AS distinct_claims, "
                     f"min(teacher_error_rate) AS er FROM read_parquet('{path}') GROUP BY run ORDER BY run").fetchall()
    assert got == [("scripted-0.15", n, n, 0.15), ("scripted-0.80", n, n, 0.8), ("self", n, n, None)]
    # claim x run: one verdict per cell of the pivot.
    wide = duckdb.sql(f"PIVOT read_parquet('{path}') ON run USING first(verdict) GROUP BY claim").df()
    assert len(wide) == n and set(wide.columns) == {"claim", *acc}
    assert (wide[wide["claim"] != "sft_rft_rift.cosine"][list(acc)] == "not_measured").all().all()
    vals = duckdb.sql(f"SELECT run, value FROM read_parquet('{path}') WHERE claim = 'sft_rft_rift.cosine' "
                      "ORDER BY teacher_accuracy").fetchall()
    assert vals == [("self", 0.17), ("scripted-0.80", 0.23), ("scripted-0.15", 0.85)]
    from wsg.sweep.study import figure_path

    with open(figure_path(sdir), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = pa.parquet.read_schema(path).metadata[b"wsg.study"]
    assert json.loads(meta)["factor"] == "teacher"
    # The study's page opens with each run's verdicts and where they change along the factor.
    from wsg.core.layout import StudyLayout

    page = rundir.read_text(StudyLayout.of(sdir).page)
    assert "<h2>Which claims hold for which teacher</h2>" in page
    assert "<b>scripted-0.15</b> (t-scripted-0.15, right 85% of the time" in page
    assert "No verdict changes along the factor." in page  # every run: the same verdict for each claim
    assert '<img src="claims.png"' in page

    # wsg.open_study reads the same folder back: the combined table, each run, the figure.
    import wsg

    st = wsg.open_study(sdir)
    pd.testing.assert_frame_equal(st.claims, df)
    assert st.factor == "teacher" and st.labels == [v.label for v, _ in runs]
    assert st.figure == figure_path(sdir) and st.forest.endswith("claims_forest.png")
    for label, run in st.runs.items():
        own = pd.read_parquet(RunLayout.of(run_folder(sdir, label)).geometry_table("claims"))
        pd.testing.assert_frame_equal(run.claims, own)


def test_combine_without_any_claims_writes_nothing(tmp_path):
    study, runs = load_study(_study_yaml(tmp_path))
    assert combine(str(tmp_path / "empty"), study, runs) is None
    assert not rundir.exists(combined_path(str(tmp_path / "empty")))


def test_cli_study_refuses_a_config_without_a_study_section(tmp_path, capsys):
    from wsg.sweep.cli import main

    assert "study" in __import__("wsg.sweep.cli", fromlist=["build_parser"]).build_parser().format_help()
    plain = tmp_path / "plain.yaml"
    plain.write_text(open("configs/tiny.yaml").read())
    assert main(["study", str(plain), "--study", str(tmp_path / "s")]) == 2
    assert "no `study:` section" in capsys.readouterr().err


def test_open_study_on_an_object_store(tmp_path, s3_bucket):
    """The same study made and read on an S3 API server (moto, on loopback):
    `wsg.open_study("s3://…")` gives the combined table, the runs and the figures."""
    import pandas as pd

    import wsg

    s3 = s3_bucket
    sdir = "s3://wsg/studies/teacher"
    study, runs = load_study(_study_yaml(tmp_path))
    for k, (v, cfg) in enumerate(runs):
        _fake_run(sdir, v, cfg, {"teacher_kind": "scripted", "teacher_accuracy": 0.2 + 0.3 * k})
    table = combine(sdir, study, runs)
    st = wsg.open_study(sdir)
    assert st.path == sdir and st.factor == "teacher" and st.labels == [v.label for v, _ in runs]
    pd.testing.assert_frame_equal(st.claims, table.to_pandas())
    assert st.figure == f"{sdir}/claims.png" and st.forest == f"{sdir}/claims_forest.png"
    assert s3.read(f"{sdir}/claims_forest.png")[:8] == b"\x89PNG\r\n\x1a\n"
    for label, run in st.runs.items():
        assert run.path == f"{sdir}/{label}"
        assert (run.claims["claim"] == st.claims.loc[st.claims["run"] == label, "claim"].values).all()



def _study_files(study: Path, labels) -> dict[str, bytes]:
    """What a study leaves to compare: <study>/claims.parquet and its two
    figures, and per run its config, its adapters (weights and config) and
    its claims table."""
    out = {n: (study / n).read_bytes() for n in ("claims.parquet", "claims.png", "claims_forest.png")}
    for label in labels:
        run = study / label
        for p in [run / "config.yaml", *run.glob("cells/*/step_*/adapter_*"), run / "geometry" / "claims.parquet"]:
            out[str(p.relative_to(study))] = p.read_bytes()
    return out


@pytest.mark.slow
def test_a_killed_study_skips_its_finished_run_and_ends_with_the_same_tables(tmp_path):
    """Two scripted teachers on tiny with two offline losses (sft, dpo: every
    stage runs, and the claims compare two losses). `wsg study` is SIGKILLed
    whole (tests/_kill.py: its process, tree and session, by pid) at a seeded
    random moment of its second run's grid, after its first run finished,
    and rerun: the rerun says the first run is complete and skips it (its
    folder keeps every file's mtime and bytes), and the study ends with the
    claims.parquet (and figures) of an uninterrupted study, and each run's
    adapters and claims table, byte for byte.

    The uninterrupted study is made, to save CI time (one run, ~1 min, of
    ~4 min), from the first run itself (never interrupted: it finished
    before the kill and was not written again) and an uninterrupted `wsg run`
    of the second value's config (a study run's config and hash are those
    `wsg run` gives it), combined by `combine`, the study's own last step."""
    import shutil

    from wsg.core.config import dump_config

    cpath = Path(_study_yaml(tmp_path, values=VALUES[:2]))
    cfg = yaml.safe_load(cpath.read_text())
    cfg["grid"]["losses"] = ["sft", "dpo"]
    cpath.write_text(yaml.safe_dump(cfg))
    study_cfg, runs = load_study(str(cpath))
    labels = [v.label for v, _ in runs]
    (tmp_path / "second.yaml").write_text(dump_config(runs[1][1]))

    ref = Wsg("run", "second.yaml", "--run", f"ref/{labels[1]}", cwd=tmp_path, log=tmp_path / "ref.log")
    assert ref.wait(timeout=1200) == 0, ref.text[-3000:]
    grid_s = ref.at(ref.find(r"^wsg: \[grid\] done in")) - ref.at(ref.find(r"^wsg: \[grid\] starting"))

    # within the first 40% of the reference grid: a grid that runs faster the second time still
    # holds the kill (the test asserts the kill came before the grid ended)
    delay = random.Random(24).uniform(0.05, 0.4) * grid_s
    w = Wsg("study", str(cpath), "--study", "s", cwd=tmp_path, log=tmp_path / "killed.log")
    try:
        i = w.wait_for(r"^wsg study: \[2/2\]", timeout=900)
        w.wait_for(r"^wsg: \[grid\] starting", timeout=600, start=i)
        time.sleep(delay)
        assert w.proc.poll() is None, f"wsg study ended before the kill:\n{w.text[-3000:]}"
    finally:
        w.kill()
    left = w.leftovers()
    w.end_leftovers()
    assert not left, f"processes of the killed study still run: {[p.pid for p in left]}"
    study = tmp_path / "s"
    assert finished(str(study / labels[0])) and not finished(str(study / labels[1]))
    assert not rundir.is_complete(str(study / labels[1] / "stages" / "grid")), "the kill came after the grid"
    assert not (study / "claims.parquet").exists()
    before = tree_digest(str(study / labels[0]))

    again = Wsg("study", str(cpath), "--study", "s", cwd=tmp_path, log=tmp_path / "rerun.log")
    assert again.wait(timeout=1200) == 0, again.text[-3000:]
    assert again.find(rf"^wsg study: \[1/2\] teacher = {labels[0]}: complete, skipped$") is not None, again.text
    assert again.find(rf"^wsg study: \[2/2\] teacher = {labels[1]} -> ") is not None, again.text
    assert tree_digest(str(study / labels[0])) == before, "the finished run was written again"

    shutil.copytree(study / labels[0], tmp_path / "ref" / labels[0])
    assert combine(str(tmp_path / "ref"), study_cfg, runs) is not None
    want, got = _study_files(tmp_path / "ref", labels), _study_files(study, labels)
    assert sorted(got) == sorted(want) and sum(k.endswith(".safetensors") for k in want) == 2 * 2 * 2
    assert [k for k in want if got[k] != want[k]] == []
