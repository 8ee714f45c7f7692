"""The seed paper's headline claims (arXiv 2606.23740) as checks on a run.

One row per claim (per eval set for the accuracy claims): the paper's value,
this run's value with its 95% CI, the matching noise floor, and a verdict
that follows from them by one rule (RULE; docs/findings.md "Verdict rule"):

- not_measured: a cell or table the claim needs is absent (the note says which);
- unsettled: the cells have not settled by the rule of analysis/settle.py
  (data-order and horizon controls), whatever the CI says: an update still
  moving neither confirms nor refutes a claim (value, CI and the verdict it
  would get are still shown);
- fails: the CI lies entirely on the other side of the claim's test (a
  cross-loss cosine below a lower bound that the same-loss agreement itself
  misses, with the CI reaching that agreement, is inconclusive instead:
  analysis/settle.py above_the_agreement);
- holds: the CI lies entirely on the claim's side AND the floor test passes;
- inconclusive: otherwise (CI across the threshold, effect within the noise
  floor, or the floor not measured).

Each claim is measured at the last checkpoint step common to the cells it
uses, and again at the previous common step (value_prev, verdict_prev), so a
verdict that is still moving shows it. Cells are the run's "primary" cells:
the (init seed, data seed) with the most losses and, among their LRs scaled
back by each loss's lr_scale, the LR most losses share.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from statistics import NormalDist
from typing import Callable, Optional

import pyarrow as pa

from ..core.cells import AdapterRef, CellKey
from .findings import (
    F64,
    I64,
    STR,
    PairIndex,
    identify,
    layer_sq_norms,
    matching_controls,
    ratio_ci,
    relevant_controls,
    row_ident,
    rows_of,
)

RULE = ("not_measured if a needed cell/table is absent; unsettled if its cells have not settled (data-order and "
        "horizon controls, analysis/settle.py); fails if the CI lies on the other side of the test (a cross-loss "
        "cosine under a lower bound that the same-loss agreement also misses, its CI reaching that agreement: "
        "inconclusive); "
        "holds if the CI lies on the claim's side and the effect is beyond the noise floor; else inconclusive "
        "(docs/findings.md)")
TOL = 0.15               # "≈ x" for a cosine-like quantity: |value − x| <= TOL
RATIO_TOL = 2.0          # "≈ x×" for a ratio: within a factor of 2
ACC_MARGIN = 0.05        # accuracy "indistinguishable" needs every paired CI within ±5 points
REWARD_WEIGHTED = ("rft", "rift", "offline_grpo")
PAPER_OFFLINE = ("sft", "rft", "dft", "rift", "offline_grpo")
LATE_BLOCKS = 5          # "the final five blocks" (§3.3)
_Z95 = NormalDist().inv_cdf(0.975)

CLAIMS_SCHEMA = pa.schema([
    ("claim", STR), ("statement", STR), ("paper_value", STR), ("test", STR), ("step", I64), ("value", F64),
    ("ci_low", F64), ("ci_high", F64), ("noise_floor", F64), ("floor_kind", STR), ("verdict", STR),
    ("cells", pa.list_(STR)), ("cells_converged", pa.bool_()), ("prev_step", I64), ("value_prev", F64),
    ("verdict_prev", STR), ("note", STR),
    # The settle rule (analysis/settle.py): its outcome, the data-order agreement
    # at the claim's step (min over pairs) and the horizon agreement.
    ("settled", pa.bool_()), ("settle_kind", STR), ("order_agreement", F64), ("horizon_agreement", F64),
])


def _num(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass(frozen=True)
class Test:
    kind: str  # above | below | band
    lo: float = -math.inf
    hi: float = math.inf

    def text(self) -> str:
        return {"above": f">= {self.lo:g}", "below": f"<= {self.hi:g}"}.get(self.kind, f"in [{self.lo:g}, {self.hi:g}]")

    @classmethod
    def parse(cls, text: str) -> "Test":
        """The inverse of `text()` (the claims table stores a test as its text)."""
        t = text.strip()
        if t.startswith(">="):
            return cls("above", lo=float(t[2:]))
        if t.startswith("<="):
            return cls("below", hi=float(t[2:]))
        if t.startswith("in [") and t.endswith("]"):
            lo, hi = t[4:-1].split(",")
            return cls("band", float(lo), float(hi))
        raise ValueError(f"not a claim test: {text!r} (expected '>= x', '<= x' or 'in [a, b]')")

    def side(self, lo: float, hi: float) -> str:
        """"on" (all of [lo, hi] passes), "other" (none does) or "straddle"."""
        if self.kind == "above":
            on, other = lo >= self.lo, hi < self.lo
        elif self.kind == "below":
            on, other = hi <= self.hi, lo > self.hi
        else:
            on, other = lo >= self.lo and hi <= self.hi, hi < self.lo or lo > self.hi
        return "on" if on else "other" if other else "straddle"


def above(t):
    return Test("above", lo=t)


def below(t):
    return Test("below", hi=t)


def band(lo, hi):
    return Test("band", lo, hi)


@dataclass
class Measure:
    step: Optional[int] = None
    value: Optional[float] = None
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    cells: list = field(default_factory=list)
    missing: str = ""        # non-empty: not_measured, names what is needed
    floor: Optional[float] = None
    floor_what: str = ""
    floor_missing: str = ""  # why there is no floor: which control cells are needed
    power_ok: Optional[bool] = None  # floor mode "power" (accuracy claims)
    notes: list = field(default_factory=list)


def judge(m: Measure, test: Test, floor_mode: Optional[str]) -> tuple[str, str]:
    """The verdict rule (docs/findings.md). floor_mode: None (the claim is a
    floor itself), "required" (the floor must be measured; it is reported,
    not compared), "below"/"above" (the whole CI must lie below/above the
    floor), "power" (accuracy: the paired CIs must exclude a 5-point gap)."""
    if m.missing or _num(m.value) is None:
        return "not_measured", m.missing or "no value (a zero or undefined ΔW)"
    if _num(m.ci_low) is None or _num(m.ci_high) is None:
        m.ci_low = m.ci_high = None
    lo = m.value if m.ci_low is None else m.ci_low
    hi = m.value if m.ci_high is None else m.ci_high
    what = "CI" if m.ci_low is not None else "value (no CI)"
    side = test.side(lo, hi)
    if side == "other":
        return "fails", f"the {what} lies outside the test {test.text()}"
    if side == "straddle":
        return "inconclusive", f"the CI [{lo:.4g}, {hi:.4g}] straddles the test {test.text()}"
    if floor_mode is None:
        return "holds", ""
    if floor_mode == "power":
        return ("holds", "") if m.power_ok else (
            "inconclusive", f"too few items: a paired accuracy difference of {ACC_MARGIN:.0%} is not excluded")
    if m.floor is None:
        return "inconclusive", f"noise floor not measured: {m.floor_missing}"
    if floor_mode == "required" or (floor_mode == "below" and hi < m.floor) or (floor_mode == "above" and lo > m.floor):
        return "holds", ""
    return "inconclusive", f"not beyond the noise floor {m.floor:.4g} ({m.floor_what})"


def paired_diff_ci(n: int, x_correct: int, y_correct: int, x_only: int, y_only: int, z: float = _Z95):
    """acc_x − acc_y on the same n items and its 95% CI by Newcombe's (1998)
    method 10 for paired data (Wilson score limits combined with the phi
    correlation of the 2x2 table). x_only: items x got right and y wrong."""
    if n <= 0:
        return None, None, None

    def wilson(k):
        p = k / n
        c = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (p + z * z / (2 * n) - c) / (1 + z * z / n), (p + z * z / (2 * n) + c) / (1 + z * z / n)

    p1, p2 = x_correct / n, y_correct / n
    (l1, u1), (l2, u2) = wilson(x_correct), wilson(y_correct)
    both = x_correct - x_only
    neither = n - both - x_only - y_only
    marg = x_correct * (n - x_correct) * y_correct * (n - y_correct)
    phi = 0.0 if marg == 0 else (both * neither - x_only * y_only) / math.sqrt(marg)
    d = p1 - p2
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return d, d - delta, d + eps


def lmc_barrier(points: list[tuple[float, float]]) -> Optional[float]:
    """max over interior α of CE(α) − the straight line between the endpoint
    CEs (Frankle et al. 2020's barrier height); None without both endpoints
    and an interior point."""
    pts = dict(points)
    if 0.0 not in pts or 1.0 not in pts or len(pts) < 3:
        return None
    return max(ce - ((1 - a) * pts[0.0] + a * pts[1.0]) for a, ce in pts.items() if 0 < a < 1)


class Ctx:
    """The run's tables, cells and control pairs, as the claims read them."""

    def __init__(self, tables: dict, reference_loss: str = "sft", lr_scales: Optional[dict] = None):
        self.rows = {k: rows_of(v) for k, v in tables.items() if k != "module_pairs"}
        self.pairs = PairIndex(tables.get("global_pairs"))
        self.layer_sq = layer_sq_norms(tables.get("adapter_modules"))
        self.ref, self.scales = reference_loss, dict(lr_scales or {})
        self.idents: dict[str, AdapterRef] = {}
        self.horizons: dict[CellKey, dict[int, str]] = {}  # reference cell -> {step: horizon control adapter}
        for r in self.rows.get("adapter_modules", []):
            if r["adapter"] not in self.idents:
                self._add(row_ident(r))
        for r in self.rows.get("global_pairs", []):
            for side in ("_a", "_b"):
                if r["adapter" + side] not in self.idents:
                    self._add(row_ident(r, side))
        for k, cols in (("mcnemar", ("model_a", "model_b")), ("lmc", ("adapter_a", "adapter_b")),
                        ("cka", ("adapter_a", "adapter_b"))):
            for r in self.rows.get(k, []):
                for c in cols:
                    if r[c] not in self.idents:
                        self._add(identify(r[c]))
        self.by_cell: dict[CellKey, dict[int, str]] = defaultdict(dict)
        for i in self.idents.values():
            self.by_cell[i.cell][i.step] = i.name
        # Pair rows of the per-pair tables, by unordered pair (and eval set).
        self.present = {k for k, v in tables.items() if v is not None}
        self.by_pair = {k: defaultdict(list) for k in ("layer_pairs", "lmc", "cka")}
        for k, idx in self.by_pair.items():
            for r in self.rows.get(k, []):
                idx[frozenset((r["adapter_a"], r["adapter_b"]))].append(r)
        # Per pair and layer: Σ u1 dots, Σ v1 dots and their counts (NaN dots of
        # a zero ΔW left out, as global_pairs' nanmean does): their CIs.
        self.dots = _layer_dots(tables.get("module_pairs"))
        self.mcnemar = {(r["dataset"], frozenset((r["model_a"], r["model_b"]))): r
                        for r in self.rows.get("mcnemar", [])}
        self.conv = {r["cell"]: r["converged"] for r in self.rows.get("convergence", [])}
        self.has_conv = "convergence" in tables and tables["convergence"] is not None
        self._choose_primary()

    def _add(self, i: Optional[AdapterRef]) -> None:
        if i is None:
            return
        if i.cell.horizon is not None:  # horizon controls only feed the settle rule (analysis/settle.py)
            self.horizons.setdefault(i.cell.reference, {})[i.step] = i.name
            return
        self.idents.setdefault(i.name, i)

    def has_controls(self, loss: str) -> bool:
        """Whether the run has a data-order control of `loss` (its own settle evidence)."""
        base = self.cell(loss)
        return base is not None and any(
            i.cell.loss == loss and i.cell.data_seed != base.data_seed and i.cell.init_seed == base.init_seed
            for i in self.idents.values())

    def grid_lr(self, cell: CellKey) -> float:
        return cell.lr / self.scales.get(cell.loss, 1.0)

    def _choose_primary(self) -> None:
        # self.seeds: the (init seed, data seed) with the most losses.
        seeds = defaultdict(set)
        for c in self.by_cell:
            seeds[(c.init_seed, c.data_seed)].add(c.loss)
        self.seeds = max(seeds, key=lambda s: (len(seeds[s]), s[0] == s[1], -s[0], -s[1])) if seeds else None
        lrs = defaultdict(set)
        for c in self.by_cell:
            if (c.init_seed, c.data_seed) == self.seeds:
                lrs[round(math.log10(self.grid_lr(c)), 6)].add(c.loss)
        best = max((len(v) for v in lrs.values()), default=0)
        tied = sorted(k for k, v in lrs.items() if len(v) == best)
        self.lr = 10 ** tied[(len(tied) - 1) // 2] if tied else None  # lower median of the tied LRs

    def cell(self, loss: str) -> Optional[CellKey]:
        """The primary cell of a loss: primary seeds, grid LR nearest the primary one."""
        cands = [c for c in self.by_cell if c.loss == loss and (c.init_seed, c.data_seed) == self.seeds]
        return min(cands, key=lambda c: (abs(math.log(self.grid_lr(c) / self.lr)), c.lr)) if cands else None

    def need(self, loss: str) -> str:
        at = f" at init seed {self.seeds[0]}, data seed {self.seeds[1]}" if self.seeds else ""
        return f"needs a cell of {loss}{at} (grid.losses)"

    def steps(self, *cells: CellKey) -> list[int]:
        sets = [set(self.by_cell.get(c, {})) for c in cells]
        return sorted(set.intersection(*sets)) if sets else []

    def resolve(self, cells: list[CellKey], which: int, m: Measure) -> Optional[int]:
        """The step for `which` (0 = last common step, 1 = the one before);
        sets m.missing and returns None when there is none."""
        common = self.steps(*cells)
        if len(common) <= which:
            m.missing = ("no checkpoint step common to " + ", ".join(c.id for c in cells)
                         if which == 0 else "no earlier common step")
            return None
        m.step = common[-1 - which]
        m.cells = [self.by_cell[c][m.step] for c in cells]
        return m.step

    def name(self, cell: CellKey, step: int) -> str:
        return self.by_cell[cell][step]

    def g(self, a: str, b: str, metric: str, *, of: Optional[str] = None):
        """(value, ci_low, ci_high) of a global_pairs metric; metric "orth" is
        the orthogonal fraction of adapter `of` off the other one."""
        r = self.pairs.get(a, b)
        if r is None:
            return None
        col = metric if metric != "orth" else ("orth_frac_b_off_a" if r["adapter_b"] == of else "orth_frac_a_off_b")
        v = _num(r.get(col))
        if v is None:
            return None
        lo, hi = _num(r.get(col + "_ci_low")), _num(r.get(col + "_ci_high"))
        k = {"mean_u1_abs_dot": 0, "mean_v1_abs_dot": 1}.get(metric)
        layers = self.dots.get(frozenset((a, b))) if k is not None and lo is None else None
        if layers:
            _, lo, hi = ratio_ci([x[k] for x in layers.values()], [x[k + 2] for x in layers.values()], root=False)
        return v, lo, hi

    # -- noise floors ------------------------------------------------------------
    def control_pairs(self, loss: str, step: int, kind: str, lr: float, ratio: Optional[float] = None):
        names = sorted(n for n, i in self.idents.items() if i.cell.loss == loss and i.step == step)
        pairs = [(self.idents[a], self.idents[b]) for a, b in combinations(names, 2)]
        return [(a.name, b.name) for a, b in matching_controls(pairs, kind, lr, ratio)]

    def add_floor(self, m: Measure, pair: tuple[CellKey, CellKey], fn: Callable[[str, str], Optional[float]],
                  worst: str, kinds: Optional[tuple] = None) -> None:
        """Set m.floor to the most conservative fn (worst = "min" or "max")
        over the control pairs matching the claim's pair (cells `pair`) at
        m.step. Default kinds: findings.relevant_controls (the init-seed
        control stands in for an absent data-seed one: more conservative)."""
        a, b = pair
        floor_loss = next((x for x in (self.ref, "sft", a.loss, b.loss) if any(
            i.cell.loss == x and i.step == m.step for i in self.idents.values())), self.ref)
        base = a if a.loss == floor_loss else b if b.loss == floor_loss else self.cell(floor_loss)
        lr = base.lr if base else self.lr
        kinds = kinds or relevant_controls(a, b)
        ratio = max(a.lr, b.lr) / min(a.lr, b.lr)
        pick = max if worst == "max" else min
        vals, what, need = [], [], []
        for kind in kinds:
            got = [(p, v) for p in self.control_pairs(floor_loss, m.step, kind, lr, ratio) if (v := fn(*p)) is not None]
            if not got and kind == "data_seed":
                got = [(p, v) for p in self.control_pairs(floor_loss, m.step, "init_seed", lr)
                       if (v := fn(*p)) is not None]
                if got:
                    m.notes.append("no data-seed control: the init-seed floor stands in (more conservative)")
            if not got:
                need.append(_control_need(floor_loss, kind, lr, ratio))
                continue
            p, v = pick(got, key=lambda x: x[1])
            vals.append(v)
            what.append(f"{floor_loss} {kind} control {p[0]} vs {p[1]}: {v:.4g}")
        m.floor = pick(vals) if vals and not need else None
        m.floor_missing = "; ".join(need)
        m.floor_what = "; ".join(what)


def _layer_dots(module_pairs) -> dict[frozenset, dict[int, tuple]]:
    """pair -> layer -> (Σ u1 dots, Σ v1 dots, n u1, n v1), grouped in Arrow
    (module_pairs has pairs x modules rows: ~650k on the paper's grid)."""
    import pyarrow.compute as pc

    if module_pairs is None:
        return {}
    t = module_pairs if isinstance(module_pairs, pa.Table) else pa.Table.from_pylist(list(module_pairs))
    if not t.num_rows:
        return {}
    cols = {}
    for c in ("u1_abs_dot", "v1_abs_dot"):
        x = t.column(c).cast(pa.float64())
        cols[c] = pc.if_else(pc.is_nan(x), pa.scalar(None, pa.float64()), x)  # nanmean, as global_pairs
    g = pa.table({"a": t.column("adapter_a"), "b": t.column("adapter_b"), "layer": t.column("layer"), **cols}) \
        .group_by(["a", "b", "layer"]).aggregate([("u1_abs_dot", "sum"), ("v1_abs_dot", "sum"),
                                                  ("u1_abs_dot", "count"), ("v1_abs_dot", "count")])
    out: dict[frozenset, dict[int, tuple]] = defaultdict(dict)
    for r in g.to_pylist():
        out[frozenset((r["a"], r["b"]))][int(r["layer"])] = (
            r["u1_abs_dot_sum"] or 0.0, r["v1_abs_dot_sum"] or 0.0, r["u1_abs_dot_count"], r["v1_abs_dot_count"])
    return dict(out)


def _control_need(loss: str, kind: str, lr: float, ratio: float) -> str:
    if kind == "lr":
        return f"needs a control cell of {loss} at {ratio:g}x (or 1/{ratio:g}) the LR {lr:g} (grid.controls.lr_factors)"
    return f"needs a control cell of {loss} at a second {kind.replace('_', ' ')} at lr {lr:g} (grid.controls.{kind}s)"


__all__ = ["judge", "Test", "Measure", "Ctx", "paired_diff_ci", "lmc_barrier", "RULE"]
