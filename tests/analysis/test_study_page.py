"""The study page (analysis/study_page.py): its opening sentences worked by
hand on a three-run table, and the page as `wsg study` writes it."""
from __future__ import annotations

from wsg.analysis.study_page import render, run_summary, verdict_changes

LABELS = ["scripted-0.15", "scripted-0.80", "self"]


def _rows():
    v = {"a.cosine": ("holds", "fails", "unsettled"), "b.u1": ("holds", "holds", "unsettled"),
         "c.norm": ("fails", "fails", "fails"), "d.acc": ("inconclusive", "holds", "inconclusive")}
    acc = {"scripted-0.15": 0.85, "scripted-0.80": 0.23, "self": 0.17}
    return [{"run": lab, "claim": c, "verdict": vs[i], "value": 0.5 + i / 10, "ci_low": 0.4, "ci_high": 0.6 + i,
             "settled": vs[i] != "unsettled", "teacher": f"t-{lab}", "teacher_accuracy": acc[lab],
             "teacher_token_jaccard": 0.7 if lab != "self" else 0.13, "paper_value": "p", "note": "n",
             "config_hash": f"h{i}", "order_agreement": 0.9, "horizon_agreement": 0.99}
            for c, vs in v.items() for i, lab in enumerate(LABELS)]


def test_where_a_verdict_changes_one_sentence_per_claim_runs_in_a_row_together():
    said = verdict_changes(_rows(), LABELS, "teacher")
    assert said == [
        "a.cosine: holds for teacher scripted-0.15, fails for teacher scripted-0.80, unsettled for teacher self.",
        "b.u1: holds for teacher scripted-0.15 and scripted-0.80, unsettled for teacher self.",
        # c.norm fails everywhere: no sentence; d.acc comes back to inconclusive: said twice
        "d.acc: inconclusive for teacher scripted-0.15, holds for teacher scripted-0.80, "
        "inconclusive for teacher self.",
    ]
    assert run_summary(_rows(), "scripted-0.80") == "2 holds, 2 fails; 4 of 4 settled"
    assert run_summary(_rows(), "self") == "1 fails, 1 inconclusive, 2 unsettled; 2 of 4 settled"


def test_the_page_opens_with_the_runs_then_the_changes():
    page = render(_rows(), LABELS, "teacher", [("claims.png", "against the teacher")])
    opening = page[page.index("<h2>Which claims hold"):page.index("<h2>Claims by run")]
    assert "<b>scripted-0.15</b> (t-scripted-0.15, right 85% of the time, token overlap within a prompt 0.70)" \
        in opening
    assert "No claim holds for every teacher." in opening
    assert "b.u1: holds for teacher scripted-0.15 and scripted-0.80, unsettled for teacher self." in opening
    assert page.count('class="v-fails"') == 4 and page.count('class="v-unsettled"') == 2
    assert '<a href="self/report/index.html">self</a>' in page and '<img src="claims.png"' in page
    # one claim holding in every run is said so
    rows = [r for r in _rows() if r["claim"] != "a.cosine"]
    for r in rows:
        r["verdict"] = "holds" if r["claim"] == "b.u1" else r["verdict"]
    assert "Hold for every teacher: b.u1." in render(rows, LABELS, "teacher", [])
