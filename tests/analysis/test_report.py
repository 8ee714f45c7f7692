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
from test_functional import CELLS, make_tiny_run
from wsg.core import rundir
from wsg.core.config import config_hash
from wsg.core.layout import RunLayout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_random_eval(cfg, run, names, *, seed=0):
    from wsg.analysis.stats import PREDICTIONS_SCHEMA, accuracy_table, mcnemar_table

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
    from wsg.analysis.adapters import adapter_refs, discover_adapters, list_adapters
    from wsg.analysis.functional import run_functional
    from wsg.analysis.geometry import run_geometry

    root = tmp_path_factory.mktemp("report")
    # A second LR for sft s42, so the seed/LR panels have both kinds of pairs.
    cfg, run = make_tiny_run(root, cells=CELLS + (("sft", 42, 1e-3),))
    adapters = discover_adapters(cfg, run)
    run_geometry(adapters, RunLayout.of(run).geometry_dir, top_k=3, config_hash=config_hash(cfg),
                 use_ray=False, progress=False, cells=adapter_refs(list_adapters(cfg, run)))
    run_functional(cfg, run, progress=False, use_ray=False)
    write_random_eval(cfg, run, sorted(adapters))
    from wsg.analysis.findings_run import run_findings

    run_findings(cfg, run)
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
    from wsg.analysis.report import build_report

    cfg, run, adapters = full_run
    index = build_report(run)
    assert index == os.path.join(run, "report", "index.html")
    page = open(index, encoding="utf-8").read()
    assert config_hash(cfg) in page and f">{os.path.basename(run)}<" in page
    assert run not in page  # the page travels with a copied run: no path of this machine
    assert "missing because" not in page and "All tables present" in page
    imgs = _images(page)
    assert {os.path.basename(i) for i in imgs} == {
        "accuracy.png", "global_cosine.png", "layer_cosine.png", "principal_angles.png", "seed_lr.png",
        "lmc.png", "cka.png", "convergence.png", "claims_forest.png"}
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

    # The page opens with the claims: the first section, one row per claim of claims.parquet, each
    # verdict coloured, the convergence sentence above the table.
    claims = rundir.read_table(rundir.join(run, "geometry", "claims.parquet")).to_pylist()
    first = page.index("<h2")
    assert page[first:].startswith('<h2 id="s0">Claims of the seed paper</h2>') and first < page.index("<h2>Run</h2>")
    for r in claims:
        assert f'<td class="v-{r["verdict"]}">' in page and f'<td class="s">{r["claim"]}</td>' in page
    assert page.count('<td class="v-') == len(claims) >= 19
    conv = rundir.read_table(rundir.join(run, "geometry", "convergence.parquet")).to_pylist()
    bad = {r["cell"] for r in conv if not r["converged"]}
    claim_cells = {n.split("@")[0] for r in claims for n in r["cells"]}
    if bad & claim_cells:
        assert f"{len(bad & claim_cells)} of {len(claim_cells)} cells used by the claims have not converged" in page
    else:
        assert f"All {len(claim_cells)} cells used by the claims converged" in page
    # Cross-loss pairs name the floor they lack: this grid has no data-seed control of sft (dpo's pair
    # also needs the LR control, which sft lr1e-03 vs lr1e-04 provides, so only the data seed is named).
    assert page.count("no sft control at another data seed (grid.controls)") == 4  # rft, dpo x 2 steps
    assert "same loss, not a one-factor control" in page  # sft s42 vs s7: both seeds differ
    # The noise floors section lists that LR control at both steps; the convergence section one row per cell.
    floors = rundir.read_table(rundir.join(run, "geometry", "noise_floors.parquet")).to_pylist()
    assert [(r["control"], r["adapter_a"], r["adapter_b"]) for r in floors] == [
        ("lr", f"sft-s42-lr1e-03@{s}", f"sft-s42-lr1e-04@{s}") for s in (1, 2)]
    assert page.count('<td class="s">lr</td>') == 2 and "Noise floors</h2>" in page
    assert "Convergence</h2>" in page and page.count('<td class="s">not converged: cos(step 1, step 2)') + page.count(
        '<td class="s">converged: cos(step 1, step 2)') == len({r["cell"] for r in conv})

    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium): page not opened in a browser")
    loaded, total = open_in_chromium(index, tmp_path)
    assert total == len(imgs) and loaded == total


def test_partial_and_empty_report(full_run, tmp_path):
    from wsg.analysis.report import TABLES as REPORT_TABLES, build_report, where

    cfg, src, _ = full_run
    run = str(tmp_path / "run")
    os.makedirs(os.path.join(run, "geometry"))
    shutil.copy(RunLayout.of(src).config, RunLayout.of(run).config)
    # Geometry only: the eval and functional sections say what is missing.
    for t in ("global_pairs", "adapter_modules"):
        shutil.copy(os.path.join(src, "geometry", f"{t}.parquet"), os.path.join(run, "geometry"))
    page = open(build_report(run), encoding="utf-8").read()
    for key in ("accuracy", "mcnemar", "layer_pairs", "module_pairs", "lmc", "cka", "logit_lens", "claims",
                "convergence", "noise_floors"):
        assert f"<code>{where(key)}</code> is absent" in page
    # An old run (no findings tables): the claims section still opens the page and names what writes it.
    assert page[page.index("<h2"):].startswith('<h2 id="s0">Claims of the seed paper</h2>')
    assert "the findings step of the geometry stage" in page and "No floors:" in page
    assert {os.path.basename(i) for i in _images(page)} == {"global_cosine.png", "seed_lr.png"}
    for rel in _images(page):
        assert os.path.getsize(os.path.join(run, "report", rel)) > 1000

    # No tables and no config at all: still a page, every section marked missing.
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    page = open(build_report(bare), encoding="utf-8").read()
    assert "unknown (no config.yaml)" in page and not _images(page)
    # Every section but seed/LR (shown only when seeds or LRs vary) names its one table.
    assert page.count("is absent") == len(REPORT_TABLES)
    if CHROMIUM is not None:
        assert open_in_chromium(os.path.join(bare, "report", "index.html"), tmp_path) == (0, 0)


def test_missing_run_dir(tmp_path):
    from wsg.analysis.report import build_report
    from wsg.core.errors import WsgError

    with pytest.raises(WsgError, match="does not exist"):
        build_report(str(tmp_path / "nope"))


def test_floor_next_to_cross_loss_pair():
    """The floor shown next to a cross-loss pair: the reference loss's data-seed
    control at the same step and LR, plus its LR control when the pair's LRs
    differ; per metric the most conservative value. Hand-made rows."""
    from wsg.analysis.findings import identify
    from wsg.analysis.report import _ci, _fmt
    from wsg.analysis.report_findings import global_rows, matching_floor

    def floor(a, b, control, cos, orth, top1, u1, step=12):
        return {"loss": "sft", "control": control, "step": step, "adapter_a": a, "adapter_b": b, "cosine": cos,
                "orth_frac_b_off_a": orth, "orth_frac_a_off_b": orth - 0.1, "median_top1_angle_deg": top1,
                "mean_u1_abs_dot": u1}

    floors = [floor("sft-i42-d7-lr1e-04@12", "sft-s42-lr1e-04@12", "data_seed", 0.9, 0.4, 20.0, 0.95),
              floor("sft-s42-lr1e-03@12", "sft-s42-lr1e-04@12", "lr", 0.55, 0.8, 30.0, 0.9),
              floor("sft-i42-d7-lr1e-03@12", "sft-s42-lr1e-03@12", "data_seed", 0.1, 0.99, 80.0, 0.1),  # other LR
              floor("sft-i42-d7-lr1e-04@6", "sft-s42-lr1e-04@6", "data_seed", 0.2, 0.9, 70.0, 0.2, step=6)]
    sft, dpo, rft = (identify(n) for n in ("sft-s42-lr1e-04@12", "dpo-s42-lr1e-05@12", "rft-s42-lr1e-04@12"))
    f = matching_floor(floors, sft, dpo, "sft")  # LRs differ: data-seed and LR controls
    assert f == {"kinds": "data_seed, lr", "cosine": 0.55, "orth": 0.8, "top1": 30.0, "u1": 0.9}
    f = matching_floor(floors, rft, sft, "sft")  # same LR: the data-seed control alone
    assert (f["cosine"], f["orth"], f["top1"], f["u1"]) == (0.9, 0.4, 20.0, 0.95)
    assert "missing" in matching_floor(floors[1:2], rft, sft, "sft")
    row = {"adapter_a": "dpo-s42-lr1e-05@12", "adapter_b": "sft-s42-lr1e-04@12", "cosine": 0.06,
           "cosine_ci_low": 0.02, "cosine_ci_high": 0.1, "orth_frac_b_off_a": 0.99, "orth_frac_a_off_b": 0.99,
           "median_top1_angle_deg": 55.0, "mean_u1_abs_dot": 0.11, "mean_v1_abs_dot": 0.7}
    out, cols, _ = global_rows([row], floors, "sft", _fmt, _ci)
    assert out[0]["cosine [CI]"] == "0.06 [0.02, 0.1]" and out[0]["floor cosine"] == "0.55"
    assert out[0]["floor from"] == "sft data_seed, lr control(s), same step" and "floor orth" in cols

