"""The functional-analysis stage: linear mode connectivity, CKA and logit lens
(seed paper §2 Analysis (iii)-(iv), §3.5, §3.6; docs/design.md "Functional analyses").

Work is split into units, each run inside a Ray task that loads the base model
once and swaps adapters with peft (`load_adapter` + `set_adapter`):

- `hidden` unit, per adapter (and the base): mean-pooled per-layer hidden
  states of `analysis.cka_prompts` chat-templated eval prompts (for CKA) and
  the logit-lens mean prediction depth on the same prompts;
- `lmc` unit, per pair: the masked-answer CE of the gold `\\boxed{answer}`
  right after the prompt on `analysis.lmc_items` eval items, at every α of
  `analysis.lmc_alphas`, each point served by the rank-(r_a + r_b) LoRA of
  α·ΔW_a + (1−α)·ΔW_b (analysis/lmc.py). α = 1 is adapter_a.

Units write their results to `<run>/analysis/parts/` with a fingerprint of
their inputs (model, items, adapter contents, α grid); a rerun skips units
whose part matches, so the stage is incremental and resumable. The driver then
assembles `<run>/analysis/{lmc,cka,logit_lens}.parquet`. Items come from the
first eval set (`analysis.eval_sets[0]`), prompts exactly as the eval stage
feeds them to vLLM.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from itertools import combinations
from typing import Optional

import numpy as np
import pyarrow as pa
from safetensors.torch import load as st_load

from ..core import console, rundir
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.models import load_causal_lm, load_tokenizer, resolve_model
from ..core.session import connect
from ..rollouts.prompts import encode_prompts
from .adapters import BASE, Adapter, list_adapters, local_copy, reference_pairs
from .cka import layerwise_cka, pad_token_id
from .lmc import interpolated_adapter, read_pair, save_adapter
from .lora_io import CONFIG_FILE, WEIGHTS_FILE, content_hash
from .shared_prefix import answer_nll, model_pass

LMC_SCHEMA = pa.schema([("adapter_a", pa.string()), ("adapter_b", pa.string()), ("alpha", pa.float64()),
                        ("ce", pa.float64()), ("n_items", pa.int64()), ("n_tokens", pa.int64())])
CKA_SCHEMA = pa.schema([("adapter_a", pa.string()), ("adapter_b", pa.string()), ("layer", pa.int32()),
                        ("cka", pa.float64()), ("n_prompts", pa.int64())])
LOGIT_LENS_SCHEMA = pa.schema([("adapter", pa.string()), ("mean_depth", pa.float64()), ("n_layers", pa.int32()),
                               ("n_prompts", pa.int64())])
# Rows per forward pass; small enough for a 4B model at 1k tokens on one GPU.
BATCH_SIZE = 8


# --- which pairs ---------------------------------------------------------------
def lmc_pair_list(cfg, adapters: list[Adapter]) -> list[tuple[str, str]]:
    """Pairs for LMC per `analysis.lmc_pairs`: "reference" (reference loss vs
    every other cell at the same step, adapters.reference_pairs), "all" (every
    unordered pair at the same step; extras pair with everything) or an
    explicit list of [a, b] names; a name without `@step` means every analysed
    step where both cells exist."""
    rule = cfg.analysis.lmc_pairs
    names = [a.name for a in adapters]
    if rule == "reference":
        return reference_pairs(adapters, cfg.analysis.reference_loss)
    if rule == "all":
        return [(a.name, b.name) for a, b in combinations(adapters, 2)
                if a.step == b.step or a.step < 0 or b.step < 0]
    out = []
    for k, pair in enumerate(rule):
        if len(pair) != 2:
            raise WsgError(f"analysis.lmc_pairs[{k}] must be [adapter_a, adapter_b], got {pair}")
        a, b = pair
        if a in names and b in names:
            out.append((a, b))
            continue
        steps = sorted({x.step for x in adapters})
        hits = [(f"{a}@{s}", f"{b}@{s}") for s in steps if f"{a}@{s}" in names and f"{b}@{s}" in names]
        if not hits:
            raise WsgError(f"analysis.lmc_pairs[{k}]: no analysed adapters {a!r} and {b!r} (as names or cell ids "
                           f"at a common step); valid names: {', '.join(names)}")
        out += hits
    return out


def cka_pair_list(cfg, adapters: list[Adapter]) -> list[tuple[str, str]]:
    """Reference pairs plus (base, adapter) for every adapter."""
    return reference_pairs(adapters, cfg.analysis.reference_loss) + [(BASE, a.name) for a in adapters]


# --- parts (cached unit results) ---------------------------------------------
def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Items:
    """The eval items every unit reads (the first eval set's, as vLLM sees them)."""

    dataset: str
    cka_prompts: list[str]
    lmc_prompts: list[str]
    lmc_answers: list[str]
    max_length: int


@dataclass(frozen=True)
class HiddenUnit:
    """One model's own pass: CKA hidden states and logit-lens depth (uri None:
    the base) and, when it ends an LMC path (`answers`), its answer NLL on
    the LMC items: the path's α = 1 or α = 0 point, read by the driver."""

    name: str
    uri: Optional[str]
    fingerprint: str
    cost: int  # the work, for balancing tasks: rows, the lens's counted twice
    answers: bool = False

    @property
    def id(self) -> str:
        return "hidden:" + self.name


@dataclass(frozen=True)
class LmcUnit:
    """The LMC path between adapters a and b at every α strictly between 0
    and 1 (its ends are the adapters themselves: their HiddenUnits)."""

    a: str
    b: str
    uri_a: str
    uri_b: str
    alphas: list[float]
    fingerprint: str
    cost: int  # alphas x items

    @property
    def id(self) -> str:
        return f"lmc:{self.a}:{self.b}"


@dataclass(frozen=True)
class FunctionalTask:
    """What one Ray task (or the in-process run) computes."""

    model: str
    dtype: str
    trust_remote_code: bool
    run: str
    items: Items
    units: list
    in_ray: bool = False


def _part_key(unit) -> str:
    """`hidden/<name>.npz` or `lmc/<a>__<b>.parquet`: the unit's file under parts/."""
    if isinstance(unit, HiddenUnit):
        return f"hidden/{unit.name}.npz"
    return f"lmc/{unit.a}__{unit.b}.parquet"


def _part_path(run: str, unit) -> str:
    return RunLayout.of(run).functional_part(*_part_key(unit).split("/"))


def _read_part(path: str):
    if path.endswith(".npz"):
        with np.load(io.BytesIO(rundir.read_bytes(path))) as z:
            return {k: z[k] for k in z.files}
    t = rundir.read_table(path)
    return {"table": t, "fingerprint": (t.schema.metadata or {}).get(b"fingerprint", b"").decode()}


def _part_valid(run: str, unit) -> bool:
    path = _part_path(run, unit)
    if not rundir.exists(path):
        return False
    return str(_read_part(path)["fingerprint"]) == unit.fingerprint


# --- the Ray task --------------------------------------------------------------
class _Host:
    """The base model plus at most one loaded adapter at a time."""

    def __init__(self, model_name: str, dtype: str, trust_remote_code: bool):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        self.base = load_causal_lm(model_name, dtype=getattr(torch, dtype),
                                   trust_remote_code=trust_remote_code).to(self.device)
        self.peft = None
        self.current = None
        self.current_config = None  # the loaded adapter's config
        self.current_keys: set[str] = set()
        self.count = 0

    def model(self, adapter_path: str | None):
        """The model with `adapter_path` applied (the base when None)."""
        from peft import PeftModel

        if adapter_path is None:
            if self.peft is None:
                return self.base
            self.peft.base_model.disable_adapter_layers()
            return self.peft
        config = rundir.read_json(rundir.join(adapter_path, CONFIG_FILE))
        if self.peft is not None and self.current_config == config:
            # The loaded adapter's shapes and scaling: its tensors go into the
            # loaded modules (load_adapter would inject new ones, ~0.3 s a swap).
            return self._load_tensors(st_load(rundir.read_bytes(rundir.join(adapter_path, WEIGHTS_FILE))))
        name, self.count = f"a{self.count}", self.count + 1
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, adapter_path, adapter_name=name, is_trainable=False)
        else:
            self.peft.base_model.enable_adapter_layers()
            self.peft.load_adapter(adapter_path, adapter_name=name, is_trainable=False)
            self.peft.set_adapter(name)
            self.peft.delete_adapter(self.current)
        from peft import get_peft_model_state_dict

        self.current, self.current_config = name, config
        # Its LoRA tensors' names: a swap into these modules must give every one.
        self.current_keys = set(get_peft_model_state_dict(self.peft, adapter_name=name, save_embedding_layers=False))
        return self.peft.eval()

    def _load_tensors(self, tensors: dict):
        """The loaded adapter's modules given new tensors (peft's own
        state-dict load, what load_adapter does after injecting modules);
        every one of its LoRA tensors must be given, none left from before."""
        from peft import set_peft_model_state_dict

        expected = self.current_keys
        if set(tensors) != expected:
            extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise WsgError(f"adapter tensors do not fit the loaded LoRA modules: unexpected {extra[:3]}, "
                           f"missing {missing[:3]}")
        self.peft.base_model.enable_adapter_layers()
        set_peft_model_state_dict(self.peft, tensors, adapter_name=self.current)
        return self.peft.eval()

    def with_state(self, config: dict, tensors: dict, folder: str):
        """The model serving an adapter given in memory (an LMC point). When the
        loaded adapter has the same config, the tensors go into its modules, so
        the points of a path, and of every path of one rank, share one set of
        LoRA modules."""
        if self.peft is not None and self.current_config == config:
            return self._load_tensors(tensors)
        return self.model(save_adapter(config, tensors, folder))


def _prompt_ids(host: _Host, prompts: list[str], max_length: int) -> list[list[int]]:
    # Token ids exactly as the vLLM engines see these texts (no special tokens
    # added: the chat template already wrote any BOS), truncated.

    return [ids[:max_length] for ids in encode_prompts(host.tok, prompts)]


def _answer_ids(host: _Host, items: Items) -> list[list[int]]:
    # The answer as a bare continuation: no BOS/EOS of its own.
    return [host.tok(a, add_special_tokens=False)["input_ids"] for a in items.lmc_answers]


def _hidden_unit(host: _Host, unit: HiddenUnit, items: Items, run: str) -> None:
    model = host.model(None if unit.uri is None else local_copy(unit.uri))
    # One pass serves CKA, the logit lens and (a path's end) the LMC answers,
    # the prompts' shared chat-template prefix run once (shared_prefix.py; equal to
    # cka.collect_hidden_states, logit_lens.prediction_depth and
    # lmc.masked_answer_nll up to float rounding). Both prompt lists are
    # prefixes of one list: the longer one holds the other.
    prompts = items.lmc_prompts if unit.answers and len(items.lmc_prompts) > len(items.cka_prompts) \
        else items.cka_prompts
    res = model_pass(model, _prompt_ids(host, prompts, items.max_length), pad_token_id(host.tok),
                     batch_size=BATCH_SIZE, n_hidden=len(items.cka_prompts),
                     answers=_answer_ids(host, items) if unit.answers else ())
    buf = io.BytesIO()
    ends = {"nll": res.nll, "ntok": res.ntok} if unit.answers else {}
    # float32 on disk halves the parts; CKA itself is computed in float64.
    np.savez(buf, hidden=np.stack(res.pooled).astype(np.float32), depth=np.float64(res.depth),
             fingerprint=np.str_(unit.fingerprint), **ends)
    rundir.write_bytes(_part_path(run, unit), buf.getvalue())


def _interior(alphas: list[float]) -> list[float]:
    """The α of a path its LmcUnit computes: the ends are the adapters' own passes."""
    return [a for a in alphas if a not in (0.0, 1.0)]


def _lmc_unit(host: _Host, unit: LmcUnit, items: Items, run: str) -> None:
    rows = []
    alphas = _interior(unit.alphas)
    if alphas:
        pair = read_pair(local_copy(unit.uri_a), local_copy(unit.uri_b))
        prompts = _prompt_ids(host, items.lmc_prompts, items.max_length)
        pairs = list(zip(prompts, _answer_ids(host, items)))
        with tempfile.TemporaryDirectory(prefix="wsg-lmc-") as tmp:
            for k, alpha in enumerate(alphas):
                model = host.with_state(*interpolated_adapter(pair, alpha), f"{tmp}/{k}")
                nll, ntok = answer_nll(model, pairs, pad_token_id(host.tok), batch_size=BATCH_SIZE)
                rows.append(_lmc_row(unit, alpha, nll, ntok))
    table = pa.Table.from_pylist(rows, schema=LMC_SCHEMA.with_metadata({"fingerprint": unit.fingerprint}))
    rundir.write_table(_part_path(run, unit), table)


def _lmc_row(unit: LmcUnit, alpha: float, nll: np.ndarray, ntok: np.ndarray) -> dict:
    return {"adapter_a": unit.a, "adapter_b": unit.b, "alpha": float(alpha), "ce": float(nll.sum() / ntok.sum()),
            "n_items": len(nll), "n_tokens": int(ntok.sum())}


def functional_worker(spec: FunctionalTask) -> list[str]:
    """Body of one Ray task: load the base once, run the units in order."""
    if spec.in_ray:
        import ray
        import torch

        # As many torch threads as CPUs Ray gave the task: more collapse when
        # tasks share the box (docs/stack.md "Training").
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    host = _Host(spec.model, spec.dtype, spec.trust_remote_code)
    done = []
    # The base unit first, before any adapter wraps the model.
    for unit in sorted(spec.units, key=lambda u: not (isinstance(u, HiddenUnit) and u.name == BASE)):
        (_hidden_unit if isinstance(unit, HiddenUnit) else _lmc_unit)(host, unit, spec.items, spec.run)
        done.append(unit.id)
    return done


# --- the driver ----------------------------------------------------------------
def _items(cfg) -> Items:
    from .evaluate import eval_prompts  # here, not at the top: the tasks that import this module need no scipy

    es = cfg.analysis.eval_sets[0]
    problems, prompts = eval_prompts(cfg, es)
    n_cka, n_lmc = min(cfg.analysis.cka_prompts, len(prompts)), min(cfg.analysis.lmc_items, len(prompts))
    if n_cka < 2:
        raise WsgError(f"analysis.eval_sets[0] ({es.name}) has {len(prompts)} problem(s); CKA needs at least 2")
    return Items(dataset=es.name, cka_prompts=prompts[:n_cka], lmc_prompts=prompts[:n_lmc],
                 # Seed §3.5: the gold answer as it is asked for, boxed, right after the prompt.
                 lmc_answers=[f"\\boxed{{{p.answer}}}" for p in problems[:n_lmc]],
                 max_length=cfg.model.max_model_len)


def _units(cfg, adapters: list[Adapter], items: Items) -> list:
    by = {a.name: a for a in adapters}
    hashes = {a.name: content_hash(a.path) for a in adapters}
    # "forward" names how the numbers are computed: parts from the full forward
    # (before shared_prefix.py) differ by float rounding and are recomputed.
    common = {"model": cfg.model.name, "dtype": cfg.model.dtype, "forward": "shared-prefix, LMC ends from the model's pass"}
    h_items = _fingerprint({"p": items.cka_prompts, "max_length": items.max_length})
    l_items = _fingerprint({"p": items.lmc_prompts, "a": items.lmc_answers, "max_length": items.max_length})
    alphas = [float(x) for x in cfg.analysis.lmc_alphas]
    lmc_pairs = lmc_pair_list(cfg, adapters)
    # The adapters that end a path (α = 1: a, α = 0: b) give its end from their own pass.
    ends = {a for a, _ in lmc_pairs if 1.0 in alphas} | {b for _, b in lmc_pairs if 0.0 in alphas}
    needed = {n for p in cka_pair_list(cfg, adapters) for n in p} | ends
    units = []
    for name in [BASE] + [a.name for a in adapters]:
        if name in needed:
            answers = name in ends
            fp = {**common, "items": h_items, "adapter": hashes.get(name), "answers": l_items if answers else None}
            units.append(HiddenUnit(name=name, uri=None if name == BASE else by[name].uri, answers=answers,
                                    cost=2 * len(items.cka_prompts) + (len(items.lmc_prompts) if answers else 0),
                                    fingerprint=_fingerprint(fp)))
    for a, b in lmc_pairs:
        units.append(LmcUnit(a=a, b=b, uri_a=by[a].uri, uri_b=by[b].uri,
                             alphas=alphas, cost=len(_interior(alphas)) * len(items.lmc_prompts),
                             fingerprint=_fingerprint({**common, "items": l_items, "alphas": alphas,
                                                       "a": hashes[a], "b": hashes[b]})))
    return units


def _shards(units: list, n: int) -> list[list]:
    """Greedy longest-processing-time split of the units over n tasks."""
    shards, load = [[] for _ in range(n)], [0] * n
    for u in sorted(units, key=lambda u: -u.cost):
        k = load.index(min(load))
        shards[k].append(u)
        load[k] += u.cost
    return [s for s in shards if s]


def _task_memory(cfg) -> int:
    """Bytes of host memory a CPU task asks Ray for: twice the checkpoint's
    files (a bf16 checkpoint loaded as float32, plus activations), so Ray runs
    no more tasks at once than the box holds. 0 (no request) for a hub id."""
    import os

    path = resolve_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    if not os.path.isdir(path):
        return 0
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".bin")))
    return 2 * size


def _parts_present(run: str) -> set[str]:
    """`hidden/<name>.npz` and `lmc/<a>__<b>.parquet` files in the run's parts."""
    return {f"{kind}/{n}" for kind in ("hidden", "lmc")
            for n in rundir.listdir(RunLayout.of(run).functional_parts(kind))}


def _parts_written(run: str, todo: list, before: set[str]) -> int:
    """How many of `todo` have a part file that was not there at the start
    (units write their part when done: per-unit progress while tasks run)."""
    new = _parts_present(run) - before
    return sum(1 for u in todo if _part_key(u) in new)


def _run_tasks(cfg, run: str, todo: list, items: Items, progress: bool) -> None:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    slots = int(gpus) if gpus >= 1 else max(1, int(ray.available_resources().get("CPU", 1)))
    opts = {"num_cpus": 1, "num_gpus": 1 if gpus >= 1 else 0, "max_retries": 1}
    if gpus < 1 and (mem := _task_memory(cfg)):
        # Never more than the cluster has: an infeasible request would wait forever.
        opts["memory"] = min(mem, int(ray.cluster_resources().get("memory", mem)))
    task = ray.remote(**opts)(functional_worker)
    before = _parts_present(run)
    pending = [task.remote(FunctionalTask(model=cfg.model.name, dtype=cfg.model.dtype,
                                          trust_remote_code=cfg.model.trust_remote_code, run=run, items=items,
                                          units=shard, in_ray=True))
               for shard in _shards(todo, min(slots, len(todo)))]
    finished = 0
    with console.progress(len(todo) if progress else 0, "functional units") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=3.0)
            finished += sum(len(ray.get(r)) for r in ready)
            done = max(finished, _parts_written(run, todo, before) if progress else 0)
            if done > bar.done:
                bar.advance(done - bar.done)


def _lmc_rows(unit: LmcUnit, parts: dict, hidden: dict) -> list[dict]:
    """A path's rows in α order: the ends from the adapters' own passes, the
    points between from the path's part."""
    inner = {r["alpha"]: r for r in parts[unit.id]["table"].to_pylist()}
    out = []
    for alpha in unit.alphas:
        if alpha in (0.0, 1.0):
            end = hidden[unit.a if alpha == 1.0 else unit.b]
            out.append(_lmc_row(unit, alpha, end["nll"], end["ntok"]))
        else:
            out.append(inner[alpha])
    return out


def run_functional(cfg, run: str, *, progress: bool = True, use_ray: bool = True) -> dict:
    """Stage entry: compute (or reuse) every unit, then write the three tables.

    `use_ray=False` runs the units in this process (one model load), as
    `run_geometry(use_ray=False)` does: for debugging and small tests."""
    import ray

    adapters = list_adapters(cfg, run, models=True)  # analysis.model_steps: a model per adapter
    if not adapters:
        raise WsgError(f"{run} has no complete adapters to analyse; run the grid first (`wsg run`)")
    items = _items(cfg)
    units = _units(cfg, adapters, items)
    todo = [u for u in units if not _part_valid(run, u)]
    if progress:
        console.say(f"  [functional] {len(units)} units, {len(units) - len(todo)} cached")
    if todo and not use_ray:
        functional_worker(FunctionalTask(model=cfg.model.name, dtype=cfg.model.dtype, run=run, items=items,
                                         trust_remote_code=cfg.model.trust_remote_code, units=todo))
    elif todo:
        owned = connect(cfg.resources.ray_address, log_to_driver=progress)
        try:
            _run_tasks(cfg, run, todo, items, progress)
        finally:
            if owned:
                ray.shutdown()

    parts = {u.id: _read_part(_part_path(run, u)) for u in units}
    hidden = {u.name: parts[u.id] for u in units if isinstance(u, HiddenUnit)}
    cka_rows = []
    for a, b in cka_pair_list(cfg, adapters):
        vals = layerwise_cka(list(hidden[a]["hidden"]), list(hidden[b]["hidden"]))
        cka_rows += [{"adapter_a": a, "adapter_b": b, "layer": k, "cka": float(v),
                      "n_prompts": len(items.cka_prompts)} for k, v in enumerate(vals)]
    lens_rows = [{"adapter": n, "mean_depth": float(h["depth"]), "n_layers": int(h["hidden"].shape[0]),
                  "n_prompts": len(items.cka_prompts)} for n, h in hidden.items()]
    lmc_table = pa.Table.from_pylist([r for u in units if isinstance(u, LmcUnit) for r in _lmc_rows(u, parts, hidden)],
                                     schema=LMC_SCHEMA)
    lay = RunLayout.of(run)
    rundir.write_table(lay.functional_table("lmc"), lmc_table)
    rundir.write_table(lay.functional_table("cka"), pa.Table.from_pylist(cka_rows, schema=CKA_SCHEMA))
    rundir.write_table(lay.functional_table("logit_lens"), pa.Table.from_pylist(lens_rows, schema=LOGIT_LENS_SCHEMA))
    return {"adapters": len(adapters), "units": len(units), "computed": len(todo), "lmc_rows": lmc_table.num_rows,
            "cka_rows": len(cka_rows), "logit_lens_rows": len(lens_rows)}
