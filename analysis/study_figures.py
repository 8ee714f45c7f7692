"""A study's figure (sweep/study.py): for each claim, its value with the 95% CI
and its noise floor in every run, runs in the study's order along x (the
factor's values), the marker's colour the verdict. One PNG, small multiples.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .figures_forest import VERDICT_COLOURS as COLOURS  # noqa: E402
from .figures_forest import _num, claims_forest  # noqa: E402


def claims_by_factor(rows: list[dict], runs: list[str], factor: str, path: str) -> Optional[str]:
    """rows: the combined claims table's rows; runs: run labels in order.
    Claims with no value in any run are left out; None when none is left."""
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["claim"]][r["run"]] = r
    claims = [c for c in by if any(_num(x.get("value")) is not None for x in by[c].values())]
    if not claims:
        return None
    cols = min(4, len(claims))
    nrow = math.ceil(len(claims) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(max(3.6 * cols, 9.0), 2.6 * nrow + 0.8), squeeze=False)
    for ax, claim in zip(axes.flat, claims):
        for x, run in enumerate(runs):
            r = by[claim].get(run)
            v = None if r is None else _num(r.get("value"))
            if v is None:
                continue
            lo, hi = _num(r.get("ci_low")), _num(r.get("ci_high"))
            err = [[v - lo], [hi - v]] if lo is not None and hi is not None else None
            ax.errorbar([x], [v], yerr=err, fmt="o", color=COLOURS.get(r["verdict"], "k"), capsize=3)
            f = _num(r.get("noise_floor"))
            if f is not None:
                ax.plot([x - 0.25, x + 0.25], [f, f], color="#555", lw=1, ls="--")
        ax.set_title(claim, fontsize=8)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(runs, fontsize=7, rotation=30, ha="right")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(claims):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=v.replace("_", " ")) for v, c in COLOURS.items()]
    handles.append(plt.Line2D([], [], ls="--", color="#555", label="noise floor"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"Claims against {factor}: value, 95% CI, noise floor; colour = verdict", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def study_rows(rows: list[dict], runs: list[str]) -> list[dict]:
    """The combined claims table's rows as forest rows: each claim once per
    run, named `claim[run]`, in claim order then the study's run order."""
    order = {r: k for k, r in enumerate(runs)}
    rank = {c: k for k, c in enumerate(dict.fromkeys(r["claim"] for r in rows))}
    picked = sorted((r for r in rows if r["run"] in order), key=lambda r: (rank[r["claim"]], order[r["run"]]))
    return [{**r, "claim": f"{r['claim']}[{r['run']}]"} for r in picked]


def study_forest(rows: list[dict], runs: list[str], path: str) -> Optional[str]:
    """The report's claims forest plot (analysis/figures_forest.py) for a
    study, each claim once per run on the claim's own axis; None without claims."""
    return claims_forest(study_rows(rows, runs), path)
