"""The claims forest plot (analysis/figures_forest.py) and its place on the report's first screen.

What is drawn is read back from the figure's artists (each carries a gid
`<claim>:value|ci|band|floor`) and compared with the claims table's numbers:
the real tiny run's table (test_report's fixture) and a random one that has
every kind of test, noise floors and an unknown measure.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
from test_report import full_run  # noqa: F401  (the module-scoped run fixture)
from wsg.analysis import claims as C
from wsg.core import rundir


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def check_drawn(fig, rows: list[dict]) -> None:
    """Every claim row is one y tick of one axis, with its value, CI, band and floor drawn as the table says."""
    drawn = {}
    for ax in fig.axes:
        xlo, xhi = ax.get_xlim()
        for tick in ax.get_yticklabels():
            assert tick.get_text() not in drawn, f"{tick.get_text()} drawn twice"
            drawn[tick.get_text()] = (ax, tick.get_position()[1])
        arts = {a.get_gid(): a for a in [*ax.lines, *ax.patches] if a.get_gid()}
        for r in (r for r in rows if r["claim"] in {t.get_text() for t in ax.get_yticklabels()}):
            c, (_, y) = r["claim"], drawn[r["claim"]]
            t = C.Test.parse(r["test"])
            b = arts[f"{c}:band"]
            assert b.get_x() == pytest.approx(max(t.lo, xlo)) and b.get_x() + b.get_width() == pytest.approx(
                min(t.hi, xhi))
            assert b.get_y() < y < b.get_y() + b.get_height()
            if _nan(r["value"]):
                assert f"{c}:value" not in arts and f"{c}:ci" not in arts
            else:
                assert list(arts[f"{c}:value"].get_xdata()) == [r["value"]]
                assert list(arts[f"{c}:value"].get_ydata()) == [y]
                if _nan(r["ci_low"]):
                    assert f"{c}:ci" not in arts
                else:
                    assert list(arts[f"{c}:ci"].get_xdata()) == [r["ci_low"], r["ci_high"]]
            if _nan(r["noise_floor"]):
                assert f"{c}:floor" not in arts
            else:
                assert list(arts[f"{c}:floor"].get_xdata()) == [r["noise_floor"]]
            for x in (r["value"], r["ci_low"], r["ci_high"], r["noise_floor"]):
                assert _nan(x) or xlo <= x <= xhi, (c, x, (xlo, xhi))
    assert set(drawn) == {r["claim"] for r in rows}


def test_parse_is_the_inverse_of_text():
    for t in (C.above(0.97), C.below(10.0), C.band(-0.21, 0.21), C.band(1.5, 6.0), C.above(0.0)):
        assert C.Test.parse(t.text()) == t
    with pytest.raises(ValueError, match="not a claim test"):
        C.Test.parse("about 3")


def test_random_claims_every_test_kind_with_floors():
    import matplotlib.pyplot as plt
    from wsg.analysis.figures_forest import forest_figure, group_claims

    rng = np.random.default_rng(7)
    ids = ["a.cosine", "b.cosine", "c.u1", "d.v1", "e.orth_global", "f.norm_ratio", "g.norm_ratio",
           "accuracy.dpo_best[set1]", "accuracy.dpo_best[set2]", "h.new_measure", "i.new_measure"]
    rows = []
    for k, claim in enumerate(ids):
        ratio = "norm_ratio" in claim
        v = float(rng.uniform(1.2, 12) if ratio else rng.uniform(-0.5, 0.9))
        w = float(rng.uniform(0.01, 0.2)) * (v if ratio else 1)
        test = [C.above(0.3), C.below(0.5), C.band(-0.1, 0.4)][k % 3] if not ratio else C.band(1.5, 6.0)
        missing = k == 4
        rows.append({"claim": claim, "test": test.text(), "value": math.nan if missing else v,
                     "ci_low": math.nan if missing or k == 2 else v - w, "ci_high": math.nan if missing or k == 2
                     else v + w, "noise_floor": math.nan if k % 4 == 3 else float(rng.uniform(0.1, 2 if ratio else .6)),
                     "verdict": "not_measured" if missing else ["holds", "fails", "inconclusive"][k % 3]})
    groups = group_claims(rows)
    # One axis per measure (u1 and v1 share one), table order kept, the unknown measure on its own axis.
    assert [[r["claim"] for r in g[-1]] for g in groups] == [
        ["a.cosine", "b.cosine"], ["c.u1", "d.v1"], ["e.orth_global"], ["f.norm_ratio", "g.norm_ratio"],
        ["accuracy.dpo_best[set1]", "accuracy.dpo_best[set2]"], ["h.new_measure", "i.new_measure"]]
    assert groups[3][1] is True and groups[-1][0] == "new_measure"
    fig = forest_figure(rows)
    assert len(fig.axes) == len(groups) and fig.axes[3].get_xscale() == "log"
    check_drawn(fig, rows)
    plt.close(fig)


def test_study_forest_draws_each_claim_once_per_run(tmp_path):
    """A study's forest plot: the combined table's rows, each claim once per
    run (`claim[run]`, runs in the study's order) on the claim's own axis,
    drawn as the table says; unsettled claims get their own colour."""
    import matplotlib.pyplot as plt
    from wsg.analysis.figures_forest import VERDICT_COLOURS, forest_figure
    from wsg.analysis.study_figures import study_forest, study_rows

    rng = np.random.default_rng(3)
    runs = ["scripted-0.15", "scripted-0.80", "self"]
    rows = []
    for run in reversed(runs):  # the table's order is not the study's
        for k, claim in enumerate(["sft_rft_rift.cosine", "dpo.cosine", "accuracy.dpo_best[gsm8k]"]):
            v = float(rng.uniform(-0.2, 0.9))
            rows.append({"claim": claim, "run": run, "test": C.above(0.5).text(), "value": v, "ci_low": v - 0.05,
                         "ci_high": v + 0.05, "noise_floor": float(rng.uniform(0, 0.5)),
                         "verdict": ["unsettled", "holds", "fails"][k]})
    got = study_rows(rows, runs)
    assert [r["claim"] for r in got[:3]] == [f"sft_rft_rift.cosine[{r}]" for r in runs]
    assert len(got) == 9 and got[-1]["claim"] == "accuracy.dpo_best[gsm8k][self]"
    fig = forest_figure(got)
    check_drawn(fig, got)
    unsettled = fig.axes[0].lines
    assert any(a.get_gid() == f"sft_rft_rift.cosine[{runs[0]}]:value" and a.get_color() == VERDICT_COLOURS["unsettled"]
               for a in unsettled)
    plt.close(fig)
    path = study_forest(rows, runs, str(tmp_path / "f.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_forest_on_the_reports_first_screen(full_run):  # noqa: F811
    import matplotlib.pyplot as plt
    from wsg.analysis.figures_forest import forest_figure
    from wsg.analysis.report import build_report

    _, run, _ = full_run
    page = open(build_report(run), encoding="utf-8").read()
    png = os.path.join(run, "report", "figures", "claims_forest.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The page's first image, in the claims section, above the claims table and the Run section.
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert imgs[0] == "figures/claims_forest.png"
    at = page.index('<img src="figures/claims_forest.png"')
    assert page.index('<h2 id="s0">Claims of the seed paper</h2>') < at < page.index('<td class="v-') < page.index(
        "<h2>Run</h2>")
    rows = rundir.read_table(rundir.join(run, "geometry", "claims.parquet")).to_pylist()
    fig = forest_figure(rows)
    check_drawn(fig, rows)
    assert sum(1 for r in rows if not _nan(r["value"])) >= 5  # the check above saw drawn values
    plt.close(fig)
