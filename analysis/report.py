"""The run's HTML report: `<run>/report/index.html` + `figures/*.png`.

Built from whatever tables exist (docs/analysis.md "Report"): each section
names the table it needs and, when that table is absent, says so and which
stage writes it, instead of failing. The page opens with the seed paper's
claims as checks (docs/findings.md), and every cross-loss global number is
shown with its CI next to the matching noise floor. The page is
self-contained offline: images by relative path, no scripts or styles from
the network.
"""
from __future__ import annotations

import html
import math
import os
import tempfile
from collections import defaultdict
from datetime import datetime, timezone

from ..core import rundir
from ..core.config import config_hash, parse_config
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..rollouts.teacher import describe as describe_teacher
from . import figures as F
from . import report_findings as RF
from ..core.cells import CellKey
from .adapters import BASE, Adapter, cell_of, reference_pairs, step_of
from .figures_forest import claims_forest
from .results import TABLES as RUN_TABLES

# The tables the page reads. Where each lives in a run and what writes it is
# analysis/results.py's TABLES (its paths come from core/layout.py RunLayout).
TABLES = ("accuracy", "mcnemar", "global_pairs", "layer_pairs", "module_pairs", "adapter_modules", "lmc", "cka",
          "logit_lens", "claims", "convergence", "noise_floors")


def table_path(run: str, key: str) -> str:
    return RUN_TABLES[key][0](RunLayout.of(run))


def where(key: str) -> str:
    """A table's path inside any run, e.g. `eval/accuracy.parquet` (for messages)."""
    lay = RunLayout("run")
    return lay.relative(RUN_TABLES[key][0](lay))


# The report's page style, also the study page's (analysis/study_page.py).
PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child,td.s{text-align:left}summary{cursor:pointer;color:#345}
.missing{background:#fff4e0;border-left:4px solid #e69500;padding:.5em 1em}
.meta td{text-align:left}img{max-width:100%;border:1px solid #eee}
.sig{font-weight:bold}.note{color:#555;font-size:.9em}
td.v-holds{background:#cdeccd}td.v-fails{background:#f6c9c9}td.v-inconclusive{background:#fbe8b0}
td.v-not_measured{background:#e6e6e6;color:#555}td.v-unsettled{background:#dde6f4}.conv{border-left:4px solid #c0392b;padding:.5em 1em;background:#fbeeee}
.ok{border-left:4px solid #2e8b57;padding:.5em 1em;background:#eef8f1}td.w{text-align:left;max-width:28em}
td.c{text-align:left;white-space:nowrap;font-size:.8em}
"""


def _read(run: str, key: str):
    path = table_path(run, key)
    if not rundir.exists(path):
        return None
    return rundir.read_table(path).to_pylist()


def _run_name(run: str) -> str:
    """The run as the page names it: a local folder by its name (the page
    travels with the run when it is copied), an object-store run by its URI."""
    return os.path.basename(str(run).rstrip("/")) if rundir.is_local(run) else str(run)


def _run_config(run: str) -> tuple[str, dict]:
    """(config hash, the resolved config as a dict); ('unknown', {}) if absent."""
    path = RunLayout.of(run).config
    if not rundir.exists(path):
        return "unknown (no config.yaml)", {}
    import yaml

    text = rundir.read_text(path)
    first = text.splitlines()[0] if text else ""
    h = first.rsplit(" ", 1)[-1] if first.startswith("# wsg resolved config") else None
    try:
        data = yaml.safe_load(text) or {}
        if h is None:
            h = config_hash(parse_config(data, path))
    except (yaml.YAMLError, WsgError) as err:
        # The report degrades, it does not fail: say why the hash is unknown.
        first_line = str(err).splitlines()[0]
        return f"unknown (config.yaml unreadable: {first_line})", {}
    return h, data if isinstance(data, dict) else {}


def _teacher_line(run: str) -> str:
    """The teacher (rollouts/teacher.py): from the claims table's metadata,
    else the rollouts stage's summary."""
    import json


    prof = None
    claims = table_path(run, "claims")
    if rundir.exists(claims):
        md = rundir.read_table(claims).schema.metadata or {}
        raw = md.get(b"wsg.teacher")
        prof = json.loads(raw) if raw else None

    marker = RunLayout.of(run).rollouts_complete
    if prof is None and rundir.exists(marker):
        prof = rundir.read_json(marker).get("teacher_profile")
    return f'<p class="teacher">{html.escape(describe_teacher(prof))}</p>'


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v[:6]) + (" …" if len(v) > 6 else "")
    return html.escape(str(v))


def _cell(v) -> str:
    # Text left-aligned, numbers right-aligned (CSS class "s").
    return f'<td class="s">{_fmt(v)}</td>' if isinstance(v, str) else f"<td>{_fmt(v)}</td>"


def _table(rows: list[dict], cols: list[str], *, bold=None, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        row_attr = ' class="sig"' if bold and bold(r) else ""
        body.append(f"<tr{row_attr}>" + "".join(_cell(r.get(c)) for c in cols) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{head}</tr>{''.join(body)}</table>"


def _fold(table_html: str, n_rows: int, what: str, *, open_below: int = 40) -> str:
    """Long tables folded (<details>, no script needed), short ones open."""
    attr = " open" if n_rows < open_below else ""
    return f"<details{attr}><summary>{html.escape(what)} ({n_rows} rows)</summary>{table_html}</details>"


def _ci(v, lo, hi) -> str:
    """`value [lo, hi]`, or the value alone without a CI."""
    if v is None:
        return ""
    return _fmt(v) + (f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "")


def _missing(keys: list[str]) -> str:
    items = "".join(f"<li><code>{where(k)}</code> is absent: written by {html.escape(RUN_TABLES[k][1])}</li>"
                    for k in keys)
    return f'<div class="missing">This section is missing because its table(s) are absent:<ul>{items}</ul></div>'


def _figure(path, rel: str, caption: str) -> str:
    if path is None:
        return f'<p class="note">No figure: the table has no rows for it ({html.escape(caption)}).</p>'
    return f'<figure><img src="{rel}" alt="{html.escape(caption)}"><figcaption class="note">{caption}</figcaption></figure>'


def _adapters_from_names(names) -> list[Adapter]:
    out = []
    for n in sorted(set(names) - {BASE}):
        c = cell_of(n)
        # The report pairs its figures' adapters by loss, init seed and LR only:
        # its cells take the data seed equal to the init seed, and a horizon
        # control stands as its reference cell.
        cell = None if c is None else CellKey(c.loss, c.init_seed, c.init_seed, c.lr)
        out.append(Adapter(name=n, path="", uri="", step=step_of(n), cell=cell))
    return out


def _norm_table(module_rows: list[dict]) -> list[dict]:
    """Per adapter: modules, global ‖ΔW‖_F and effective rank summary."""
    by = defaultdict(list)
    for r in module_rows:
        by[r["adapter"]].append(r)
    out = []
    for name in sorted(by):
        rs = by[name]
        er = [r["effective_rank"] for r in rs]
        out.append({"adapter": name, "modules": len(rs),
                    "global_fro_norm": math.sqrt(sum(r["fro_norm"] ** 2 for r in rs)),
                    "mean_module_fro_norm": sum(r["fro_norm"] for r in rs) / len(rs),
                    "effective_rank_mean": sum(er) / len(er), "effective_rank_min": min(er),
                    "effective_rank_max": max(er)})
    return out


#: The report's sections in page order: (title, tables it needs, _Sections method).
SECTIONS = (
    ("Claims of the seed paper", ("claims",), "claims"),
    ("Convergence", ("convergence",), "convergence"),
    ("Accuracy", ("accuracy",), "accuracy"),
    ("McNemar tests", ("mcnemar",), "mcnemar"),
    ("Global cosine of weight updates", ("global_pairs",), "global_cos"),
    ("Noise floors", ("noise_floors",), "floors"),
    ("Per-layer cosine to the reference loss", ("layer_pairs",), "layer_cos"),
    ("Principal angles", ("module_pairs",), "angles"),
    ("Update norm and effective rank", ("adapter_modules",), "norms"),
    ("Seed and learning-rate sensitivity", ("global_pairs", "adapter_modules"), "seed_lr"),
    ("Linear mode connectivity", ("lmc",), "lmc"),
    ("Representational similarity (CKA)", ("cka",), "cka"),
    ("Logit lens", ("logit_lens",), "lens"),
)


def _adapter_names(t: dict) -> set[str]:
    """Every adapter (and the base) that a table names."""
    names = set()
    for k in ("global_pairs", "layer_pairs", "module_pairs", "lmc", "cka"):
        for r in t[k] or []:
            names.update((r["adapter_a"], r["adapter_b"]))
    for r in t["adapter_modules"] or []:
        names.add(r["adapter"])
    for r in t["accuracy"] or []:
        names.add(r["model"])
    return names


class _Sections:
    """The body of each section, from the run's tables (figures written to fig_dir)."""

    def __init__(self, t: dict, fig_dir: str, ref_loss: str, names: set[str]):
        self.t, self.fig_dir, self.ref_loss = t, fig_dir, ref_loss
        self.ref_pairs = reference_pairs(_adapters_from_names(names), ref_loss)
        self.order = sorted(names - {BASE}, key=lambda n: (step_of(n), n))

    def fig(self, name, fn, *args, **kw):
        return fn(*args, os.path.join(self.fig_dir, name), **kw)

    def build(self, keys, method: str) -> tuple[str, bool]:
        """(html, whether a table it needs is absent)."""
        absent = [k for k in keys if self.t[k] is None]
        return (_missing(absent) if absent else getattr(self, method)()), bool(absent)

    def accuracy(self):
        p = self.fig("accuracy.png", F.accuracy_bars, self.t["accuracy"])
        cols = ["model", "step", "dataset", "n", "correct", "accuracy", "ci_low", "ci_high"]
        return (_figure(p, "figures/accuracy.png", "Greedy pass@1 with Wilson 95% intervals (seed Fig. 3).")
                + _table(self.t["accuracy"], cols))

    def mcnemar(self):
        rows = sorted(self.t["mcnemar"], key=lambda r: (r["dataset"], r["p_value"], r["model_a"], r["model_b"]))
        return ('<p class="note">Exact McNemar test on the items both models were scored on; b01 = items '
                'model_a got wrong and model_b right, b10 the reverse. Bold: p &lt; 0.05 (uncorrected).</p>'
                + _fold(_table(rows, ["dataset", "model_a", "model_b", "n", "a_correct", "b_correct", "b01", "b10",
                                      "p_value"], bold=lambda r: r["p_value"] < 0.05), len(rows),
                        "McNemar tests, smallest p first"))

    def claims(self):
        p = self.fig("claims_forest.png", claims_forest, self.t["claims"])
        plot = _figure(p, "figures/claims_forest.png",
                       "Each claim's value (dot, coloured by its verdict) with its 95% CI (bar), the band its test "
                       "accepts (shaded) and the noise floor it must beat (tick); one axis per measured quantity.")
        return RF.claims_section(self.t["claims"], self.t["convergence"], _fmt, _ci, figure=plot)

    def convergence(self):
        p = self.fig("convergence.png", F.convergence_curves, self.t["convergence"])
        rows = RF.convergence_rows(self.t["convergence"], _fmt)
        return (RF.convergence_note(self.t["convergence"], None, "cells")
                + '<p class="note">Per cell: cosine of each checkpoint\'s ΔW with the final one and the norm growth; '
                  'converged when the direction has settled (cos >= 0.99 with the last checkpoint at <= 80% of the '
                  'final step) and the norm grows by <= 10% and no faster than before (docs/findings.md).</p>'
                + _figure(p, "figures/convergence.png", "Direction and norm of ΔW over checkpoints, per cell.")
                + _fold(_table(rows, list(rows[0]) if rows else ["cell"]), len(rows), "cells at their final step"))

    def floors(self):
        rows, cols = RF.floor_rows_for_table(self.t["noise_floors"], _fmt, _ci)
        return ('<p class="note">The global metrics between two cells of one loss at one step that differ in one '
                'factor only: the LoRA-init seed, the data-order seed, or the LR. A loss effect must exceed them.</p>'
                + _fold(_table(rows, cols), len(rows), "control pairs"))

    def global_cos(self):
        p = self.fig("global_cosine.png", F.global_cosine_heatmap, self.t["global_pairs"], order=self.order)
        ref = {tuple(sorted(x)) for x in self.ref_pairs}
        rows = [r for r in self.t["global_pairs"] if (r["adapter_a"], r["adapter_b"]) in ref] or self.t["global_pairs"]
        rows, cols, note = RF.global_rows(rows, self.t["noise_floors"], self.ref_loss, _fmt, _ci)
        return (_figure(p, "figures/global_cosine.png", "Global cosine of the LoRA updates ΔW (seed Fig. 1).")
                + "<h3>Pairs with the reference loss, with CIs and noise floors</h3>" + note + _table(rows, cols))

    def layer_cos(self):
        p = self.fig("layer_cosine.png", F.layer_cosine, self.t["layer_pairs"], ref_pairs=self.ref_pairs)
        return _figure(p, "figures/layer_cosine.png",
                       f"Per-layer cosine of ΔW to the reference loss {html.escape(self.ref_loss)} (seed Fig. 4).")

    def angles(self):
        p = self.fig("principal_angles.png", F.principal_angles, self.t["module_pairs"],
                     ref_pairs=self.ref_pairs)
        return _figure(p, "figures/principal_angles.png",
                       "Principal angles between top-k left singular subspaces, distribution over modules, "
                       f"for pairs with {html.escape(self.ref_loss)} (seed §3.3).")

    def norms(self):
        return ('<p class="note">‖ΔW‖_F over all modules; effective rank exp(−Σ p log p) of each module\'s '
                'singular values (Roy &amp; Vetterli).</p>'
                + _table(_norm_table(self.t["adapter_modules"]),
                         ["adapter", "modules", "global_fro_norm", "mean_module_fro_norm", "effective_rank_mean",
                          "effective_rank_min", "effective_rank_max"]))

    def seed_lr(self):
        p = self.fig("seed_lr.png", F.seed_lr_panels, self.t["global_pairs"], self.t["adapter_modules"])
        return _figure(p, "figures/seed_lr.png", "Seed and learning-rate sensitivity (seed Fig. 2).")

    def lmc(self):
        p = self.fig("lmc.png", F.lmc_curves, self.t["lmc"])
        cols = [c for c in ("adapter_a", "adapter_b", "alpha", "ce", "n_items") if self.t["lmc"] and c in self.t["lmc"][0]]
        return _figure(p, "figures/lmc.png", "Linear mode connectivity: masked-answer CE of the gold "
                       "\\boxed{answer} along α·ΔW_a + (1−α)·ΔW_b (seed Fig. 5).") + _fold(
            _table(self.t["lmc"], cols), len(self.t["lmc"]), "LMC points")

    def cka(self):
        p = self.fig("cka.png", F.cka_layers, self.t["cka"])
        return _figure(p, "figures/cka.png", "Linear CKA of per-layer hidden states (seed Fig. 6).")

    def lens(self):
        rows = self.t["logit_lens"]
        cols = list(rows[0]) if rows else ["adapter"]
        return ('<p class="note">Mean prediction depth: the first layer from which the logit-lens top-1 '
                'prediction equals the final one and stays (seed §3.6).</p>' + _table(rows, cols))


def _render(run: str, out_dir: str) -> None:
    """Write index.html and figures/ into the local folder out_dir."""
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    t = {k: _read(run, k) for k in TABLES}
    cfg_hash, cfg = _run_config(run)
    ref_loss = (cfg.get("analysis") or {}).get("reference_loss", "sft")
    names = _adapter_names(t)
    body = _Sections(t, fig_dir, ref_loss, names)
    sections = [(title, *body.build(keys, method)) for title, keys, method in SECTIONS
                if method != "seed_lr" or F.varies_seed_or_lr(names)]
    meta = _table([{"item": "run directory", "value": _run_name(run)},
                   {"item": "config hash", "value": cfg_hash},
                   {"item": "model", "value": (cfg.get("model") or {}).get("name", "unknown")},
                   {"item": "reference loss", "value": ref_loss},
                   {"item": "adapters in the tables", "value": str(len(names - {BASE}))},
                   {"item": "built", "value": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}],
                  ["item", "value"], cls="meta")
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(_page(run, t, meta, sections))


def _page(run: str, t: dict, meta: str, sections: list[tuple[str, str, bool]]) -> str:
    """The page: the claims first, then the run's identity and the contents."""
    absent = [k for k in TABLES if t[k] is None]
    summary = ("<p>All tables present.</p>" if not absent else
               f'<div class="missing">Missing tables, so some sections are empty: '
               f'{", ".join("<code>" + where(k) + "</code>" for k in absent)}.</div>')
    toc = "".join(f'<li><a href="#s{k}">{html.escape(title)}</a>{" (missing)" if miss else ""}</li>'
                  for k, (title, _, miss) in enumerate(sections))
    parts = [f'<h2 id="s{k}">{html.escape(title)}</h2>{b}' for k, (title, b, _) in enumerate(sections)]
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>wsg report: "
            f"{html.escape(os.path.basename(str(run).rstrip('/')))}</title><style>{PAGE_CSS}</style></head><body>"
            f"<h1>wsg report</h1>{_teacher_line(run)}{parts[0]}<h2>Run</h2>{meta}{summary}<ul>{toc}</ul>"
            f"{''.join(parts[1:])}</body></html>")


def build_report(run: str) -> str:
    """Build `<run>/report/index.html` (and figures/) from the run's tables;
    return its path. Works with any subset of the tables."""
    if not rundir.exists(run):
        raise WsgError(f"run directory {run} does not exist; pass the folder given to `wsg run --run`")
    dest = RunLayout.of(run).report_dir
    with tempfile.TemporaryDirectory(prefix="wsg-report-") as tmp:
        _render(run, tmp)
        # Figures first, the page last: a reader never sees a page whose
        # images are not there yet (rundir writes are atomic per file).
        for name in sorted(os.listdir(os.path.join(tmp, "figures"))):
            with open(os.path.join(tmp, "figures", name), "rb") as f:
                rundir.write_bytes(rundir.join(dest, "figures", name), f.read())
        with open(os.path.join(tmp, "index.html"), "rb") as f:
            rundir.write_bytes(rundir.join(dest, "index.html"), f.read())
    return rundir.join(dest, "index.html") if not rundir.is_local(dest) else rundir.resolve(
        rundir.join(dest, "index.html"))[1]
