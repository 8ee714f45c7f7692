"""The report's findings sections (docs/findings.md): the seed paper's claims
with verdicts (the page opens with them), convergence, the noise floors, and
the matching floor next to every cross-loss global pair.

Each function takes rows read from the run's tables and returns HTML; the
caller (analysis/report.py) decides what to do when a table is absent.
"""
from __future__ import annotations

import html

from ..core.cells import AdapterRef
from .findings import (
    control_kind,
    identify,
    matching_controls,
    relevant_controls,
    row_ident,
)

VERDICTS = ("holds", "fails", "inconclusive", "unsettled", "not_measured")
_FLOOR_NOT_WRITTEN = ("geometry/noise_floors.parquet has not been written for this run (the findings step after "
                      "geometry, analysis.findings_run.run_findings)")


def _esc(x) -> str:
    return html.escape(str(x))


def _cells_of(claim_rows: list[dict]) -> set[str]:
    out = set()
    for r in claim_rows:
        for n in r.get("cells") or []:
            i = identify(n)
            if i is not None:
                out.add(i.cell.id)
    return out


def convergence_note(conv_rows, cells: set[str] | None, what: str) -> str:
    """One plain sentence: how many of `cells` (None: all) have not converged."""
    if conv_rows is None:
        return ('<p class="conv">Whether these cells converged is unknown: geometry/convergence.parquet has not '
                'been written for this run (the findings step after geometry).</p>')
    final = {r["cell"]: r for r in conv_rows if r["step"] == r["final_step"]}
    used = sorted(c for c in (final if cells is None else cells) if c in final)
    bad = [c for c in used if not final[c]["converged"]]
    if not used:
        return ""
    if bad:
        names = ", ".join(_esc(c) for c in bad[:8]) + (" …" if len(bad) > 8 else "")
        return (f'<p class="conv"><b>{len(bad)} of {len(used)} {what} have not converged</b> by the criterion of '
                f'docs/findings.md ({names}): their numbers describe updates that are still moving, not where '
                'the losses end up.</p>')
    return f'<p class="ok">All {len(used)} {what} converged by the criterion of docs/findings.md.</p>'


def settled_headline(rows: list[dict]) -> str:
    """"3 of 19 claims settled: holds 2 · fails 1 · ...": settledness first,
    so a run whose updates still move never reads as the paper failing."""
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in VERDICTS}
    settled = sum(1 for r in rows if r.get("settled"))
    return (f"{settled} of {len(rows)} claims settled: "
            + " · ".join(f"{v.replace('_', ' ')} {counts[v]}" for v in VERDICTS))


def claims_section(rows: list[dict], conv_rows, fmt, ci, figure: str = "") -> str:
    """The claims section: convergence note, how to read a verdict, `figure` (the forest plot), the table."""
    head = _esc(settled_headline(rows))
    intro = ('<p class="note">Each headline claim of the seed paper (arXiv 2606.23740) checked on this run: value '
             'with its 95% CI, the noise floor it must beat (the same metric between cells of the reference loss '
             'that differ only in a seed or the LR), and the verdict by the rule of docs/findings.md — '
             '<b>holds</b>: the CI is on the claim\'s side of its test and beyond the floor; <b>fails</b>: the CI '
             'is on the other side; <b>inconclusive</b>: neither; <b>unsettled</b>: the cells have not settled '
             '(two data orders of the same loss disagree, or the same cell on a 0.75x schedule ends elsewhere), so '
             'the claim is neither confirmed nor refuted; value and CI are still shown and the note says what it '
             'would read; <b>not measured</b>: the note names the missing cells or tables.</p>'
             f'<p><b>{head}</b></p>')
    cols = ["verdict", "claim", "statement", "paper", "test", "value [95% CI]", "noise floor", "step",
            "previous step", "cells", "note"]
    body = []
    for r in rows:
        prev = "" if r.get("prev_step") is None else f"{fmt(r.get('value_prev'))} ({_esc(r.get('verdict_prev'))} " \
                                                        f"at {r['prev_step']})"
        cells = "<br>".join(_esc(c) for c in r.get("cells") or [])
        conv = "" if r.get("cells_converged") is None else ("" if r["cells_converged"] else " ⚠")
        body.append(
            f'<tr><td class="v-{_esc(r["verdict"])}">{_esc(r["verdict"].replace("_", " "))}{conv}</td>'
            f'<td class="s">{_esc(r["claim"])}</td><td class="w">{_esc(r["statement"])}</td>'
            f'<td class="s">{_esc(r["paper_value"])}</td><td class="s">{_esc(r["test"])}</td>'
            f'<td>{ci(r["value"], r["ci_low"], r["ci_high"])}</td>'
            f'<td title="{_esc(r.get("floor_kind") or "")}">{fmt(r.get("noise_floor"))}</td>'
            f'<td>{"" if r["step"] is None else r["step"]}</td><td class="s">{prev}</td>'
            f'<td class="c">{cells}</td><td class="w">{_esc(r.get("note") or "")}</td></tr>')
    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(body) + "</table>"
    return (convergence_note(conv_rows, _cells_of(rows), "cells used by the claims") + intro + figure + table
            + '<p class="note">⚠: a cell behind this verdict has not converged. Hover a noise floor for the control '
              'pair(s) it comes from.</p>')


# --- floors next to cross-loss pairs ---------------------------------------------------
_FLOOR_METRICS = (("cosine", min, ("cosine",)), ("orth", max, ("orth_frac_b_off_a", "orth_frac_a_off_b")),
                  ("top1", max, ("median_top1_angle_deg",)), ("u1", min, ("mean_u1_abs_dot",)))


def matching_floor(floor_rows: list[dict], a: AdapterRef, b: AdapterRef, ref_loss: str) -> dict:
    """The noise floor for the pair (a, b): the reference loss's control pairs
    at the same step, of the kinds findings.relevant_controls names, at the
    reference cell's LR; per metric the most conservative value (lowest
    similarity, highest orthogonal fraction / angle). {"missing": why} when a
    kind has no control pair."""
    ref = a if a.cell.loss == ref_loss else b if b.cell.loss == ref_loss else None
    if ref is None:
        return {"missing": f"no {ref_loss} cell in the pair"}
    cands = [(row_ident(r, "_a"), row_ident(r, "_b"), r) for r in floor_rows
             if r["loss"] == ref_loss and r["step"] == ref.step]
    cands = [(x, y, r) for x, y, r in cands if x is not None and y is not None]
    by_pair = {(x.name, y.name): r for x, y, r in cands}
    ratio = max(a.cell.lr, b.cell.lr) / min(a.cell.lr, b.cell.lr)
    got, kinds, need = [], [], []
    for kind in relevant_controls(a.cell, b.cell):
        hit = matching_controls([(x, y) for x, y, _ in cands], kind, ref.cell.lr, ratio)
        if not hit:
            need.append(kind.replace("_", " "))
        got += [by_pair[(x.name, y.name)] for x, y in hit]
        kinds.append(kind)
    if need:
        return {"missing": f"no {ref_loss} control at another {' / '.join(need)} (grid.controls)"}
    out = {"kinds": ", ".join(kinds)}
    for key, agg, cols in _FLOOR_METRICS:
        vals = [r[c] for r in got for c in cols if r.get(c) is not None]
        out[key] = agg(vals) if vals else None
    return out


def _metric_cells(r: dict, fmt, ci) -> dict:
    """A global_pairs / noise_floors row's metrics as report cells, CIs beside."""
    cells = {f"{label} [CI]": ci(r[col], r.get(f"{col}_ci_low"), r.get(f"{col}_ci_high"))
             for label, col in (("cosine", "cosine"), ("orth b off a", "orth_frac_b_off_a"),
                                ("orth a off b", "orth_frac_a_off_b"),
                                ("median top-1 angle", "median_top1_angle_deg"))}
    return {**cells, "mean u1": fmt(r["mean_u1_abs_dot"]), "mean v1": fmt(r["mean_v1_abs_dot"])}


def global_rows(rows: list[dict], floor_rows, ref_loss: str, fmt, ci) -> tuple[list[dict], list[str], str]:
    """Rows for the global-pairs table: each metric with its CI and, for a
    cross-loss pair, the matching floor (same reference loss, same step)."""
    out = []
    for r in rows:
        a, b = row_ident(r, "_a"), row_ident(r, "_b")
        row = {"adapter_a": r["adapter_a"], "adapter_b": r["adapter_b"], **_metric_cells(r, fmt, ci)}
        if floor_rows is None:
            f = {"missing": "no floors written"}
        elif a is None or b is None:
            f = {"missing": "adapter given by path"}
        elif a.cell.loss == b.cell.loss:
            kind = control_kind(a, b)
            f = {"missing": f"this is a {kind.replace('_', ' ')} control pair" if kind else
                 "same loss, not a one-factor control"}
        else:
            f = matching_floor(floor_rows, a, b, ref_loss)
        for key, _, _ in _FLOOR_METRICS:
            row[f"floor {key}"] = fmt(f.get(key)) if "missing" not in f else ""
        row["floor from"] = f.get("missing") or f"{ref_loss} {f['kinds']} control(s), same step"
        out.append(row)
    cols = ["adapter_a", "adapter_b", "cosine [CI]", "floor cosine", "orth b off a [CI]", "orth a off b [CI]",
            "floor orth", "median top-1 angle [CI]", "floor top1", "mean u1", "mean v1", "floor u1", "floor from"]
    note = ('<p class="note">[CI]: 95% bootstrap over layers. Floor: the same metric between two cells of the '
            f'reference loss {_esc(ref_loss)} at the same step that differ only in the data seed (and the LR or '
            'init seed when the pair does), the most conservative of them: a cross-loss number inside its floor is '
            'not a loss effect (docs/findings.md).</p>')
    if floor_rows is None:
        note += f'<p class="note">No floors: {_FLOOR_NOT_WRITTEN}.</p>'
    return out, cols, note


def floor_rows_for_table(rows: list[dict], fmt, ci) -> tuple[list[dict], list[str]]:
    out = []
    for r in rows:
        ratio = r["norm_b"] / r["norm_a"] if r.get("norm_a") and r.get("norm_b") is not None else None
        out.append({"loss": r["loss"], "control": r["control"], "step": r["step"], "adapter_a": r["adapter_a"],
                    "adapter_b": r["adapter_b"], **_metric_cells(r, fmt, ci),
                    "‖ΔW_b‖/‖ΔW_a‖": fmt(ratio)})
    return out, list(out[0]) if out else ["loss"]


def convergence_rows(rows: list[dict], fmt) -> list[dict]:
    out = []
    for r in rows:
        if r["step"] != r["final_step"]:
            continue
        out.append({"cell": r["cell"], "final step": r["step"], "‖ΔW‖ final": fmt(r["norm"]),
                    "cos to previous checkpoint": fmt(r["cos_prev"]), "norm / previous": fmt(r["norm_ratio_prev"]),
                    "seed partner": r["seed_partner"] or "", "seed cos": fmt(r["seed_cosine"]),
                    "seed u1": fmt(r["seed_u1"]), "seed v1": fmt(r["seed_v1"]),
                    "converged": "yes" if r["converged"] else "no", "criterion": r["criterion"]})
    return out
