"""The seed paper's headline claims (arXiv 2606.23740), one measure each.

analysis/claims.py holds the verdict rule and the run context; here each
claim says what it measures, on which cells, its test and its floor. Tests
for "≈ x" claims: |value − x| <= 0.15 for cosine-like quantities, within a
factor of 2 for ratios; "near-orthogonal (paper x)": |cos| <= |x| + 0.15
(docs/findings.md "Claims"). Every measure takes (ctx, which): which = 0 at
the last common checkpoint step of its cells, 1 at the one before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Optional

from .claims import (
    ACC_MARGIN,
    LATE_BLOCKS,
    PAPER_OFFLINE,
    RATIO_TOL,
    REWARD_WEIGHTED,
    TOL,
    Ctx,
    Measure,
    Test,
    above,
    band,
    below,
    lmc_barrier,
    paired_diff_ci,
)
from .findings import ratio_ci, same_lr

_ABSENT = {"lmc": "analysis/lmc.parquet is absent: written by the functional stage (`wsg functional --run RUN`)",
           "cka": "analysis/cka.parquet is absent: written by the functional stage (`wsg functional --run RUN`)",
           "mcnemar": "eval/mcnemar.parquet is absent: written by the eval stage (`wsg eval --run RUN`)",
           "layer_pairs": "geometry/layer_pairs.parquet is absent: written by `wsg geometry --run RUN`"}


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    paper_value: str
    test: Test
    floor_mode: Optional[str]  # None | required | below | above | power (analysis.claims.judge)
    fn: Callable
    settle: str = "direction"  # which settle rule applies: direction | norm | function (analysis/settle.py)

    def measure(self, ctx: Ctx, which: int) -> dict:
        """{label: Measure}; label "" except per eval set ("synthetic", ...)."""
        out = self.fn(ctx, which)
        return out if isinstance(out, dict) else {"": out}


# --- helpers --------------------------------------------------------------------
def _cells(ctx: Ctx, losses, which: int):
    """(Measure, primary cells of `losses`) at the step `which`; cells None when absent."""
    m = Measure()
    cells = [ctx.cell(x) for x in losses]
    need = [ctx.need(x) for x, c in zip(losses, cells) if c is None]
    if need:
        m.missing = "; ".join(need)
        return m, None
    return (m, cells) if ctx.resolve(cells, which, m) is not None else (m, None)


def _set(m: Measure, got: list, agg) -> None:
    """value and CI of a conjunction over pairs: agg (min for a test "above",
    max for "below") of the values, of the lower and of the upper limits."""
    m.value = agg(x[0] for x in got)
    if all(x[1] is not None and x[2] is not None for x in got):
        m.ci_low, m.ci_high = agg(x[1] for x in got), agg(x[2] for x in got)
    else:
        m.notes.append("no CI (geometry tables without bootstrap columns): judged on the point value")


def _gv(ctx: Ctx, metric: str, transform=lambda v: v):
    def fn(a, b):
        x = ctx.g(a, b, metric)
        return None if x is None else transform(x[0])
    return fn


def _orth_worst(ctx: Ctx):
    def fn(a, b):
        x, y = ctx.g(a, b, "orth", of=a), ctx.g(a, b, "orth", of=b)
        return None if x is None or y is None else max(x[0], y[0])
    return fn


def _pair_metric(ctx: Ctx, m: Measure, metric: str, *, of_index: Optional[int] = None) -> bool:
    a, b = m.cells
    x = ctx.g(a, b, metric, of=m.cells[of_index] if of_index is not None else None)
    if x is None:
        m.missing = f"geometry/global_pairs has no row for {a} and {b}"
        return False
    _set(m, [x], min)
    return True


def _norm_ratio(ctx: Ctx, num: str, den: str):
    """‖ΔW_num‖ / ‖ΔW_den‖ with a layer-bootstrap CI."""
    a, b = ctx.layer_sq.get(num), ctx.layer_sq.get(den)
    if not a or not b:
        return None
    layers = sorted(set(a) & set(b))
    return ratio_ci([a[k] for k in layers], [b[k] for k in layers])


def _sym_ratio(ctx: Ctx):
    def fn(x, y):
        r = _norm_ratio(ctx, x, y)
        return None if r is None or not r[0] > 0 else max(r[0], 1 / r[0])
    return fn


def _first_pair(ctx: Ctx, partners, other: str, which: int, table: str):
    """The first (partner, other) primary pair with rows in `table` at the step."""
    if table not in ctx.present:
        return Measure(missing=_ABSENT[table]), None
    tried = []
    for p in partners:
        m, cells = _cells(ctx, (p, other), which)
        if cells is None:
            continue
        rows = ctx.by_pair[table].get(frozenset(m.cells))
        if rows:
            return m, (cells, rows)
        tried.append(" and ".join(m.cells))
    why = (f"{table} has no row for " + "; ".join(tried) + " (analysis.lmc_pairs / CKA reference pairs)" if tried
           else "; ".join(ctx.need(x) for x in (*partners, other) if ctx.cell(x) is None))
    return Measure(missing=why), None


# --- geometry claims --------------------------------------------------------------
def _colinear(metric: str, agg, threshold: float, word: str):
    def fn(ctx, which):
        m, cells = _cells(ctx, ("sft", "rft", "rift"), which)
        if cells is None:
            return m
        got = [ctx.g(a, b, metric) for a, b in combinations(m.cells, 2)]
        if any(x is None for x in got):
            m.missing = "geometry/global_pairs lacks a pair of " + ", ".join(m.cells)
            return m
        _set(m, got, agg)
        # The paper's own §3.4: a shared LoRA init inflates cross-loss agreement,
        # so the same loss at another init seed must be on the table.
        ctx.add_floor(m, (cells[0], cells[0]), _gv(ctx, metric), "min" if agg is min else "max",
                      kinds=("init_seed",))
        if m.floor is not None:
            robust = m.floor >= threshold if agg is min else m.floor <= threshold
            m.notes.append(f"the same loss at another init seed reads {m.floor:.4g}: " + (
                f"the {word} survives a change of LoRA init" if robust else
                f"the {word} is conditional on the shared LoRA init (seed §3.4)"))
        return m
    return fn


def _dft(ctx, which):
    present = [x for x in REWARD_WEIGHTED if ctx.cell(x)]
    if not present:
        return Measure(missing="needs a cell of a reward-weighted loss (rft, rift or offline_grpo) next to dft (grid.losses)")
    m, cells = _cells(ctx, ("sft", "dft", *present), which)
    if cells is None:
        return m
    s, d = m.cells[:2]
    dv, ws = ctx.g(s, d, "cosine"), [ctx.g(s, w, "cosine") for w in m.cells[2:]]
    if dv is None or any(w is None for w in ws):
        m.missing = "geometry/global_pairs lacks a pair with " + s
        return m
    m.value = min(w[0] for w in ws) - dv[0]
    if dv[1] is not None and all(w[1] is not None for w in ws):
        # Both CIs must separate: a conservative bound on the difference.
        m.ci_low, m.ci_high = min(w[1] for w in ws) - dv[2], min(w[2] for w in ws) - dv[1]
    m.notes.append(f"min cos(sft, {{{', '.join(present)}}}) − cos(sft, dft); cos(sft, dft) = {dv[0]:.4g}")
    # The gap must exceed the cosine that data order alone takes off SFT's direction.
    ctx.add_floor(m, cells[:2], _gv(ctx, "cosine", lambda v: 1 - v), "max")
    return m


def _orth(loss: str):
    def fn(ctx, which):
        m, cells = _cells(ctx, ("sft", loss), which)
        if cells is not None and _pair_metric(ctx, m, "orth", of_index=1):
            ctx.add_floor(m, cells, _orth_worst(ctx), "max")
        return m
    return fn


def _late_orth(ctx: Ctx, a: str, b: str, of: str):
    rows = sorted(ctx.by_pair["layer_pairs"].get(frozenset((a, b)), []), key=lambda r: r["layer"])[-LATE_BLOCKS:]
    sq = ctx.layer_sq.get(of)
    if not rows or not sq:
        return None
    col = lambda r: r["orth_frac_b_off_a"] if r["adapter_b"] == of else r["orth_frac_a_off_b"]  # noqa: E731
    layers = [int(r["layer"]) for r in rows]
    return ratio_ci([col(r) ** 2 * sq[k] for r, k in zip(rows, layers)], [sq[k] for k in layers])


def _grpo_late(ctx, which):
    if "layer_pairs" not in ctx.present:
        return Measure(missing=_ABSENT["layer_pairs"])
    m, cells = _cells(ctx, ("sft", "offline_grpo"), which)
    if cells is None:
        return m
    x = _late_orth(ctx, m.cells[0], m.cells[1], of=m.cells[1])
    if x is None:
        m.missing = "geometry/layer_pairs or adapter_modules lacks " + " and ".join(m.cells)
        return m
    m.value, m.ci_low, m.ci_high = x
    m.notes.append(f"last {LATE_BLOCKS} blocks pooled; layer-bootstrap CI over {LATE_BLOCKS} layers is approximate")

    def floor(a, b):
        u, v = _late_orth(ctx, a, b, of=a), _late_orth(ctx, a, b, of=b)
        return None if u is None or v is None else max(u[0], v[0])
    ctx.add_floor(m, cells, floor, "max")
    return m


def _pair_cos(loss: str, metric: str):
    def fn(ctx, which):
        m, cells = _cells(ctx, ("sft", loss), which)
        if cells is not None and _pair_metric(ctx, m, metric):
            ctx.add_floor(m, cells, _gv(ctx, metric), "min")
        return m
    return fn


def _barrier(ctx, which):
    m, got = _first_pair(ctx, ("rift", "sft", "rft"), "dpo", which, "lmc")
    if got is None:
        return m
    cells, rows = got
    m.value = lmc_barrier([(r["alpha"], r["ce"]) for r in rows])
    if m.value is None:
        m.missing = "analysis/lmc.parquet needs α = 0, 1 and an interior α (analysis.lmc_alphas)"
        return m
    m.notes.append(f"pair {' – '.join(m.cells)}; CE in nats per answer token; no CI (point value)")

    def floor(a, b):
        r = ctx.by_pair["lmc"].get(frozenset((a, b)))
        return lmc_barrier([(x["alpha"], x["ce"]) for x in r]) if r else None
    ctx.add_floor(m, cells, floor, "max")
    return m


def _late_cka(ctx: Ctx, a: str, b: str):
    """Mean CKA over the last third of blocks and a bootstrap CI over those blocks."""
    rows = ctx.by_pair["cka"].get(frozenset((a, b)))
    if not rows:
        return None
    n = max(int(r["layer"]) for r in rows) + 1
    late = [r["cka"] for r in rows if int(r["layer"]) >= n - max(1, n // 3)]  # "from layer 25 of 36 onward"
    return ratio_ci(late, [1.0] * len(late), root=False) if late else None


def _cka(ctx, which):
    m, got = _first_pair(ctx, ("offline_grpo", "dft", "sft"), "dpo", which, "cka")
    if got is None:
        return m
    m.value, m.ci_low, m.ci_high = _late_cka(ctx, *m.cells)
    m.notes.append(f"pair {' – '.join(m.cells)}; mean over the last third of blocks (bootstrap over those blocks)")

    def floor(a, b):
        x = _late_cka(ctx, a, b)
        return None if x is None else x[0]
    ctx.add_floor(m, got[0], floor, "min")
    return m


# --- seed and LR -------------------------------------------------------------------
def _seed(metric: str):
    def fn(ctx, which):
        m, s = Measure(), ctx.cell("sft")
        if s is None:
            m.missing = ctx.need("sft")
            return m
        cands = sorted((c for c in ctx.by_cell
                        if c.loss == "sft" and same_lr(c.lr, s.lr) and c.init_seed != s.init_seed),
                       key=lambda c: (c.data_seed != s.data_seed, c.init_seed, c.data_seed))
        for c in cands:
            m = Measure()
            if ctx.resolve([s, c], which, m) is not None and _pair_metric(ctx, m, metric):
                m.notes.append("init seed only (data order shared)" if c.data_seed == s.data_seed else
                               "no init-only control: the pair differs in both seeds, as in the paper")
                return m
        return Measure(missing=f"needs a cell of sft at a second init seed at lr {s.lr:g} "
                               "(grid.controls.init_seeds, or a second grid.seeds entry)")
    return fn


def _lr_pair(ctx: Ctx, which: int):
    s = ctx.cell("sft")
    if s is None:
        return Measure(missing=ctx.need("sft")), None
    cands = []
    for c in ctx.by_cell:
        if c.loss == "sft" and (c.init_seed, c.data_seed) == (s.init_seed, s.data_seed) and not same_lr(c.lr, s.lr):
            r = max(c.lr, s.lr) / min(c.lr, s.lr)
            if 10 / RATIO_TOL <= r <= 10 * RATIO_TOL:
                cands.append((abs(math.log(r / 10)), c.lr < s.lr, c))
    # Nearest 10x first, the lower LR first on a tie; then by the cell's fields.
    for *_, c in sorted(cands, key=lambda x: (x[0], x[1], x[2].loss, x[2].init_seed, x[2].data_seed, x[2].lr)):
        lo, hi = sorted((s, c), key=lambda x: x.lr)
        m = Measure()
        if ctx.resolve([lo, hi], which, m) is not None:
            return m, (s, lo, hi)
    return Measure(missing=f"needs a cell of sft at 10x the LR {s.lr:g} (grid.controls.lr_factors: [10])"), None


def _lr_cos(ctx, which):
    m, got = _lr_pair(ctx, which)
    if got is not None and _pair_metric(ctx, m, "cosine"):
        ctx.add_floor(m, (got[0], got[0]), _gv(ctx, "cosine"), "min", kinds=("data_seed",))
    return m


def _lr_norm(ctx, which):
    m, got = _lr_pair(ctx, which)
    if got is None:
        return m
    x = _norm_ratio(ctx, m.cells[1], m.cells[0])
    if x is None:
        m.missing = "geometry/adapter_modules lacks " + " or ".join(m.cells)
        return m
    m.value, m.ci_low, m.ci_high = x
    ctx.add_floor(m, (got[0], got[0]), _sym_ratio(ctx), "max", kinds=("data_seed",))
    return m


def _online_norm(ctx, which):
    m, cells = _cells(ctx, ("sft", "online_grpo"), which)
    if cells is None:
        return m
    x = _norm_ratio(ctx, m.cells[0], m.cells[1])
    if x is None:
        m.missing = "geometry/adapter_modules lacks " + " or ".join(m.cells)
        return m
    m.value, m.ci_low, m.ci_high = x
    if not same_lr(cells[0].lr, cells[1].lr):
        m.notes.append(f"the LRs differ ({cells[0].lr:g} vs {cells[1].lr:g}); the paper compares at the same LR")
    ctx.add_floor(m, cells, _sym_ratio(ctx), "max")
    return m


# --- accuracy -------------------------------------------------------------------------
def _oriented(row: dict, x: str):
    """(n, x_correct, y_correct, x_only, y_only) of a McNemar row, x one of its models."""
    if row["model_a"] == x:
        return row["n"], row["a_correct"], row["b_correct"], row["b10"], row["b01"]
    return row["n"], row["b_correct"], row["a_correct"], row["b01"], row["b10"]


def _acc_floor(ctx: Ctx, ds: str):
    def fn(a, b):
        r = ctx.mcnemar.get((ds, frozenset((a, b))))
        return None if r is None else abs(paired_diff_ci(*_oriented(r, a))[0])
    return fn


def _per_dataset(losses, body):
    def fn(ctx, which):
        if "mcnemar" not in ctx.present:
            return Measure(missing=_ABSENT["mcnemar"])
        m0, cells = _cells(ctx, losses(ctx), which)
        if cells is None:
            return m0
        out = {}
        for ds in sorted({k[0] for k in ctx.mcnemar}):
            m = Measure(step=m0.step, cells=list(m0.cells))
            rows = {p: ctx.mcnemar.get((ds, frozenset(p))) for p in combinations(m.cells, 2)}
            if any(r is None for r in rows.values()):
                m.missing = f"eval/mcnemar.parquet has no {ds} row for a pair of " + ", ".join(m.cells)
            else:
                body(ctx, m, cells, rows, ds)
            out[ds] = m
        return out
    return fn


def _acc_same(ctx, m, cells, rows, ds):
    m.value = min(r["p_value"] for r in rows.values())
    cis = [paired_diff_ci(*_oriented(r, p[0])) for p, r in rows.items()]
    worst = max(max(abs(c[1]), abs(c[2])) for c in cis)
    m.power_ok = worst <= ACC_MARGIN
    m.notes.append(f"largest paired accuracy difference not excluded (95%): {worst:.1%}")
    ctx.add_floor(m, (cells[0], cells[0]), _acc_floor(ctx, ds), "max", kinds=("data_seed",))


def _others(ctx):
    return ("dpo",) + tuple(x for x in PAPER_OFFLINE if ctx.cell(x)) if any(ctx.cell(x) for x in PAPER_OFFLINE) \
        else ("dpo", "sft")


def _acc_dpo(ctx, m, cells, rows, ds):
    d = m.cells[0]
    cis = [paired_diff_ci(*_oriented(r, d)) for p, r in rows.items() if d in p]
    m.value, m.ci_low, m.ci_high = (min(c[k] for c in cis) for k in range(3))
    m.notes.append("accuracy of dpo minus the best other offline loss (Newcombe paired 95% CI)")
    if not same_lr(cells[0].lr, cells[1].lr):
        m.notes.append(f"dpo trains at lr {cells[0].lr:g} vs {cells[1].lr:g}: loss and LR are entangled (seed §2)")
    ctx.add_floor(m, (cells[1], cells[0]), _acc_floor(ctx, ds), "max")


CLAIMS = [
    Claim("sft_rft_rift.cosine", "SFT, RFT and RIFT updates are colinear (global cosine, every pair)",
          "0.967-0.977 (>= 0.97; §3.2)", above(0.97), "required", _colinear("cosine", min, 0.97, "colinearity")),
    Claim("sft_rft_rift.top1_angle", "SFT, RFT and RIFT share the top of their subspace (median top-1 principal "
          "angle over modules, degrees, every pair)", "6.7 (SFT-RFT), 8.2 (SFT-RIFT); within ~10 (§3.3)",
          below(10.0), "required", _colinear("median_top1_angle_deg", max, 10.0, "shared subspace")),
    Claim("dft.diverges", "DFT diverges from SFT further than any reward-weighted loss: min cos(SFT, W) - "
          "cos(SFT, DFT), W in RFT, RIFT, offline GRPO", "0.572 vs >= 0.74 (§3.2)", above(0.0), "above", _dft),
    Claim("offline_grpo.orth_global", "Offline GRPO adds a large component orthogonal to SFT (orthogonal fraction "
          "off SFT, global)", "0.67 (§3.3)", band(0.67 - TOL, 0.67 + TOL), "above", _orth("offline_grpo")),
    Claim("offline_grpo.orth_late", "... larger in the last five blocks (orthogonal fraction off SFT, pooled)",
          "0.79-0.86 per block (§3.3)", above(0.79 - TOL), "above", _grpo_late),
    Claim("dpo.cosine", "DPO is near-orthogonal to SFT (global cosine)", "0.057-0.065 (§3.2)",
          band(-(0.06 + TOL), 0.06 + TOL), "below", _pair_cos("dpo", "cosine")),
    Claim("dpo.u1", "DPO writes a different output direction (mean |u1.u1'| over modules vs SFT)", "0.11 (§3.3)",
          below(0.11 + TOL), "below", _pair_cos("dpo", "mean_u1_abs_dot")),
    Claim("dpo.lmc_barrier", "Interpolating DPO with the SFT cluster crosses a barrier (max CE above the line "
          "between the endpoints, nats/token)", "sharp barrier above alpha = 0.5 (RIFT-DPO; §3.5)",
          above(0.1), "above", _barrier, "function"),
    Claim("dpo.cka_late", "DPO's late-layer representations diverge (mean linear CKA over the last third of "
          "blocks, vs offline GRPO / DFT / SFT)", "~0.46 (§3.6)", below(0.46 + TOL), "below", _cka, "function"),
    Claim("seed.cosine", "The same loss (SFT) at two LoRA-init seeds: low global cosine",
          "0.07 (lr 5e-7) - 0.36 (lr 5e-5) (§3.4)", band(0.07 - TOL, 0.36 + TOL), None, _seed("cosine")),
    Claim("seed.u1", "... yet the same output direction (mean |u1.u1'|)", "0.99 (§3.4)", above(0.99 - TOL), None,
          _seed("mean_u1_abs_dot")),
    Claim("seed.v1", "... and a different input direction (mean |v1.v1'|)", "0.07 (§3.4)", below(0.07 + TOL), None,
          _seed("mean_v1_abs_dot")),
    Claim("lr10.cosine", "A 10x LR rotates SFT's update (global cosine between the two LRs)", "~0.55 (§3.4)",
          band(0.55 - TOL, 0.55 + TOL), "below", _lr_cos),
    Claim("lr10.norm_ratio", "... and grows its norm sub-linearly (||dW|| at 10x LR / at 1x)", "~3x (§3.4)",
          band(3 / RATIO_TOL, 3 * RATIO_TOL), "above", _lr_norm, "norm"),
    Claim("online_grpo.cosine", "Online GRPO is near-orthogonal to SFT (global cosine)", "0.025 (§3.4)",
          band(-(0.025 + TOL), 0.025 + TOL), "below", _pair_cos("online_grpo", "cosine")),
    Claim("online_grpo.orth", "Online GRPO's update is almost all orthogonal to SFT (orthogonal fraction off SFT)",
          "0.998 (§3.4)", above(0.998 - TOL), "above", _orth("online_grpo")),
    Claim("online_grpo.norm_ratio", "Online GRPO's update is ~10x smaller than SFT's at the same LR "
          "(||dW_SFT|| / ||dW_online||)", "~10x (2.84 vs 0.30; §3.4)", band(10 / RATIO_TOL, 10 * RATIO_TOL),
          "above", _online_norm, "norm"),
    Claim("accuracy.sft_rft_rift", "SFT, RFT and RIFT accuracies are indistinguishable (smallest pairwise exact "
          "McNemar p)", "p >= 0.15 (n = 1319; §3.1)", above(0.15), "power",
          _per_dataset(lambda ctx: ("sft", "rft", "rift"), _acc_same), "function"),
    Claim("accuracy.dpo_best", "DPO is the most accurate offline loss (accuracy gap to the best other)",
          "93.5% vs 87.3-88.2%, p < 1e-9 (§3.1)", above(0.0), "above", _per_dataset(_others, _acc_dpo), "function"),
]
