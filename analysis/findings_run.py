"""The findings stage of a run: its noise floors and convergence
(analysis/findings.py) and the claims table, each claim of the seed paper
(analysis/claims_defs.py) judged by the rule of analysis/claims.py; written
to geometry/noise_floors, convergence and claims (.parquet), docs/findings.md."""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Optional

import pyarrow as pa

from ..core import rundir
from ..core.config import config_hash
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..rollouts.teacher import read_teacher_profile
from .claims import CLAIMS_SCHEMA, RULE, Ctx, Measure, judge
from .claims_defs import CLAIMS
from .findings import (
    BOOT_N,
    BOOT_SEED,
    CONV_MAX_GROWTH,
    CONV_MAX_STEP_FRAC,
    CONV_MIN_COS,
    convergence,
    identify,
    noise_floors,
)
from .settle import above_the_agreement, agreement_note, settle


def claims_table(tables: dict, *, reference_loss: str = "sft", lr_scales: Optional[dict] = None) -> pa.Table:
    """The claims table from a run's tables (pa.Table or row lists, any may be
    None): global_pairs, layer_pairs, adapter_modules, mcnemar, lmc, cka,
    convergence. lr_scales: loss -> losses.<name>.lr_scale of the config."""

    ctx = Ctx(tables, reference_loss, lr_scales)
    out = []
    for spec in CLAIMS:
        now, prev = spec.measure(ctx, 0), spec.measure(ctx, 1)
        for label in now:
            out.append(_row(ctx, spec, label, now[label], prev.get(label)))
    return pa.Table.from_pylist(out, schema=CLAIMS_SCHEMA)


def _cross_loss_cosine(spec) -> bool:
    return spec.id.endswith(".cosine") and not spec.id.startswith("seed.")


def _at_the_agreement(spec, m: Measure, st, verdict: str) -> str:
    """A failed lower bound that the same-loss agreement misses too (analysis/settle.py)."""
    if verdict != "fails" or spec.test.kind != "above" or st is None:
        return ""
    return above_the_agreement(st, spec.test.lo, m.value if m.ci_high is None else m.ci_high)


def _row(ctx: Ctx, spec, label: str, m: Measure, p: Optional[Measure]) -> dict:
    verdict, why = judge(m, spec.test, spec.floor_mode)
    st = settle(ctx, m.step, m.cells, spec.settle) if verdict != "not_measured" else None
    if _cross_loss_cosine(spec) and (at_agreement := _at_the_agreement(spec, m, st, verdict)):
        verdict, why = "inconclusive", at_agreement
    notes = [why] if why else []
    if st is not None and not st.settled:
        notes.insert(0, f"{st.note()} (settled, it would read {verdict})")
        verdict = "unsettled"
    if st is not None and _cross_loss_cosine(spec):
        notes.append(agreement_note(st, m.value))
    notes += m.notes
    vp = judge(p, spec.test, spec.floor_mode)[0] if p is not None and not p.missing else None
    if vp == "fails" and _cross_loss_cosine(spec):
        vp = "inconclusive" if _at_the_agreement(spec, p, settle(ctx, p.step, p.cells, spec.settle), vp) else vp
    if vp and verdict != "not_measured" and vp != verdict:
        notes.append(f"verdict at the previous step {p.step} was {vp}: not settled")
    conv = None
    if ctx.has_conv and m.cells:
        cells = {i.cell.id for n in m.cells if (i := identify(n)) is not None}
        if all(c in ctx.conv for c in cells):
            conv = all(ctx.conv[c] for c in cells)
            if not conv:
                notes.append("not converged: " + ", ".join(sorted(c for c in cells if not ctx.conv[c])))
    return {"claim": spec.id + (f"[{label}]" if label else ""), "statement": spec.statement,
            "paper_value": spec.paper_value, "test": spec.test.text(), "step": m.step, "value": m.value,
            "ci_low": m.ci_low, "ci_high": m.ci_high, "noise_floor": m.floor if spec.floor_mode else None,
            "floor_kind": m.floor_what if spec.floor_mode else "", "verdict": verdict, "cells": m.cells,
            "cells_converged": conv, "prev_step": p.step if p is not None and not p.missing else None,
            "value_prev": p.value if p is not None and not p.missing else None, "verdict_prev": vp,
            "note": "; ".join(x for x in notes if x), "settled": None if st is None else st.settled,
            "settle_kind": spec.settle, "order_agreement": None if st is None else st.order,
            "horizon_agreement": None if st is None else st.horizon}


# --- the run-level entry point -------------------------------------------------------
def _metadata(config_hash: str, extra: dict) -> dict:
    md = {b"wsg.config_hash": (config_hash or "").encode(),
          b"wsg.bootstrap": json.dumps({"n_resamples": BOOT_N, "seed": BOOT_SEED, "unit": "layer",
                                        "level": 0.95}).encode(),
          b"wsg.convergence_criterion": json.dumps({"min_cos": CONV_MIN_COS, "max_norm_growth": CONV_MAX_GROWTH,
                                                    "max_step_frac": CONV_MAX_STEP_FRAC}).encode()}
    md.update({k.encode(): json.dumps(v).encode() for k, v in extra.items()})
    return md


def _read(path: str) -> Optional[pa.Table]:
    return rundir.read_table(path) if rundir.exists(path) else None


def run_findings(cfg, run: str | RunLayout) -> dict:
    """Read the run's geometry, eval and functional tables; write
    geometry/noise_floors, geometry/convergence and geometry/claims (.parquet);
    return a summary. Needs geometry/global_pairs and adapter_modules; the
    eval and functional tables are optional (claims needing them read
    not_measured)."""

    lay = RunLayout.of(run)
    geo = {k: _read(lay.geometry_table(k)) for k in ("adapter_modules", "layer_pairs", "global_pairs")}
    missing = [k for k in ("adapter_modules", "global_pairs") if geo[k] is None]
    if missing:
        raise WsgError(f"findings need {', '.join(lay.relative(lay.geometry_table(k)) for k in missing)}: "
                       "run the geometry stage first (`wsg geometry --run RUN`)")
    tables = dict(geo)
    mp = lay.geometry_table("module_pairs")
    if rundir.exists(mp):  # per-module u1/v1 dots: their layer-bootstrap CIs
        tables["module_pairs"] = rundir.read_table(mp, columns=["adapter_a", "adapter_b", "layer", "u1_abs_dot",
                                                                "v1_abs_dot"])
    tables.update({k: _read(lay.eval_table(k)) for k in ("accuracy", "mcnemar")})
    tables.update({k: _read(lay.functional_table(k)) for k in ("lmc", "cka")})
    floors = noise_floors(geo["global_pairs"], geo["adapter_modules"])
    conv = convergence(geo["adapter_modules"], geo["global_pairs"])
    tables.update(noise_floors=floors, convergence=conv)
    losses = set(cfg.grid.losses) | {c.loss for c in cfg.grid.extra_cells}
    claims = claims_table(tables, reference_loss=cfg.analysis.reference_loss,
                            lr_scales={x: cfg.loss_cfg(x).lr_scale for x in losses})
    # The claims' context: who wrote the rollouts and what they are like.
    teacher = read_teacher_profile(cfg, lay)
    md = _metadata(config_hash(cfg), {"wsg.claims_rule": RULE, "wsg.teacher": teacher})
    out = {"noise_floors": floors, "convergence": conv, "claims": claims}
    for name, table in out.items():
        rundir.write_table(lay.geometry_table(name), table.replace_schema_metadata(md))
    cells = {r["cell"]: r["converged"] for r in conv.to_pylist()}
    verdicts = defaultdict(int)
    for v in claims.column("verdict").to_pylist():
        verdicts[v] += 1
    return {"noise_floor_pairs": floors.num_rows, "cells": len(cells),
            "converged_cells": sum(1 for v in cells.values() if v), "claims": dict(verdicts), "teacher": teacher,
            "claims_settled": sum(1 for v in claims.column("settled").to_pylist() if v), "n_claims": claims.num_rows,
            "tables": {k: lay.relative(lay.geometry_table(k)) for k in out}}
