"""A study's page, `<study>/index.html` (sweep/study.py): it opens with which
claims hold for which value of the factor and, a sentence per claim, where a
verdict changes along it; then the claim x run table, the runs (teacher
profile, same-loss agreement, config hash, link to each run's report) and the
two figures. Built from the combined claims table alone."""
from __future__ import annotations

import html
from collections import Counter, defaultdict

from .figures_forest import _num
from .report import PAGE_CSS

VERDICTS = ("holds", "fails", "inconclusive", "unsettled", "not_measured")


def _fmt(x) -> str:
    v = _num(x)
    return "—" if v is None else f"{v:.3g}"


def _by_claim(rows: list[dict]) -> dict[str, dict[str, dict]]:
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["claim"]][r["run"]] = r
    return by


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def verdict_changes(rows: list[dict], labels: list[str], factor: str) -> list[str]:
    """One sentence per claim whose verdict is not the same in every run, the
    runs in the study's order, runs in a row with one verdict said together:
    "sft_rft_rift.cosine: inconclusive for teacher scripted-0.15, fails for teacher
    scripted-0.80, unsettled for teacher self." """
    out = []
    for claim, runs in _by_claim(rows).items():
        seq = [(lab, runs[lab]["verdict"]) for lab in labels if lab in runs]
        if len({v for _, v in seq}) <= 1:
            continue
        groups: list[tuple[str, list[str]]] = []
        for lab, v in seq:
            if groups and groups[-1][0] == v:
                groups[-1][1].append(lab)
            else:
                groups.append((v, [lab]))
        said = ", ".join(f"{v} for {factor} {_join(labs)}" for v, labs in groups)
        out.append(f"{claim}: {said}.")
    return out


def run_summary(rows: list[dict], label: str) -> str:
    """"10 holds, 6 fails, 3 inconclusive; 19 of 19 settled" for one run."""
    mine = [r for r in rows if r["run"] == label]
    n = Counter(r["verdict"] for r in mine)
    counts = ", ".join(f"{n[v]} {v}" for v in VERDICTS if n[v])
    settled = sum(1 for r in mine if r.get("settled"))
    return f"{counts}; {settled} of {len(mine)} settled"


def _teacher(r: dict) -> str:
    acc = _num(r.get("teacher_accuracy"))
    bits = [html.escape(str(r.get("teacher") or r.get("teacher_kind") or "?"))]
    if acc is not None:
        bits.append(f"right {acc:.0%} of the time")
    jac = _num(r.get("teacher_token_jaccard"))
    if jac is not None:
        bits.append(f"token overlap within a prompt {jac:.2f}")
    return ", ".join(bits)


def _opening(rows, labels, factor) -> str:
    first = {r["run"]: r for r in rows}
    items = "".join(f"<li><b>{html.escape(lab)}</b> ({_teacher(first[lab])}): {run_summary(rows, lab)}</li>"
                    for lab in labels if lab in first)
    changes = verdict_changes(rows, labels, factor)
    said = ("<p>Where a verdict changes along the factor:</p><ul>"
            + "".join(f"<li>{html.escape(s)}</li>" for s in changes) + "</ul>") if changes else \
        "<p>No verdict changes along the factor.</p>"
    holds = {lab: sorted(c for c, rs in _by_claim(rows).items() if rs.get(lab, {}).get("verdict") == "holds")
             for lab in labels}
    every = sorted(set.intersection(*(set(v) for v in holds.values()))) if holds else []
    common = (f"<p>Hold for every {html.escape(factor)}: {html.escape(', '.join(every))}.</p>" if every else
              f"<p>No claim holds for every {html.escape(factor)}.</p>")
    return f"<h2>Which claims hold for which {html.escape(factor)}</h2><ul>{items}</ul>{common}{said}"


def _claims_table(rows, labels) -> str:
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    body = []
    for claim, runs in _by_claim(rows).items():
        cells = []
        for lab in labels:
            r = runs.get(lab)
            if r is None:
                cells.append("<td>—</td>")
                continue
            ci = "" if _num(r.get("ci_low")) is None else f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            cells.append(f'<td class="v-{html.escape(r["verdict"])}" title="{html.escape(r.get("note") or "")}">'
                         f'{_fmt(r.get("value"))}{ci}<br>{html.escape(r["verdict"])}</td>')
        paper = html.escape(str(next(iter(runs.values())).get("paper_value") or ""))
        body.append(f'<tr><td class="s">{html.escape(claim)}</td><td class="s">{paper}</td>{"".join(cells)}</tr>')
    return (f"<h2>Claims by run</h2><p class=note>value [95% CI] and verdict; the cell's tooltip is the note "
            f"(docs/findings.md, \"Verdict rule\").</p><table><tr><th>claim</th><th>paper</th>{head}</tr>"
            + "".join(body) + "</table>")


def _runs_table(rows, labels) -> str:
    first = {r["run"]: r for r in rows}
    out = []
    for lab in labels:
        r = first.get(lab)
        if r is None:
            continue
        out.append(f'<tr><td class="s"><a href="{html.escape(lab)}/report/index.html">{html.escape(lab)}</a></td>'
                   f'<td class="s">{_teacher(r)}</td><td>{_fmt(r.get("teacher_frac_prompts_mixed"))}</td>'
                   f'<td>{_fmt(r.get("order_agreement"))}</td><td>{_fmt(r.get("horizon_agreement"))}</td>'
                   f'<td class="s"><code>{html.escape(str(r.get("config_hash") or ""))}</code></td></tr>')
    return ("<h2>Runs</h2><table><tr><th>run</th><th>teacher</th><th>prompts mixed</th><th>same-loss agreement"
            "</th><th>horizon agreement</th><th>config hash</th></tr>" + "".join(out) + "</table>")


def render(rows: list[dict], labels: list[str], factor: str, figures: list[tuple[str, str]]) -> str:
    """The page's HTML. figures: (file name next to the page, caption)."""
    figs = "".join(f'<figure><img src="{html.escape(n)}" alt="{html.escape(c)}"><figcaption>{html.escape(c)}'
                   f"</figcaption></figure>" for n, c in figures)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>wsg study: {html.escape(factor)}'
            f"</title><style>{PAGE_CSS}</style></head><body><h1>wsg study: the seed paper's claims against "
            f"{html.escape(factor)}</h1>{_opening(rows, labels, factor)}{_claims_table(rows, labels)}"
            f"{_runs_table(rows, labels)}<h2>Figures</h2>{figs}</body></html>")
