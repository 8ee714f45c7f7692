"""Whether a claim's cells have settled (docs/findings.md "Settled").

A claim about a moving update is neither confirmed nor refuted by it: such a
claim gets the verdict `unsettled` (its value and CI still shown). Settled
must not be something the LR schedule alone produces: a cosine schedule
freezes ΔW over its last fifth whatever the data, so cos(ΔW_t, ΔW_T) near 1
within one cell proves nothing. The evidence used instead, per loss whose
cells the claim reads (the reference loss stands in for a loss without its
own controls):

- order: the data-order control (same loss, init and LR; another data seed)
  agrees with its reference cell at the claim's step, cos >= ORDER_MIN_COS:
  the update no longer depends on which samples came last;
- horizon: the horizon control (the same cell on a shorter schedule ending at
  grid.controls.horizons x train.max_steps) ends where the full cell ends,
  cos(ΔW_H, ΔW_T) >= HORIZON_MIN_COS: a schedule stopped earlier reaches the
  same update, so the full one is not just frozen mid-flight.

Direction claims (cosines, angles, orthogonal fractions, u1/v1) need both
checks on direction; norm claims (norm ratios) need the data-order control's
‖ΔW‖ within NORM_MAX_DEV of its reference's (the horizon control's norm is
reported, not required: under Adam the norm follows the schedule's cumulative
LR even once the loss is flat, so a shorter schedule always ends ~20% shorter);
claims about the model's function (accuracy, LMC, CKA) need both. A missing control makes a claim unsettled, with the
note naming the `grid.controls` entry to add.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .findings import identify

ORDER_MIN_COS = 0.9     # data-order control vs its reference, same step
HORIZON_MIN_COS = 0.9   # horizon control's final ΔW vs the reference's final ΔW
NORM_MAX_DEV = 0.10     # | ‖ΔW_control‖ / ‖ΔW_reference‖ − 1 |
KINDS = ("direction", "norm", "function")
RULE = (f"settled iff, per loss the claim reads (or the reference loss), the data-order control agrees with its "
        f"reference at the claim's step (cos >= {ORDER_MIN_COS}) and the horizon control's final ΔW matches the "
        f"reference's (cos >= {HORIZON_MIN_COS}); norm claims: the data-order control's norm within "
        f"{NORM_MAX_DEV:.0%} of its reference's; function claims: both")


@dataclass
class Settle:
    settled: bool = False
    order: Optional[float] = None        # min data-order cosine at the claim's step
    order_max: Optional[float] = None
    n_order: int = 0
    horizon: Optional[float] = None      # min horizon cosine
    reasons: list = field(default_factory=list)

    def note(self) -> str:
        return "; ".join(self.reasons)


def _norm(ctx, name: str) -> Optional[float]:
    sq = ctx.layer_sq.get(name)
    return math.sqrt(sum(sq.values())) if sq else None


def _dev(ctx, a: str, b: str) -> Optional[float]:
    na, nb = _norm(ctx, a), _norm(ctx, b)
    return None if not na or not nb else abs(na / nb - 1)


def _cos(ctx, a: str, b: str) -> Optional[float]:
    got = ctx.g(a, b, "cosine")
    return None if got is None else got[0]


def _losses(ctx, cells: list) -> list[str]:
    """The losses whose controls speak for the claim's cells."""

    losses = {i.cell.loss for n in cells if (i := identify(n)) is not None}
    own = {x for x in losses if ctx.has_controls(x)}
    return sorted(own | {ctx.ref})


def settle(ctx, step: Optional[int], cells: list, kind: str) -> Settle:
    """The settle rule for a claim measured at `step` on adapters `cells`."""

    s = Settle()
    if step is None:
        s.reasons.append("no step measured")
        return s
    check = _Check(ctx, s, step, direction=kind in ("direction", "function"), norm=kind in ("norm", "function"))
    ok = True
    orders = []
    for loss in _losses(ctx, cells):
        base = ctx.cell(loss)
        if base is None or step not in ctx.by_cell.get(base, {}):
            s.reasons.append(f"no {loss} cell at step {step} to check settling against")
            ok = False
            continue
        # Both checks run (each names what it misses), data order first.
        ok &= check.order(loss, base, orders)
        ok &= check.horizon(loss, base)
    if orders:
        s.order, s.order_max, s.n_order = min(orders), max(orders), len(orders)
    s.settled = ok
    return s


@dataclass
class _Check:
    """The two checks of one claim's settle rule, their reasons added to `s`."""

    ctx: object
    s: Settle
    step: int
    direction: bool  # check directions (cosines)
    norm: bool       # check norms

    def order(self, loss: str, base, orders: list) -> bool:
        """The data-order control agrees with its reference at the step (its cosines added to `orders`)."""
        ctx, s, step = self.ctx, self.s, self.step
        ok = True
        ref = ctx.name(base, step)
        pairs = ctx.control_pairs(loss, step, "data_seed", base.lr)
        pairs = [p for p in pairs if ref in p]
        if not pairs:
            s.reasons.append(f"unsettled: needs a data-order control of {loss} (grid.controls.data_seeds) to show "
                             "the update no longer depends on which samples came last")
            ok = False
        for a, b in pairs:
            c = _cos(ctx, a, b)
            other = b if a == ref else a
            if c is not None:
                orders.append(c)
            if self.direction and (c is None or c < ORDER_MIN_COS):
                s.reasons.append(f"unsettled: {loss}'s data-order control agrees with its reference at cos "
                                 f"{'n/a' if c is None else f'{c:.3g}'} < {ORDER_MIN_COS} at step {step}")
                ok = False
            d = _dev(ctx, ref, other)
            if self.norm and (d is None or d > NORM_MAX_DEV):
                s.reasons.append(f"unsettled: {loss}'s data-order control's norm differs by "
                                 f"{'n/a' if d is None else f'{d:.0%}'} > {NORM_MAX_DEV:.0%}")
                ok = False
        return ok

    def horizon(self, loss: str, base) -> bool:
        """The horizon control's final ΔW matches the reference's final one."""
        ctx, s, step = self.ctx, self.s, self.step
        final = max(ctx.by_cell[base])
        hz = ctx.horizons.get(base)
        if not hz:
            s.reasons.append(f"unsettled: needs a horizon control of {loss} (grid.controls.horizons, e.g. [0.75]) "
                             "to tell a settled update from one the LR schedule froze")
            return False
        if step != final:
            s.reasons.append(f"unsettled: the claim's step {step} is not {loss}'s final step {final}, which the "
                             "horizon control is compared with")
            return False
        ok = True
        h_name = hz[max(hz)]
        h_steps = identify(h_name).cell.horizon
        c = _cos(ctx, h_name, ctx.name(base, final))
        if c is not None:
            s.horizon = c if s.horizon is None else min(s.horizon, c)
        if self.direction and (c is None or c < HORIZON_MIN_COS):
            s.reasons.append(f"unsettled: {loss} trained to step {h_steps} instead of {final} ends elsewhere "
                             f"(cos {'n/a' if c is None else f'{c:.3g}'} < {HORIZON_MIN_COS})")
            ok = False
        # The horizon's norm is reported, not required: under Adam ‖ΔW‖ follows the schedule's cumulative
        # LR whether or not the loss has flattened (docs/findings.md "Settled": 0.76 of the full norm at
        # 0.75x while the loss still falls, 0.77-0.80 once it is flat), so it cannot tell the two apart.
        na, nb = _norm(ctx, h_name), _norm(ctx, ctx.name(base, final))
        if self.norm and na and nb:
            s.reasons.append(f"{loss}'s norm at horizon {h_steps} is {na / nb:.2f} of step {final}'s (reported, "
                             "not required: the norm follows the schedule)")
        return ok


def agreement_note(s: Settle, value: Optional[float]) -> str:
    """A cross-loss similarity read against the same-loss (data-order) agreement."""
    if s.order is None or value is None:
        return ""
    spread = (f" (range {s.order:.3g}-{s.order_max:.3g} over {s.n_order} data-order pairs)"
              if s.n_order > 1 else " (one data-order pair: no spread)")
    ratio = f"; value / agreement = {value / s.order:.3g}" if s.order > 0 else ""
    return f"same-loss agreement (data-order cos) {s.order:.3g}{spread}{ratio}"


def above_the_agreement(s: Settle, bound: float, ci_high: Optional[float]) -> str:
    """Why a cross-loss similarity that misses a lower bound is no failure, or "".

    Two runs of the *same* loss that differ only in data order agree to
    cos = s.order; no pair of losses can be expected to agree more. When the
    paper's bound (§3.2: SFT/RFT/RIFT >= 0.97, measured after 1,000 steps)
    lies above that agreement, and the cross-loss CI reaches it, the losses
    are as close as the run's own noise lets any two updates be: the run
    cannot tell "colinear" from "not", so the verdict is inconclusive, not
    fails (docs/findings.md "Settled")."""
    if not s.settled or s.order is None or ci_high is None or s.order >= bound or ci_high < s.order:
        return ""
    return (f"the bound {bound:g} lies above the same-loss agreement {s.order:.3g} (two SFT runs on another "
            f"data order), which the CI reaches (upper {ci_high:.3g}): no pair of losses can pass it in this run")
