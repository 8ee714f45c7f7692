"""Findings with error bars (docs/findings.md): noise floors, convergence,
and the seed paper's claims as checks (analysis/claims.py).

- `noise_floors`: the global geometry metrics between two cells of one loss
  at one step that differ in ONE factor only (LoRA-init seed, data-order
  seed, or LR). They say how far a number moves for reasons that are not the
  loss; the seed paper (arXiv 2606.23740, §3.4) shows the init seed alone
  rotates ΔW more than the loss does.
- `convergence`: per cell and checkpoint, how far ΔW still moves (direction
  against the final and the previous checkpoint, norm growth), agreement with
  the same loss at another init seed, and a per-cell `converged` flag.
- `run_findings`: reads a run's tables, writes `geometry/noise_floors`,
  `geometry/convergence` and `geometry/claims` (Parquet, float64).

Cells are read from the identity columns of the geometry tables (loss,
init_seed, data_seed, lr, step; null for adapters given by path); tables
written before those columns existed are read by parsing the adapter names
(`<cell_id>@<step>`, core.cells.CellKey).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa

from ..core.cells import AdapterRef, CellKey
from ..core.errors import WsgError

F64, I64, STR = pa.float64(), pa.int64(), pa.string()

# The global_pairs metrics, and those with bootstrap CIs (<metric>_ci_low/high).
METRICS = ("cosine", "orth_frac_b_off_a", "orth_frac_a_off_b", "median_top1_angle_deg",
           "median_worst_angle_deg", "mean_u1_abs_dot", "mean_v1_abs_dot")
CI_METRICS = ("cosine", "orth_frac_b_off_a", "orth_frac_a_off_b", "median_top1_angle_deg")
CONTROLS = ("init_seed", "data_seed", "lr")

# Bootstrap over layers for the statistics computed here (norm ratios, the
# last-blocks orthogonal fraction): resamples and seed, recorded in metadata.
BOOT_N = 2000
BOOT_SEED = 0

# Convergence criterion (docs/findings.md "Convergence", with the reasons).
CONV_MIN_COS = 0.99        # direction: cos(ΔW at the comparison checkpoint, final ΔW)
CONV_MAX_GROWTH = 0.10     # norm: ‖ΔW_final‖ / ‖ΔW_comparison‖ − 1
CONV_MAX_STEP_FRAC = 0.8   # the comparison checkpoint is the last one at <= 80% of the final step


# --- identity -----------------------------------------------------------------
def identify(name: str) -> Optional[AdapterRef]:
    """The cell and step of an adapter name; None for `base` and for names
    that are not `<cell_id>@<step>` (adapters given by path)."""
    try:
        return AdapterRef.parse(str(name))
    except WsgError:
        return None


def row_ident(row: dict, side: str = "") -> Optional[AdapterRef]:
    """Identity of a table row's adapter (`side` "_a"/"_b" for pair tables):
    from the identity columns when the table has them, else from the name."""
    name = row["adapter" + side]
    parsed = identify(name)
    if "loss" + side not in row or (parsed is not None and parsed.cell.horizon is not None):
        # A horizon control carries its reference cell's identity columns; its name tells them apart.
        return parsed
    vals = [row.get(k + side) for k in ("loss", "init_seed", "data_seed", "lr", "step")]
    if any(v is None for v in vals) or vals[4] < 0:
        return None
    return AdapterRef(CellKey(vals[0], int(vals[1]), int(vals[2]), float(vals[3])), int(vals[4]), name)


def same_lr(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-9)


def control_kind(a: Optional[AdapterRef], b: Optional[AdapterRef]) -> Optional[str]:
    """"init_seed", "data_seed" or "lr" when a and b are the same loss at the
    same step and differ in exactly that factor; else None."""
    if a is None or b is None or a.cell.loss != b.cell.loss or a.step != b.step or a.cell.horizon != b.cell.horizon:
        return None
    x, y = a.cell, b.cell
    diff = [k for k, d in (("init_seed", x.init_seed != y.init_seed), ("data_seed", x.data_seed != y.data_seed),
                           ("lr", not same_lr(x.lr, y.lr))) if d]
    return diff[0] if len(diff) == 1 else None


def relevant_controls(a: CellKey, b: CellKey) -> tuple[str, ...]:
    """The control kinds whose floor a pair of cells must beat: the
    data-seed control always (a cross-loss pair shares init and data order;
    reshuffling the data is the noise it could carry), the LR control when
    the LRs differ (DPO trains at a scaled LR, seed §2), the init-seed
    control when the init seeds differ."""
    return (("data_seed",) + (("lr",) if not same_lr(a.lr, b.lr) else ())
            + (("init_seed",) if a.init_seed != b.init_seed else ()))


def matching_controls(pairs: Iterable[tuple[AdapterRef, AdapterRef]], kind: str, lr: float,
                      ratio: Optional[float] = None) -> list[tuple[AdapterRef, AdapterRef]]:
    """The control pairs of `kind` that match a claim or a table row: seed
    controls at the reference cell's LR; LR controls with one side at it,
    those whose LR ratio is nearest `ratio` (e.g. 10 for DPO at 0.1x)."""
    out = []
    for a, b in pairs:
        if control_kind(a, b) != kind:
            continue
        if kind != "lr" and not same_lr(a.cell.lr, lr):
            continue
        if kind == "lr" and not (same_lr(a.cell.lr, lr) or same_lr(b.cell.lr, lr)):
            continue
        out.append((a, b))
    if kind == "lr" and ratio and out:
        dist = {p: abs(abs(math.log(p[0].cell.lr / p[1].cell.lr)) - abs(math.log(ratio))) for p in out}
        out = [p for p in out if dist[p] <= min(dist.values()) + 1e-9]
    return out


def rows_of(table) -> list[dict]:
    if table is None:
        return []
    return table.to_pylist() if isinstance(table, pa.Table) else list(table)


# --- norms and a layer bootstrap ------------------------------------------------
def layer_sq_norms(adapter_modules) -> dict[str, dict[int, float]]:
    """adapter -> {layer: Σ_modules ‖ΔW_j‖_F²}."""
    out: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for r in rows_of(adapter_modules):
        out[r["adapter"]][int(r["layer"])] += float(r["fro_norm"]) ** 2
    return {k: dict(v) for k, v in out.items()}


def global_norms(adapter_modules) -> dict[str, float]:
    """adapter -> global ‖ΔW‖_F = sqrt(Σ_j ‖ΔW_j‖_F²)."""
    return {k: math.sqrt(sum(v.values())) for k, v in layer_sq_norms(adapter_modules).items()}


def ratio_ci(num: Iterable[float], den: Iterable[float], *, root: bool = True, n_boot: int = BOOT_N,
             seed: int = BOOT_SEED, level: float = 0.95) -> tuple[float, float, float]:
    """Σ num / Σ den over layers (its square root with `root`) and its
    percentile bootstrap CI, layers resampled with replacement (the modules
    of a layer stay together, as the global_pairs CIs do). Used for norm
    ratios (num, den = the two adapters' per-layer ‖ΔW‖², root), an
    orthogonal fraction over a set of layers (num = f_l² ‖ΔW_b,l‖², den =
    ‖ΔW_b,l‖², root), a mean over modules (num = per-layer sums, den =
    per-layer counts) and a mean over layers (den = 1)."""
    num, den = np.asarray(list(num), np.float64), np.asarray(list(den), np.float64)
    if not len(num) or den.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    f = np.sqrt if root else (lambda x: x)
    value = float(f(num.sum() / den.sum()))
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    with np.errstate(divide="ignore", invalid="ignore"):
        stats = f(num[idx].sum(1) / den[idx].sum(1))
    stats = stats[np.isfinite(stats)]
    q = (1 - level) / 2
    if not len(stats):
        return value, float("nan"), float("nan")
    return value, float(np.quantile(stats, q)), float(np.quantile(stats, 1 - q))


# --- noise floors ------------------------------------------------------------------
NOISE_FLOORS = pa.schema(
    [("loss", STR), ("control", STR), ("step", I64), ("adapter_a", STR), ("adapter_b", STR),
     ("init_seed_a", I64), ("init_seed_b", I64), ("data_seed_a", I64), ("data_seed_b", I64),
     ("lr_a", F64), ("lr_b", F64)]
    + [(m, F64) for m in METRICS]
    + [(f"{m}_ci_{s}", F64) for m in CI_METRICS for s in ("low", "high")]
    + [("norm_a", F64), ("norm_b", F64)])


def noise_floors(global_pairs, adapter_modules=None) -> pa.Table:
    """One row per loss x control kind x pair: the global_pairs metrics (and
    their CIs) of two cells of one loss at one step that differ only in the
    init seed, only in the data seed, or only in the LR. With
    adapter_modules, also both global norms (norm_a, norm_b)."""
    norms = global_norms(adapter_modules) if adapter_modules is not None else {}
    out = []
    for r in rows_of(global_pairs):
        a, b = row_ident(r, "_a"), row_ident(r, "_b")
        kind = control_kind(a, b)
        if kind is None:
            continue
        x, y = a.cell, b.cell
        row = {"loss": x.loss, "control": kind, "step": a.step, "adapter_a": a.name, "adapter_b": b.name,
               "init_seed_a": x.init_seed, "init_seed_b": y.init_seed, "data_seed_a": x.data_seed,
               "data_seed_b": y.data_seed, "lr_a": x.lr, "lr_b": y.lr,
               "norm_a": norms.get(a.name), "norm_b": norms.get(b.name)}
        for m in METRICS:
            row[m] = r.get(m)
        for m in CI_METRICS:
            for s in ("low", "high"):
                row[f"{m}_ci_{s}"] = r.get(f"{m}_ci_{s}")
        out.append(row)
    out.sort(key=lambda x: (x["loss"], CONTROLS.index(x["control"]), x["step"], x["adapter_a"], x["adapter_b"]))
    return pa.Table.from_pylist(out, schema=NOISE_FLOORS)


# --- convergence --------------------------------------------------------------------
CONVERGENCE = pa.schema([
    ("cell", STR), ("loss", STR), ("init_seed", I64), ("data_seed", I64), ("lr", F64), ("step", I64),
    ("adapter", STR), ("final_step", I64), ("norm", F64), ("norm_ratio_prev", F64), ("norm_frac_final", F64),
    ("cos_prev", F64), ("cos_final", F64), ("seed_partner", STR), ("seed_cosine", F64), ("seed_u1", F64),
    ("seed_v1", F64), ("converged", pa.bool_()), ("criterion", STR),
])


class PairIndex:
    """global_pairs rows by unordered adapter pair."""

    def __init__(self, global_pairs):
        self.rows = {}
        for r in rows_of(global_pairs):
            self.rows[frozenset((r["adapter_a"], r["adapter_b"]))] = r

    def get(self, a: str, b: str) -> Optional[dict]:
        return self.rows.get(frozenset((a, b)))

    def value(self, a: str, b: str, col: str) -> Optional[float]:
        r = self.get(a, b)
        v = None if r is None else r.get(col)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def adapter_idents(adapter_modules) -> dict[str, AdapterRef]:
    out = {}
    for r in rows_of(adapter_modules):
        if r["adapter"] not in out:
            ident = row_ident(r)
            if ident is not None:
                out[r["adapter"]] = ident
    return out


def converged_verdict(steps: list[int], norms: dict[int, float], cos_to_final: dict[int, Optional[float]]
                      ) -> tuple[bool, str]:
    """The per-cell criterion (docs/findings.md "Convergence"): with c the last
    checkpoint at <= CONV_MAX_STEP_FRAC of the final step K, converged iff
    cos(ΔW_c, ΔW_K) >= CONV_MIN_COS and ‖ΔW_K‖/‖ΔW_c‖ − 1 <= CONV_MAX_GROWTH,
    and, when a checkpoint e < c exists, the per-step log growth of the norm
    over (c, K] is no larger than over (e, c] (growth slowing)."""
    if len(steps) < 2:
        return False, ("not assessable: one checkpoint analysed; needs two or more "
                       "(train.checkpoint_steps, analysis.steps: all)")
    final = steps[-1]
    early = [s for s in steps[:-1] if s <= CONV_MAX_STEP_FRAC * final]
    if not early:
        return False, (f"not assessable: no checkpoint at <= {CONV_MAX_STEP_FRAC:.0%} of the final step {final} "
                       f"(have {steps}); add an earlier train.checkpoint_steps entry")
    c = early[-1]
    cos, n_c, n_k = cos_to_final.get(c), norms.get(c, 0.0), norms.get(final, 0.0)
    if cos is None or not (n_c > 0 and n_k > 0):
        return False, f"not assessable: ΔW is zero or the pair ({c}, {final}) is not in global_pairs"
    growth = n_k / n_c - 1
    ok_dir, ok_norm = cos >= CONV_MIN_COS, growth <= CONV_MAX_GROWTH
    why = (f"cos(step {c}, step {final}) = {cos:.4f} {'>=' if ok_dir else '<'} {CONV_MIN_COS}, "
           f"norm growth {growth:+.1%} {'<=' if ok_norm else '>'} {CONV_MAX_GROWTH:.0%}")
    ok = ok_dir and ok_norm
    before = [s for s in steps if s < c and norms.get(s, 0.0) > 0]
    if before:
        e = before[-1]
        rate_last = math.log(n_k / n_c) / (final - c)
        rate_prev = math.log(n_c / norms[e]) / (c - e)
        slowing = rate_last <= rate_prev
        why += (f", log-norm growth per step {rate_last:.2e} over ({c}, {final}] {'<=' if slowing else '>'} "
                f"{rate_prev:.2e} over ({e}, {c}]")
        ok = ok and slowing
    else:
        why += "; slowing not checkable (no checkpoint before the comparison one)"
    return ok, ("converged: " if ok else "not converged: ") + why


def convergence(adapter_modules, global_pairs) -> pa.Table:
    """Per cell (loss, init seed, data seed, LR) and checkpoint step: global
    ‖ΔW‖_F, its ratio to the previous checkpoint and to the final one, cosine
    with the previous and with the final checkpoint's ΔW, agreement (cosine,
    mean |u1·u1'|, |v1·v1'|) with the same loss at another init seed (same LR
    and step; same data seed preferred), and the cell's `converged` flag with
    the numbers behind it (`criterion`)."""
    idents = adapter_idents(adapter_modules)
    norms = global_norms(adapter_modules)
    pairs = PairIndex(global_pairs)
    by_cell: dict[CellKey, dict[int, str]] = defaultdict(dict)
    for name, i in idents.items():
        if i.cell.horizon is None:  # a horizon control has one analysed checkpoint: the settle rule reads it
            by_cell[i.cell][i.step] = name
    out = []
    for cell in sorted(by_cell, key=lambda c: (c.loss, c.init_seed, c.data_seed, c.lr)):
        names = by_cell[cell]
        steps = sorted(names)
        final = names[steps[-1]]
        n = {s: norms.get(names[s], 0.0) for s in steps}
        cos_final = {s: (1.0 if n[s] > 0 else None) if names[s] == final else pairs.value(names[s], final, "cosine")
                     for s in steps}
        ok, why = converged_verdict(steps, n, cos_final)
        for k, s in enumerate(steps):
            prev = steps[k - 1] if k else None
            partner = _seed_partner(idents, idents[names[s]])
            out.append({
                "cell": cell.id, "loss": cell.loss, "init_seed": cell.init_seed, "data_seed": cell.data_seed,
                "lr": cell.lr, "step": s, "adapter": names[s], "final_step": steps[-1], "norm": n[s],
                "norm_ratio_prev": n[s] / n[prev] if prev is not None and n[prev] > 0 else None,
                "norm_frac_final": n[s] / n[steps[-1]] if n[steps[-1]] > 0 else None,
                "cos_prev": pairs.value(names[prev], names[s], "cosine") if prev is not None else None,
                "cos_final": cos_final[s], "seed_partner": partner,
                "seed_cosine": pairs.value(names[s], partner, "cosine") if partner else None,
                "seed_u1": pairs.value(names[s], partner, "mean_u1_abs_dot") if partner else None,
                "seed_v1": pairs.value(names[s], partner, "mean_v1_abs_dot") if partner else None,
                "converged": ok, "criterion": why})
    return pa.Table.from_pylist(out, schema=CONVERGENCE)


def _seed_partner(idents: dict[str, AdapterRef], me: AdapterRef) -> Optional[str]:
    """The same loss at another init seed, same LR and step (same data seed first)."""
    c = me.cell
    cands = [i for i in idents.values() if i.cell.loss == c.loss and i.step == me.step and same_lr(i.cell.lr, c.lr)
             and i.cell.init_seed != c.init_seed and i.cell.horizon == c.horizon]
    cands.sort(key=lambda i: (i.cell.data_seed != c.data_seed, i.cell.init_seed, i.cell.data_seed))
    return cands[0].name if cands else None
