"""The loss registry: config name → function, the data it consumes, and the
unit its one normaliser counts (docs/design.md "Losses", docs/losses.md).

How a trainer uses it, per optimizer step over a global batch split into
micro-batches (and ranks):

    spec = get_loss(cfg.loss, cfg.variant)
    hyper = validate_hyper(cfg.loss, cfg.variant, cfg.loss_hyper)
    total = Σ over micro-batches and ranks of count_units(spec, mb, hyper)
    normaliser = normaliser_from_count(total)        # all-reduce `total` first
    for mb in micro_batches:
        check_batch(spec, mb, hyper)
        loss, metrics = spec.fn(mb, normaliser=normaliser, **hyper)
        loss.backward()                               # grads add up exactly

Every loss returns Σ(per-unit terms of its micro-batch) / normaliser, so the
accumulated gradient equals the whole batch's gradient however the batch is
split (tests/train/test_losses.py checks this for every loss). Group-relative
losses compute advantages from `rewards`/`group_ids` inside the micro-batch,
which needs whole groups per micro-batch; when a group is split, precompute
`LossBatch.advantages` with `precompute_advantages` over the whole group.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..core.errors import WsgError
from .losses_batch import LossBatch, is_positive
from .losses_offline import (
    dft_loss,
    dpo_loss,
    ipo_loss,
    krafton_grpo_advantages,
    offline_grpo_krafton_loss,
    offline_grpo_loss,
    rft_loss,
    rift_loss,
    rift_seed_linear_loss,
    seed_grpo_advantages,
    sft_loss,
    simpo_loss,
)
from .losses_online import (
    group_advantages,
    online_dapo_loss,
    online_grpo_loss,
    overlong_penalty,
)

__all__ = [
    "LOSSES",
    "UNITS",
    "LossBatch",
    "LossSpec",
    "check_batch",
    "count_units",
    "get_loss",
    "is_online",
    "loss_names",
    "normaliser_for",
    "normaliser_from_count",
    "overlong_penalty",
    "precompute_advantages",
    "validate_hyper",
]

#: What `normaliser` counts. positive_sequences: rows with r ≥ positive_threshold.
UNITS = ("sequences", "positive_sequences", "tokens", "pairs")


def _signature_defaults(fn: Callable) -> dict[str, Any]:
    """The keyword hyperparameters of a loss, read from its signature so the
    defaults live in exactly one place."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "normaliser":
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: hyperparameter {p.name} needs a default")
            out[p.name] = p.default
    return out


@dataclass(frozen=True)
class LossSpec:
    """A registered loss (or one of its variants).

    needs: LossBatch fields the loss reads besides logprobs and mask.
    needs_when: {hyper: field}, a field needed only when that hyper is > 0.
    unit: what the normaliser counts (one of UNITS).
    advantage_fn: for group-relative losses, the function of (rewards,
        group_ids, **its hyper) the loss applies inside a micro-batch; a
        precomputed LossBatch.advantages then replaces rewards+group_ids.
    variants: named alternative forms (each a LossSpec with `variant` set).
    online: trained on the policy's own samples (train/online.py) instead of
        the shared rollouts.
    dynamic_sampling / overlong_shaping: DAPO's (Yu et al. 2025) drop-and-
        refill of all-0/all-1 groups and its overlong reward shaping and
        filtering (online.overlong_*), which the on-policy source applies.

    The registry is the single source of what a loss is: config validation,
    training data, the grid and the cells all ask it (docs/design.md).
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    needs: frozenset[str]
    unit: str
    online: bool = False
    dynamic_sampling: bool = False
    overlong_shaping: bool = False
    needs_when: Mapping[str, str] = field(default_factory=dict)
    advantage_fn: Callable[..., torch.Tensor] | None = None
    variants: Mapping[str, "LossSpec"] = field(default_factory=dict)
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"{self.name}: unit {self.unit!r} not in {UNITS}")

    @property
    def defaults(self) -> dict[str, Any]:
        return _signature_defaults(self.fn)

    @property
    def paired(self) -> bool:
        """Trains on (chosen, rejected) pairs (pairs.parquet)."""
        return self.unit == "pairs"

    @property
    def data(self) -> str:
        """What the cell trains on: "rollouts", "pairs" or "on_policy"."""
        return "on_policy" if self.online else "pairs" if self.paired else "rollouts"

    @property
    def label(self) -> str:
        return self.name if self.variant is None else f"{self.name}/{self.variant}"


def _variant(base_name: str, variant: str, **kw) -> LossSpec:
    return LossSpec(name=base_name, variant=variant, **kw)


_GROUP = frozenset({"rewards", "group_ids"})

LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec("sft", sft_loss, frozenset(), "sequences"),
    "rft": LossSpec("rft", rft_loss, frozenset({"rewards"}), "positive_sequences"),
    "dft": LossSpec("dft", dft_loss, frozenset(), "tokens"),
    "rift": LossSpec(
        "rift",
        rift_loss,
        frozenset({"rewards"}),
        "sequences",
        variants={
            "seed_linear": _variant(
                "rift", "seed_linear", fn=rift_seed_linear_loss, needs=frozenset({"rewards"}), unit="sequences"
            )
        },
    ),
    "offline_grpo": LossSpec(
        "offline_grpo",
        offline_grpo_loss,
        _GROUP,
        "sequences",
        advantage_fn=seed_grpo_advantages,
        variants={
            "krafton": _variant(
                "offline_grpo",
                "krafton",
                fn=offline_grpo_krafton_loss,
                needs=_GROUP,
                unit="sequences",
                advantage_fn=krafton_grpo_advantages,
            )
        },
    ),
    "dpo": LossSpec("dpo", dpo_loss, frozenset({"pair_index", "ref_logprobs"}), "pairs"),
    "ipo": LossSpec("ipo", ipo_loss, frozenset({"pair_index", "ref_logprobs"}), "pairs"),
    "simpo": LossSpec("simpo", simpo_loss, frozenset({"pair_index"}), "pairs"),
    "online_grpo": LossSpec(
        "online_grpo",
        online_grpo_loss,
        _GROUP | {"behaviour_logprobs"},
        "sequences",
        online=True,
        needs_when={"kl_coef": "ref_logprobs"},
        advantage_fn=group_advantages,
    ),
    "online_dapo": LossSpec(
        "online_dapo",
        online_dapo_loss,
        _GROUP | {"behaviour_logprobs"},
        "tokens",
        online=True,
        dynamic_sampling=True,
        overlong_shaping=True,
        needs_when={"kl_coef": "ref_logprobs"},
        advantage_fn=group_advantages,
    ),
}


def get_loss(name: str, variant: str | None = None) -> LossSpec:
    """The spec of `name` (or of its `variant`); unknown names fail listing
    the valid ones."""
    if name not in LOSSES:
        raise WsgError(f"unknown loss {name!r}; valid losses: {', '.join(LOSSES)}")
    spec = LOSSES[name]
    if variant is None:
        return spec
    if variant not in spec.variants:
        valid = ", ".join(sorted(spec.variants)) or "none (this loss has no variants)"
        raise WsgError(f"loss {name!r} has no variant {variant!r}; valid variants: {valid}")
    return spec.variants[variant]


def loss_names(*, online: bool | None = None) -> tuple[str, ...]:
    """Registered loss names in registry order; only the online (True) or
    offline (False) ones when asked."""
    return tuple(n for n, s in LOSSES.items() if online is None or s.online == online)


def is_online(name: str) -> bool:
    return get_loss(name).online


def _same_kind(value: Any, default: Any) -> bool:
    """bool only for bool; int or float for float; else the default's type."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def validate_hyper(name: str, variant: str | None = None, hyper: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full keyword hyperparameters: defaults updated by `hyper`. Unknown
    names, and values whose type differs from the default's, are refused."""
    spec = get_loss(name, variant)
    defaults = spec.defaults
    hyper = dict(hyper or {})
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        valid = ", ".join(sorted(defaults)) or "none"
        raise WsgError(f"loss {spec.label!r}: unknown hyperparameter(s) {unknown}; valid: {valid}")
    out = dict(defaults)
    for k, v in hyper.items():
        d = defaults[k]
        if not _same_kind(v, d):
            raise WsgError(
                f"loss {spec.label!r}: hyperparameter {k}={v!r} has type {type(v).__name__}; "
                f"expected {type(d).__name__} like the default {d!r}"
            )
        out[k] = float(v) if isinstance(d, float) else v
    return out


def hyper_problems(name: str, variant: str | None, hyper: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, problem) for each bad entry of a loss's config, for config
    validation to name `losses.<name>.<key>` (core/config.py): an unknown
    variant, an unknown hyperparameter, a value of the wrong type."""
    spec = LOSSES[name]
    if variant is not None and variant not in spec.variants:
        valid = ", ".join(sorted(spec.variants)) or "none (this loss has no variants)"
        return [("variant", f"loss {name!r} has no variant {variant!r}; valid variants: {valid}")]
    spec = spec if variant is None else spec.variants[variant]
    defaults, out = spec.defaults, []
    for k, v in (hyper or {}).items():
        if k not in defaults:
            valid = ", ".join(sorted(defaults)) or "none"
            out.append((f"hyper.{k}", f"unknown hyperparameter of {spec.label!r}; valid: {valid}"))
        elif not _same_kind(v, defaults[k]):
            out.append((f"hyper.{k}", f"{v!r} has type {type(v).__name__}; expected {type(defaults[k]).__name__} "
                                      f"like the default {defaults[k]!r}"))
    return out


def required_fields(spec: LossSpec, hyper: Mapping[str, Any]) -> frozenset[str]:
    """The fields `spec` reads with these hyperparameters."""
    extra = {f for h, f in spec.needs_when.items() if float(hyper.get(h, 0) or 0) > 0}
    return spec.needs | extra


def check_batch(spec: LossSpec, batch: LossBatch, hyper: Mapping[str, Any] | None = None) -> None:
    """Fail naming the fields `spec` needs that `batch` lacks. A precomputed
    `advantages` stands in for rewards+group_ids of group-relative losses."""
    hyper = validate_hyper(spec.name, spec.variant, hyper)
    need = set(required_fields(spec, hyper))
    if spec.advantage_fn is not None and batch.advantages is not None:
        need -= _GROUP
    if spec.unit == "positive_sequences":
        need.add("rewards")
    missing = sorted(need - batch.present())
    if missing:
        raise WsgError(
            f"loss {spec.label!r} needs LossBatch field(s) {missing} (it reads {sorted(need)}); "
            f"this batch has {sorted(batch.present()) or 'none'}"
        )


def count_units(spec: LossSpec, batch: LossBatch, hyper: Mapping[str, Any] | None = None) -> int:
    """How many of `spec.unit` this micro-batch holds; the trainer sums this
    over all micro-batches and ranks of an optimizer step."""
    if spec.unit == "sequences":
        return int(batch.logprobs.shape[0])
    if spec.unit == "tokens":
        return int(batch.mask.bool().sum())
    if spec.unit == "pairs":
        if batch.pair_index is None:
            raise WsgError(f"loss {spec.label!r} counts pairs but LossBatch.pair_index is None")
        return int(batch.pair_index.shape[0])
    hyper = validate_hyper(spec.name, spec.variant, hyper)
    if batch.rewards is None:
        raise WsgError(f"loss {spec.label!r} counts positive sequences but LossBatch.rewards is None")
    return int(is_positive(batch.rewards, hyper["positive_threshold"]).sum())


def normaliser_from_count(total_units: int | float) -> float:
    """The normaliser for a global unit count; an empty count gives 1 so that
    a step without units yields a zero loss rather than 0/0."""
    return float(max(total_units, 1))


def normaliser_for(
    spec: LossSpec | str, micro_batches: list[LossBatch], hyper: Mapping[str, Any] | None = None
) -> float:
    """The one normaliser of an optimizer step whose micro-batches are all
    here (single process). Across ranks, all-reduce the sum of count_units
    and call normaliser_from_count."""
    s = get_loss(spec) if isinstance(spec, str) else spec
    return normaliser_from_count(sum(count_units(s, mb, hyper) for mb in micro_batches))


def precompute_advantages(
    spec: LossSpec, rewards: torch.Tensor, group_ids: torch.Tensor, hyper: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """The advantages a group-relative loss would compute, over whole groups
    (e.g. the whole rollout set), to store in LossBatch.advantages when
    micro-batches do not hold whole groups."""
    if spec.advantage_fn is None:
        raise WsgError(f"loss {spec.label!r} has no group advantage; it does not read LossBatch.advantages")
    hyper = validate_hyper(spec.name, spec.variant, hyper)
    accepted = set(inspect.signature(spec.advantage_fn).parameters) - {"rewards", "group_ids"}
    return spec.advantage_fn(rewards, group_ids, **{k: v for k, v in hyper.items() if k in accepted})
