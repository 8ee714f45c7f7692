"""The HTML report on a tiny real run, with all tables and with few/none.

Geometry and functional tables are computed by their stages on real tiny-qwen3
adapters (test_functional.make_tiny_run); the eval tables by analysis.stats
from a predictions table whose per-item outcomes are drawn at random here (the
real eval path, with vLLM, is covered by test_evaluate.py). The page is opened
in headless Chromium, which must load every image.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pytest
from safetensors.torch import load_file

from sweep import rundir
from sweep.config import config_hash
from test_functional import CELLS, make_tiny_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_random_eval(cfg, run, names, *, seed=0):
    from analysis.stats import PREDICTIONS_SCHEMA, accuracy_table, mcnemar_table

    rng = np.random.default_rng(seed)
    n = cfg.analysis.eval_sets[0].n_prompts
    rows = []
    for k, name in enumerate(["base"] + names):
        p = 0.2 + 0.6 * k / (len(names) + 1)
        for i in range(n):
            rows.append({"model": name, "step": int(name.rsplit("@", 1)[1]) if "@" in name else -1,
                         "dataset": "synthetic", "item_id": f"q{i}", "prompt": f"p{i}", "gold": str(i),
                         "completion": "", "extracted": None, "correct": bool(rng.random() < p)})
    preds = pa.Table.from_pylist(rows, schema=PREDICTIONS_SCHEMA)
    rundir.write_table(rundir.join(run, "eval", "accuracy.parquet"), accuracy_table(preds))
    rundir.write_table(rundir.join(run, "eval", "mcnemar.parquet"), mcnemar_table(preds))
    return preds


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from analysis.adapters import discover_adapters
    from analysis.functional import run_functional
    from analysis.geometry import run_geometry

    root = tmp_path_factory.mktemp("report")
    # A second LR for sft s42, so the seed/LR panels have both kinds of pairs.
    cfg, run = make_tiny_run(root, cells=CELLS + (("sft", 42, 1e-3),))
    adapters = discover_adapters(cfg, run)
    run_geometry(adapters, rundir.geometry_dir(run), top_k=3, config_hash=config_hash(cfg),
                 use_ray=False, progress=False)
    run_functional(cfg, run, progress=False, use_ray=False)
    write_random_eval(cfg, run, sorted(adapters))
    return cfg, run, adapters


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def open_in_chromium(index: str, tmp) -> tuple[int, int]:
    """(#images loaded with naturalWidth > 0, #images) as Chromium sees the page.

    A copy of the page with a checking script is put next to it (same folder,
    so relative image paths resolve alike); the report itself has no script."""
    page = open(index, encoding="utf-8").read()
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.setAttribute('data-imgs',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length);"
             "});</script></body>")
    check = os.path.join(os.path.dirname(index), "_check.html")
    with open(check, "w", encoding="utf-8") as f:
        f.write(page.replace("</body>", probe))
    try:
        out = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}/chromium-profile", "--virtual-time-budget=5000", "--dump-dom",
             "file://" + check],
            capture_output=True, text=True, timeout=120)
    finally:
        os.remove(check)
    m = re.search(r'data-imgs="(\d+)/(\d+)"', out.stdout)
    assert m, f"chromium did not run the page's load handler: rc={out.returncode} {out.stderr[-500:]}"
    return int(m[1]), int(m[2])


def test_full_report(full_run, tmp_path):
    from analysis.report import build_report

    cfg, run, adapters = full_run
    index = build_report(run)
    assert index == os.path.join(run, "report", "index.html")
    page = open(index, encoding="utf-8").read()
    assert config_hash(cfg) in page and run in page
    assert "missing because" not in page and "All tables present" in page
    imgs = _images(page)
    assert {os.path.basename(i) for i in imgs} == {
        "accuracy.png", "global_cosine.png", "layer_cosine.png", "principal_angles.png", "seed_lr.png",
        "lmc.png", "cka.png"}
    for rel in imgs:
        assert not rel.startswith(("/", "http")), "images must be relative for an offline page"
        with open(os.path.join(run, "report", rel), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "http://" not in page and "https://" not in page

    # The norm table against dense ΔW = s·B·A summed over modules, from the files.
    name = "dpo-s42-lr1e-05@2"
    sd = load_file(os.path.join(adapters[name], "adapter_model.safetensors"))
    sq = sum(float(((8 / 4) * sd[k.replace("lora_A", "lora_B")] @ sd[k]).pow(2).sum())
             for k in sd if "lora_A" in k)
    row = re.search(rf'<tr><td class="s">{re.escape(name)}</td><td>8</td><td>([0-9.e+-]+)</td>', page)
    assert row and float(row[1]) == pytest.approx(math.sqrt(sq), rel=1e-3)

    # Dataset cells: one per McNemar pair of the 12 models (base + 11 adapters), one per accuracy row.
    assert len(adapters) == 11 and page.count(">synthetic</td>") == 66 + 12

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): page not opened in a browser")
    loaded, total = open_in_chromium(index, tmp_path)
    assert total == len(imgs) and loaded == total


def test_partial_and_empty_report(full_run, tmp_path):
    from analysis.report import TABLES, build_report

    cfg, src, _ = full_run
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "geometry"))
    shutil.copy(rundir.config_path(src), rundir.config_path(run))
    # Geometry only: the eval and functional sections say what is missing.
    for t in ("global_pairs", "adapter_modules"):
        shutil.copy(os.path.join(src, "geometry", f"{t}.parquet"), os.path.join(run, "geometry"))
    page = open(build_report(run), encoding="utf-8").read()
    for key in ("accuracy", "mcnemar", "layer_pairs", "module_pairs", "lmc", "cka", "logit_lens"):
        assert f"<code>{TABLES[key][0]}</code> is absent" in page
    assert {os.path.basename(i) for i in _images(page)} == {"global_cosine.png", "seed_lr.png"}
    for rel in _images(page):
        assert os.path.getsize(os.path.join(run, "report", rel)) > 1000

    # No tables and no config at all: still a page, every section marked missing.
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    page = open(build_report(bare), encoding="utf-8").read()
    assert "unknown (no config.yaml)" in page and not _images(page)
    # Every section but seed/LR (shown only when seeds or LRs vary) names its one table.
    assert page.count("is absent") == len(TABLES)
    if CHROMIUM is not None:
        assert open_in_chromium(os.path.join(bare, "report", "index.html"), tmp_path) == (0, 0)


def test_missing_run_dir(tmp_path):
    from analysis.report import build_report
    from sweep.errors import WsgError

    with pytest.raises(WsgError, match="does not exist"):
        build_report(str(tmp_path / "nope"))
