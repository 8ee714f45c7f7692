"""The claims forest plot: the report's first figure (docs/findings.md "Claims").

One row per claim of geometry/claims.parquet: its value (a dot coloured by the
verdict), its 95% CI (a bar), the band its test accepts (shaded) and the noise
floor it must beat (a tick). Claims that measure the same quantity share an
axis; each quantity has its own axis, so a cosine is never read on a ratio's
scale. Every drawn artist carries a gid `<claim>:value|ci|band|floor`, so a
test can read back what was drawn.
"""
from __future__ import annotations

import math
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from .claims import Test  # noqa: E402
from .figures import DPI  # noqa: E402

VERDICT_COLOURS = {"holds": "#2e8b57", "fails": "#c0392b", "inconclusive": "#e69500", "unsettled": "#4a6fa5",
                   "not_measured": "#9a9a9a"}
BAND_COLOUR, FLOOR_COLOUR = "#3a7bd5", "#222222"
# (axis label, the claim measures drawn on it (a claim id after its first "."), log scale,
#  the range always shown, so a lone value is read against the scale it lives on)
AXES = (
    ("global cosine of ΔW", ("cosine",), False, (-0.25, 1.0)),
    ("mean |u1·u1'| (output) or |v1·v1'| (input direction)", ("u1", "v1"), False, (0.0, 1.0)),
    ("orthogonal fraction of ΔW off SFT", ("orth_global", "orth_late", "orth"), False, (0.0, 1.0)),
    ("min cos(SFT, reward-weighted) − cos(SFT, DFT)", ("diverges",), False, (-0.25, 0.25)),
    ("median top-1 principal angle (degrees)", ("top1_angle",), False, (0.0, 30.0)),
    ("ratio of ‖ΔW‖_F (log scale)", ("norm_ratio",), True, (1.0, 10.0)),
    ("LMC barrier: max CE above the line (nats/token)", ("lmc_barrier",), False, (-0.1, 0.3)),
    ("mean linear CKA, last third of blocks", ("cka_late",), False, (0.0, 1.0)),
    ("smallest pairwise exact McNemar p", ("sft_rft_rift",), False, (0.0, 1.0)),
    ("accuracy gap to the best other offline loss", ("dpo_best",), False, (-0.2, 0.2)),
)


def measure_of(claim: str) -> str:
    """`dpo.cosine` -> cosine; `accuracy.dpo_best[gsm8k]` -> dpo_best."""
    return claim.split("[", 1)[0].split(".", 1)[-1]


def _num(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def group_claims(rows: list[dict]) -> list[tuple[str, bool, tuple, list[dict]]]:
    """[(axis label, log scale, range shown, claim rows in table order)], axes in
    AXES order; a measure AXES does not know gets an axis of its own (named by it)."""
    axes = []
    known = set()
    for label, measures, log, shown in AXES:
        known.update(measures)
        got = [r for r in rows if measure_of(r["claim"]) in measures]
        if got:
            axes.append((label, log, shown, got))
    for m in dict.fromkeys(measure_of(r["claim"]) for r in rows if measure_of(r["claim"]) not in known):
        axes.append((m, False, (), [r for r in rows if measure_of(r["claim"]) == m]))
    return axes


def _limits(rows: list[dict], log: bool, shown: tuple) -> tuple[float, float]:
    """x limits holding the range shown and every value, CI, floor and finite test bound, padded."""
    xs = list(shown)
    for r in rows:
        t = Test.parse(r["test"])
        xs += [x for x in (_num(r.get("value")), _num(r.get("ci_low")), _num(r.get("ci_high")),
                           _num(r.get("noise_floor")), t.lo, t.hi) if x is not None and math.isfinite(x)]
    if log:
        xs = [math.log10(x) for x in xs if x > 0] or [0.0]
    lo, hi = min(xs), max(xs)
    span = max(hi - lo, 0.25 * max(abs(lo), abs(hi)), 0.05)
    lo, hi = lo - 0.04 * span, hi + 0.04 * span
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def _draw_axis(ax, label: str, log: bool, shown: tuple, rows: list[dict]) -> None:
    if log:
        ax.set_xscale("log")
    xlo, xhi = _limits(rows, log, shown)
    ax.set_xlim(xlo, xhi)
    for k, r in enumerate(rows):
        y, claim = -k, r["claim"]
        t = Test.parse(r["test"])
        blo, bhi = max(t.lo, xlo), min(t.hi, xhi)
        ax.add_patch(Rectangle((blo, y - 0.38), bhi - blo, 0.76, color=BAND_COLOUR, alpha=0.16, lw=0,
                               gid=f"{claim}:band"))
        c = VERDICT_COLOURS.get(r["verdict"], "#555555")
        v, lo, hi, floor = (_num(r.get(x)) for x in ("value", "ci_low", "ci_high", "noise_floor"))
        if floor is not None:
            ax.plot([floor], [y], marker="|", ms=15, mew=2.2, color=FLOOR_COLOUR, ls="none", zorder=5,  # over the dot
                    gid=f"{claim}:floor")
        if v is None:
            ax.text(xlo + 0.5 * (xhi - xlo) if not log else math.sqrt(xlo * xhi), y, "not measured", ha="center",
                    va="center", fontsize=7.5, color=VERDICT_COLOURS["not_measured"], style="italic")
            continue
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=c, lw=2.4, solid_capstyle="butt", gid=f"{claim}:ci")
        ax.plot([v], [y], "o", color=c, ms=6.5, mec="white", mew=0.8, gid=f"{claim}:value")
    ax.set_yticks([-k for k in range(len(rows))], [r["claim"] for r in rows], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        tick.set_color(VERDICT_COLOURS.get(r["verdict"], "#222222") if r["verdict"] != "not_measured" else "#777777")
    ax.set_ylim(-len(rows) + 0.5, 0.5)
    ax.set_xlabel(label, fontsize=8.5)
    ax.tick_params(axis="x", labelsize=7.5)
    ax.grid(axis="x", color="#e4e4e4", lw=0.6)
    ax.set_axisbelow(True)


def forest_figure(rows: list[dict]):
    """The figure (two columns of axes, each axis as tall as its claims), or None without claims."""
    groups = group_claims(rows)
    if not groups:
        return None
    ncol = 2 if len(groups) > 1 else 1
    nrow = math.ceil(len(groups) / ncol)
    heights = [max(len(g[3]) for g in groups[i * ncol:(i + 1) * ncol]) + 1.6 for i in range(nrow)]
    fig = plt.figure(figsize=(6.2 * ncol, 0.27 * sum(heights) + 0.5))
    grid = fig.add_gridspec(nrow, ncol, height_ratios=heights)
    for i, (label, log, shown, g) in enumerate(groups):
        _draw_axis(fig.add_subplot(grid[i // ncol, i % ncol]), label, log, shown, g)
    handles = [Patch(color=BAND_COLOUR, alpha=0.3, label="the claim's test band"),
               Line2D([], [], marker="|", ms=12, mew=2.2, color=FLOOR_COLOUR, ls="none", label="noise floor"),
               *(Line2D([], [], marker="o", color=c, lw=2.4, label=f"{v.replace('_', ' ')}: value, 95% CI")
                 for v, c in VERDICT_COLOURS.items() if v != "not_measured")]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.32 / fig.get_figheight()))
    return fig


def claims_forest(rows: list[dict], path: str) -> Optional[str]:
    """Write the claims forest plot to `path` (PNG); None without claims."""
    fig = forest_figure(rows or [])
    if fig is None:
        return None
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
