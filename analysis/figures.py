"""The report's figures (matplotlib, Agg), after the seed paper's Figures 1-6.

Each function takes rows (lists of dicts read from the run's Parquet tables),
writes one PNG and returns its path, or returns None when the rows hold
nothing to draw. Adapters are named `<cell_id>@<step>` (analysis/adapters.py);
`Labeler` turns names into short labels (the loss alone when seed and LR do not
vary). Panels are one per checkpoint step.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .adapters import BASE, cell_of, step_of  # noqa: E402
from .findings import CONV_MIN_COS

DPI = 110


class Labeler:
    """Short, unambiguous labels for the adapters seen in a report."""

    def __init__(self, names: Iterable[str]):
        cells = [c for n in names if n != BASE and (c := cell_of(n)) is not None]
        self.vary_seed = len({c.init_seed for c in cells}) > 1
        self.vary_lr = len({(c.loss, c.lr) for c in cells}) > len({c.loss for c in cells})

    def __call__(self, name: str, *, step: bool = False) -> str:
        c = cell_of(name)
        if c is None:
            return name
        out = c.loss
        if self.vary_seed:
            out += f" s{c.init_seed}"
        if self.vary_lr:
            out += f" lr{c.lr:.0e}"
        if step:
            out += f" @{step_of(name)}"
        return out


def panel_steps(names: Iterable[str], *, max_panels: int = 4) -> list[int]:
    """The checkpoint steps to draw (the last `max_panels`); -1 alone when only
    extra adapters (no step) are present."""
    steps = sorted({step_of(n) for n in names if n != BASE and step_of(n) >= 0})
    return steps[-max_panels:] if steps else [-1]


def in_panel(names: Iterable[str], step: int, last: int) -> bool:
    """A row belongs to a step's panel when every adapter in it is at that step,
    or is the base model, or has no step (extras: drawn with the last step)."""
    for n in names:
        s = step_of(n)
        if n == BASE or (s < 0 and step == last):
            continue
        if s != step:
            return False
    return True


def _panels(n: int, *, width: float = 5.2, height: float = 4.0, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(width * n, height * rows), squeeze=False)
    return fig, axes


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _step_title(step: int) -> str:
    return "extra adapters" if step < 0 else f"checkpoint step {step}"


def global_cosine_heatmap(rows: list[dict], path: str, *, order: list[str]) -> Optional[str]:
    """Seed Fig. 1: matrix of global ΔW cosines, one panel per step."""
    if not rows:
        return None
    lab = Labeler(order)
    steps = panel_steps(order)
    fig, axes = _panels(len(steps), width=6.0, height=5.2)
    for ax, step in zip(axes[0], steps):
        names = [n for n in order if in_panel([n], step, steps[-1])]
        idx = {n: k for k, n in enumerate(names)}
        m = np.full((len(names), len(names)), np.nan)
        np.fill_diagonal(m, 1.0)
        for r in rows:
            a, b = r["adapter_a"], r["adapter_b"]
            if a in idx and b in idx:
                m[idx[a], idx[b]] = m[idx[b], idx[a]] = r["cosine"]
        im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
        ticks = [lab(n) for n in names]
        ax.set_xticks(range(len(names)), ticks, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), ticks, fontsize=8)
        if len(names) <= 14:
            for i in range(len(names)):
                for j in range(len(names)):
                    if not math.isnan(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if abs(m[i, j]) > 0.6 else "black")
        ax.set_title(f"global cos(ΔW_a, ΔW_b), {_step_title(step)}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, label="cosine (unitless)")
    return _save(fig, path)


def _pair_lines(ax, rows, pairs, lab, *, x: str, y: str) -> int:
    drawn = 0
    for a, b in pairs:
        pts = sorted((r[x], r[y]) for r in rows if r["adapter_a"] == a and r["adapter_b"] == b)
        if pts:
            xs, ys = zip(*pts)
            # Pairs with the base model dashed: they are a different question
            # (how far training moved) from adapter-vs-adapter pairs.
            ax.plot(xs, ys, marker="o", ms=3, ls="--" if BASE in (a, b) else "-", label=f"{lab(a)} – {lab(b)}")
            drawn += 1
    if x == "layer":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize=7, loc="best")
    return drawn


def _ordered(pair: tuple[str, str]) -> tuple[str, str]:
    # geometry tables store unordered pairs with a < b by name (docs/design.md).
    return tuple(sorted(pair))


def layer_cosine(rows: list[dict], path: str, *, ref_pairs: list[tuple[str, str]]) -> Optional[str]:
    """Seed Fig. 4: per-layer ΔW cosine of each adapter to its reference cell."""
    pairs = [_ordered(p) for p in ref_pairs]
    have = {(r["adapter_a"], r["adapter_b"]) for r in rows}
    pairs = [p for p in pairs if p in have]
    if not pairs:
        return None
    lab = Labeler([n for p in pairs for n in p])
    steps = panel_steps([n for p in pairs for n in p])
    fig, axes = _panels(len(steps))
    for ax, step in zip(axes[0], steps):
        _pair_lines(ax, rows, [p for p in pairs if in_panel(p, step, steps[-1])], lab, x="layer", y="cosine")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("cosine of ΔW to the reference (per layer)")
        ax.set_title(_step_title(step), fontsize=10)
    return _save(fig, path)


def principal_angles(rows: list[dict], path: str, *, ref_pairs: list[tuple[str, str]]) -> Optional[str]:
    """Seed §3.3: distributions over modules of the top-1 and worst principal
    angle between the top-k left singular subspaces, per pair with the reference."""
    pairs = [_ordered(p) for p in ref_pairs]
    groups = defaultdict(lambda: ([], []))
    for r in rows:
        key = (r["adapter_a"], r["adapter_b"])
        groups[key][0].append(r["top1_angle_deg"])
        groups[key][1].append(r["worst_angle_deg"])
    pairs = [p for p in pairs if p in groups]
    if not pairs:
        return None
    lab = Labeler([n for p in pairs for n in p])
    steps = panel_steps([n for p in pairs for n in p])
    fig, axes = _panels(len(steps), rows=2, height=3.6)
    for col, step in enumerate(steps):
        here = [p for p in pairs if in_panel(p, step, steps[-1])]
        for row, (which, title) in enumerate(((0, "top-1 principal angle"), (1, "worst (largest) principal angle"))):
            ax = axes[row][col]
            if here:
                ax.boxplot([groups[p][which] for p in here], showfliers=False)
                ax.set_xticks(range(1, len(here) + 1), [f"{lab(a)}–{lab(b)}" for a, b in here],
                              rotation=45, ha="right", fontsize=7)
            ax.set_ylim(0, 90)
            ax.set_ylabel(f"{title} (degrees)", fontsize=8)
            ax.set_title(f"{title}, {_step_title(step)}", fontsize=9)
    return _save(fig, path)


def _pair_panels(rows: list[dict], path: str, *, x: str, y: str, xlabel: str, ylabel: str,
                 title: str) -> Optional[str]:
    """One panel per checkpoint step, one line per adapter pair (LMC, CKA)."""
    if not rows:
        return None
    pairs = sorted({(r["adapter_a"], r["adapter_b"]) for r in rows})
    lab = Labeler([n for p in pairs for n in p])
    steps = panel_steps([n for p in pairs for n in p])
    fig, axes = _panels(len(steps))
    for ax, step in zip(axes[0], steps):
        _pair_lines(ax, rows, [p for p in pairs if in_panel(p, step, steps[-1])], lab, x=x, y=y)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {_step_title(step)}", fontsize=10)
    return _save(fig, path)


def lmc_curves(rows: list[dict], path: str) -> Optional[str]:
    """Seed Fig. 5: masked-answer CE along α·ΔW_a + (1−α)·ΔW_b."""
    return _pair_panels(rows, path, x="alpha", y="ce",
                        xlabel="α (1 = adapter_a, the first name; 0 = adapter_b)",
                        ylabel="masked-answer CE (nats / answer token)", title="linear mode connectivity")


def cka_layers(rows: list[dict], path: str) -> Optional[str]:
    """Seed Fig. 6: linear CKA of per-layer hidden states, per pair."""
    return _pair_panels(rows, path, x="layer", y="cka", xlabel="decoder block",
                        ylabel="linear CKA of hidden states (0–1)", title="representational similarity")


def _acc_group(model: str) -> str:
    if model == BASE:
        return "base"
    step = step_of(model)
    return "extra adapter" if step < 0 else f"step {step}"


def accuracy_bars(rows: list[dict], path: str) -> Optional[str]:
    """Seed Fig. 3: greedy pass@1 with Wilson 95% intervals, per eval set."""
    if not rows:
        return None
    datasets = sorted({r["dataset"] for r in rows})
    lab = Labeler([r["model"] for r in rows])
    fig, axes = _panels(len(datasets), width=max(5.0, 0.45 * len(rows) / len(datasets) + 2), height=4.4)
    for ax, ds in zip(axes[0], datasets):
        here = sorted((r for r in rows if r["dataset"] == ds),
                      key=lambda r: (r["model"] != BASE, step_of(r["model"]), r["model"]))
        acc = np.array([100 * r["accuracy"] for r in here])
        err = np.array([[100 * (r["accuracy"] - r["ci_low"]) for r in here],
                        [100 * (r["ci_high"] - r["accuracy"]) for r in here]])
        groups = [_acc_group(r["model"]) for r in here]
        colours = {g: ("0.6" if g == "base" else plt.cm.tab10(k % 10))
                   for k, g in enumerate(dict.fromkeys(groups))}
        for g in colours:
            ks = [k for k, x in enumerate(groups) if x == g]
            ax.bar(ks, acc[ks], color=colours[g], label=g)
        # One errorbar call for all bars (bar(yerr=) on a single bar trips a
        # numpy deprecation inside matplotlib 3.11).
        ax.errorbar(np.arange(len(here)), acc, yerr=err, fmt="none", ecolor="black", capsize=3)
        ax.legend(fontsize=7, loc="upper right")
        ax.set_xticks(range(len(here)), [lab(r["model"], step=r["model"] != BASE) for r in here],
                      rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("greedy pass@1 (%), Wilson 95% CI")
        ax.set_ylim(0, 100)
        ax.set_title(f"{ds} (n = {here[0]['n']})", fontsize=10)
    return _save(fig, path)


def _global_norms(module_rows: list[dict]) -> dict[str, float]:
    """‖ΔW‖_F over all modules = sqrt(Σ_j ‖ΔW_j‖_F²)."""
    sq = defaultdict(float)
    for r in module_rows:
        sq[r["adapter"]] += r["fro_norm"] ** 2
    return {k: math.sqrt(v) for k, v in sq.items()}


def varies_seed_or_lr(names: Iterable[str]) -> bool:
    lab = Labeler(names)
    return lab.vary_seed or lab.vary_lr


def _legend_or_note(ax, data, why: str) -> None:
    if data:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, f"no data: {why}", ha="center", va="center", transform=ax.transAxes, color="0.4")


def seed_lr_panels(global_rows: list[dict], module_rows: list[dict], path: str) -> Optional[str]:
    """Seed Fig. 2: (left) cosine / top-1 u / top-1 v agreement between seeds of
    the same loss vs LR; (middle) ‖ΔW‖_F vs LR; (right) cosine between two LRs
    of the same loss and seed vs their ratio."""
    seed_pts, lr_pts = defaultdict(list), defaultdict(list)
    for r in global_rows:
        a, b = cell_of(r["adapter_a"]), cell_of(r["adapter_b"])
        step = step_of(r["adapter_a"])
        if not (a is not None and b is not None and a.loss == b.loss and step == step_of(r["adapter_b"])):
            continue
        key = f"{a.loss} @{step}"
        if a.lr == b.lr and a.init_seed != b.init_seed:
            seed_pts[key].append((a.lr, r["cosine"], r["mean_u1_abs_dot"], r["mean_v1_abs_dot"]))
        elif a.init_seed == b.init_seed and a.lr != b.lr:
            lr_pts[key].append((max(a.lr, b.lr) / min(a.lr, b.lr), r["cosine"]))
    norms = defaultdict(list)
    for name, v in _global_norms(module_rows).items():
        c = cell_of(name)
        if c is not None:
            norms[(c.loss, c.init_seed, step_of(name))].append((c.lr, v))
    norms = {k: sorted(v) for k, v in norms.items() if len(v) > 1}
    if not (seed_pts or lr_pts or norms):
        return None
    fig, axes = _panels(3, width=4.8)
    ax = axes[0][0]
    for k, (key, pts) in enumerate(sorted(seed_pts.items())):
        # Several seed pairs at one LR (3+ seeds): their mean, the spread as points.
        by_lr = defaultdict(list)
        for p in pts:
            by_lr[p[0]].append(p[1:])
        lr = np.array(sorted(by_lr))
        mean = np.array([np.mean(by_lr[x], axis=0) for x in lr])
        c = plt.cm.tab10(k % 10)
        for j, (mark, what) in enumerate((("o-", "cosine"), ("s--", "|u1·u1'|"), ("^:", "|v1·v1'|"))):
            ax.plot(lr, mean[:, j], mark, color=c, alpha=1.0 if j == 0 else 0.7, label=f"{key}: {what}")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, color=c, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("agreement between two seeds (unitless)")
    ax.set_title("same loss, two seeds", fontsize=10)
    _legend_or_note(ax, seed_pts, "one seed per loss and LR")
    ax = axes[0][1]
    for (loss, seed, step), pts in sorted(norms.items()):
        lr, v = zip(*pts)
        ax.plot(lr, v, "o-", label=f"{loss} s{seed} @{step}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("global ‖ΔW‖_F")
    ax.set_title("update norm vs learning rate", fontsize=10)
    _legend_or_note(ax, norms, "one LR per loss and seed")
    ax = axes[0][2]
    for loss, pts in sorted(lr_pts.items()):
        ratio, cos = zip(*sorted(pts))
        ax.plot(ratio, cos, "o", label=loss)
    ax.set_xscale("log")
    ax.set_xlabel("LR ratio of the two cells")
    ax.set_ylabel("global cosine of ΔW (unitless)")
    ax.set_title("same loss and seed, two LRs", fontsize=10)
    _legend_or_note(ax, lr_pts, "one LR per loss and seed")
    return _save(fig, path)


def convergence_curves(rows: list[dict], path: str) -> Optional[str]:
    """Per cell (geometry/convergence.parquet): cosine of each checkpoint's ΔW
    with the cell's final ΔW, and ‖ΔW‖ relative to the final one, vs step.
    Cells flagged not converged (docs/findings.md) are drawn dashed."""
    if not rows:
        return None

    cells = sorted({r["cell"] for r in rows})
    fig, axes = _panels(2, width=5.6, height=4.2)
    for k, cell in enumerate(cells):
        pts = sorted((r["step"], r["cos_final"], r["norm_frac_final"], r["converged"]) for r in rows
                     if r["cell"] == cell)
        steps = [p[0] for p in pts]
        ls = "-" if pts[-1][3] else "--"
        c = plt.cm.tab20(k % 20)
        for ax, j in ((axes[0][0], 1), (axes[0][1], 2)):
            ax.plot(steps, [np.nan if p[j] is None else p[j] for p in pts], marker="o", ms=3, ls=ls, color=c,
                    label=cell + ("" if pts[-1][3] else " (not converged)"))
    axes[0][0].axhline(CONV_MIN_COS, color="grey", lw=0.8, ls=":")
    axes[0][0].set_ylabel("cos(ΔW at step, final ΔW) (unitless)")
    axes[0][0].set_title(f"direction vs the final checkpoint (dotted: {CONV_MIN_COS})", fontsize=10)
    axes[0][1].set_ylabel("‖ΔW‖_F at step / final ‖ΔW‖_F")
    axes[0][1].set_title("norm vs the final checkpoint", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][1].legend(fontsize=6 if len(cells) > 8 else 7, loc="best")
    return _save(fig, path)
