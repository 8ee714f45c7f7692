"""The eval stage: greedy pass@1 of the base model and of every adapter
(seed paper §3.1, Fig. 3; docs/design.md "Functional analyses and evaluation").

One vLLM engine (a Ray actor) serves every model in turn, on the prompts the
rollout stage would build for the same problems (rollouts.prompts). Adapters
are served one of two ways (`analysis.eval_mode`):

- "lora": a vLLM LoRA request per adapter (the GPU path);
- "merged": W0 + ΔW of the modules the adapter touches (rollouts/merge.py,
  the merger online cells sync with), hot-reloaded into the engine in place
  (`EngineActor.load_merged_weights`, exact). On CPU vLLM's LoRA path is
  7-12x slower than the base model (docs/stack.md "vLLM"), so "auto" picks
  this one there and "lora" where the cluster has GPUs
  (rollouts/engine_rules.py).

Completions are scored by the strict numeric reward (rollouts.reward: the final
answer must be a number). Per-model predictions are cached in
`<run>/eval/models/<name>.parquet` with a fingerprint of everything that
decides them (model, dtype, eval sets, prompt format, max tokens, adapter
content), so a rerun evaluates only new or changed models. The stage then
writes `eval/predictions.parquet`, `accuracy.parquet` (Wilson 95% intervals)
and `mcnemar.parquet` (exact McNemar for every pair of models on the same
items) with analysis/stats.py. The `model` column is the adapter name
(`<cell_id>@<step>`, analysis/adapters.py) or `base`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from ..core import console, rundir
from ..core.adapter_card import add_accuracy
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.models import load_causal_lm, load_tokenizer, resolve_model
from ..core.session import connect
from ..rollouts.datasets import load_eval_problems
from ..rollouts.engine import EngineActor, EngineOptions, shutdown_engines, wait_ready
from ..rollouts.engine_rules import (
    adapter_mode,
    eager_unless_gpu,
    rollout_engine_options,
    vllm_lora_rank,
)
from ..rollouts.merge import merged_weights, write_tensors
from ..rollouts.prompts import render_prompts
from ..rollouts.reward import extract_final_answer, score_many
from ..rollouts.stage import pool_size
from .adapters import BASE, Adapter, list_adapters, local_copy
from .lora_io import content_hash
from .stats import PREDICTIONS_SCHEMA, accuracy_table, mcnemar_table


def eval_prompts(cfg, eval_set) -> tuple[list, list[str]]:
    """(problems, chat-templated prompts) of one eval set, formatted exactly as
    the rollouts are (data.instruction, data.system_prompt), none of them a
    training prompt (rollouts.datasets.load_eval_problems)."""

    problems = list(load_eval_problems(eval_set, cfg.data)[0])
    if not problems:
        raise WsgError(f"analysis.eval_sets: set {eval_set.name!r} has no problems; check its source/path")
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    prompts = render_prompts(tok, problems, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt)
    return problems, prompts


class EvalEngine(EngineActor):
    """The engine plus what evaluation needs next to it: merging adapters in
    the engine's own process, so merged folders never cross machines."""

    def __init__(self, opts: EngineOptions):
        super().__init__(opts)
        self._hf = None  # the base as a transformers model, for merging
        self._touched: set[str] = set()  # tensors an earlier merge replaced in the engine

    def _merge(self, adapter_dir: str, out_dir: str) -> None:
        """The one merger (rollouts/merge.py): W0 + ΔW of the modules the
        adapter touches, in float32 (vLLM casts on reload, as for the base),
        plus the base tensors of modules an earlier adapter touched and this
        one does not."""
        import torch
        from peft import PeftModel

        if self._hf is None:
            self._hf = load_causal_lm(self.opts.model, dtype=torch.float32,
                                      trust_remote_code=self.opts.trust_remote_code)
        wrapped = PeftModel.from_pretrained(self._hf, adapter_dir, is_trainable=False)
        merged = merged_weights(wrapped)
        state = self._hf.state_dict()
        restore = {k: state[k].detach().contiguous() for k in self._touched - set(merged)}
        write_tensors(out_dir, {**restore, **merged})
        self._touched |= set(merged)
        self._hf = wrapped.unload()  # the base again: nothing was merged into it

    def serve(self, adapter: dict | None, mode: str) -> tuple | None:
        """Make the engine serve `adapter` ({name, uri, lora_id}) or the base;
        returns the LoRA request tuple to pass to generate (None if merged)."""

        if adapter is None:
            if self._weights != self.opts.model:
                self.load_merged_weights(self.opts.model)
                self._weights = self.opts.model
            return None
        local = local_copy(adapter["uri"])
        if mode == "lora":
            return (adapter["name"], int(adapter["lora_id"]), local)
        out = tempfile.mkdtemp(prefix="merged-", dir=self.work_dir)
        try:
            self._merge(local, out)
            self.load_merged_weights(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return None

    def greedy(self, prompts: list[str], *, adapter: dict | None, mode: str, max_tokens: int) -> list[dict]:
        lora = self.serve(adapter, mode)
        outs = self.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens, lora=lora)
        return [{"text": o["samples"][0]["text"], "finish_reason": o["samples"][0]["finish_reason"]} for o in outs]


def _fingerprint(cfg, adapter: Adapter | None) -> str:
    blob = {"model": cfg.model.name, "dtype": cfg.rollouts.dtype, "max_model_len": cfg.model.max_model_len,
            "eval_sets": [e.model_dump(mode="json") for e in cfg.analysis.eval_sets],
            "max_tokens": cfg.analysis.eval_max_tokens, "instruction": cfg.data.instruction,
            "system_prompt": cfg.data.system_prompt, "adapter": content_hash(adapter.path) if adapter else None,
            # Eval problems exclude the training ones (rollouts.datasets.load_eval_problems): a
            # cache from before that rule holds other problems.
            "eval_disjoint_from": cfg.data.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def model_cache_path(run: str | RunLayout, name: str) -> str:
    return RunLayout.of(run).eval_model(name)


def _cached(layout: RunLayout, name: str, fingerprint: str) -> pa.Table | None:
    path = layout.eval_model(name)
    if not rundir.exists(path):
        return None
    t = rundir.read_table(path)
    return t if (t.schema.metadata or {}).get(b"fingerprint", b"").decode() == fingerprint else None


def _score(completions: list[str], golds: list[str], timeout_s: float,
           num_cpus: float) -> tuple[list[bool], list[str | None]]:
    rewards, _info = score_many(completions, golds, timeout_s=timeout_s, num_cpus=num_cpus)
    return [r > 0.5 for r in rewards], [extract_final_answer(c)[0] for c in completions]


def _start_engines(cfg, mode: str, adapters: list[Adapter], n_models: int) -> list:
    """The eval pool: sized like the rollouts stage's (`rollouts.num_engines`,
    `cpus_per_engine`, `gpus_per_engine`), never more engines than models."""
    import ray

    ro = cfg.rollouts
    n, g = pool_size(ro.num_engines, cpus_per_engine=ro.cpus_per_engine, gpus_per_engine=ro.gpus_per_engine,
                     n_shards=n_models, resources=ray.cluster_resources())
    ranks = [int(rundir.read_json(rundir.join(a.path, "adapter_config.json"))["r"]) for a in adapters]
    resolve_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)  # a bad name fails here, now
    # The engines get the name and resolve it on their own nodes (a path in this
    # node's cache does not exist on the others).
    opts = rollout_engine_options(
        cfg, cfg.model.name, enable_lora=mode == "lora",
        max_lora_rank=vllm_lora_rank(max(ranks, default=8), field="adapter rank"), max_loras=1,
        enforce_eager=eager_unless_gpu(cfg, g))
    actor = ray.remote(EvalEngine).options(num_cpus=ro.cpus_per_engine, num_gpus=g,
                                           max_concurrency=1, max_restarts=0)
    engines = [actor.remote(opts) for _ in range(n)]
    try:
        wait_ready(engines, model=cfg.model.name)
    except BaseException:
        shutdown_engines(engines)
        raise
    return engines


def _evaluate_model(cfg, engine, name: str, adapter: dict | None, mode: str, sets: list,
                    reward_cpus: float) -> pa.Table:
    import ray

    rows = {f.name: [] for f in PREDICTIONS_SCHEMA}
    step = -1 if adapter is None else adapter["step"]
    for es, problems, prompts in sets:
        outs = ray.get(engine.greedy.remote(prompts, adapter=adapter, mode=mode,
                                            max_tokens=cfg.analysis.eval_max_tokens))
        texts = [o["text"] for o in outs]
        correct, extracted = _score(texts, [p.answer for p in problems], cfg.rollouts.reward_timeout_s,
                                    reward_cpus)
        rows["model"] += [name] * len(problems)
        rows["step"] += [step] * len(problems)
        rows["dataset"] += [es.name] * len(problems)
        rows["item_id"] += [str(p.id) for p in problems]
        rows["prompt"] += prompts
        rows["gold"] += [str(p.answer) for p in problems]
        rows["completion"] += texts
        rows["extracted"] += extracted
        rows["correct"] += correct
    return pa.table(rows, schema=PREDICTIONS_SCHEMA)


def _cards_with_accuracy(adapters: list[Adapter], acc: pa.Table) -> None:
    """Each run adapter's model card learns its pass@1 per eval set."""

    by: dict[str, dict] = {}
    for r in acc.to_pylist():
        by.setdefault(r["model"], {})[r["dataset"]] = r["accuracy"]
    for a in adapters:
        if a.cell is not None and a.name in by:
            add_accuracy(a.uri, by[a.name])


def run_eval(cfg, run: str | RunLayout, *, progress: bool = True) -> dict:
    """Stage entry: evaluate the base and every analysed adapter (cached per
    model), then write predictions, accuracy and McNemar tables."""
    layout = RunLayout.of(run)
    adapters = list_adapters(cfg, layout, models=True)
    if len(set(es.name for es in cfg.analysis.eval_sets)) != len(cfg.analysis.eval_sets):
        raise WsgError("analysis.eval_sets: set names repeat; give every set a distinct name")
    models = [(BASE, None)] + [(a.name, a) for a in adapters]
    fps = {n: _fingerprint(cfg, a) for n, a in models}
    tables = {n: t for n, _ in models if (t := _cached(layout, n, fps[n])) is not None}
    todo = [(n, a) for n, a in models if n not in tables]
    if progress:
        console.say(f"  [eval] {len(models)} models ({len(tables)} cached), {len(cfg.analysis.eval_sets)} "
                    "eval set(s)")
    mode, n_engines = None, 0
    if todo:
        mode, n_engines = _evaluate(cfg, layout, adapters, todo, fps, tables, progress=progress)
    preds = pa.concat_tables([tables[n].replace_schema_metadata(None) for n, _ in models])
    acc, mc = accuracy_table(preds), mcnemar_table(preds)
    rundir.write_table(layout.eval_table("predictions"), preds)
    rundir.write_table(layout.eval_table("accuracy"), acc)
    rundir.write_table(layout.eval_table("mcnemar"), mc)
    _cards_with_accuracy(adapters, acc)
    return {"models": len(models), "evaluated": len(todo), "cached": len(models) - len(todo), "mode": mode,
            "engines": n_engines,
            "items": preds.num_rows, "pairs": mc.num_rows}


def _evaluate(cfg, layout: RunLayout, adapters: list[Adapter], todo: list, fps: dict, tables: dict, *,
              progress: bool) -> tuple[str, int]:
    """Evaluate the `todo` models on a pool of engines, each table written to
    its cache as it finishes and added to `tables`; (adapter mode, engines)."""
    import ray

    owned = connect(cfg.resources.ray_address, log_to_driver=progress)
    engines: list = []
    try:
        gpus = ray.cluster_resources().get("GPU", 0)

        mode = adapter_mode(cfg.analysis.eval_mode, gpus=gpus, field="analysis.eval_mode")
        sets = [(es, *eval_prompts(cfg, es)) for es in cfg.analysis.eval_sets]
        engines = _start_engines(cfg, mode, adapters, len(todo))
        # Reward tasks must be schedulable while the engines hold their
        # CPUs (a pool filling the box would otherwise wait forever).
        spare = ray.cluster_resources().get("CPU", 0) - len(engines) * cfg.rollouts.cpus_per_engine
        _serve_all(cfg, layout, engines, todo, names=[a.name for a in adapters], mode=mode, sets=sets,
                   reward_cpus=1.0 if spare >= 1 else 0.0, fps=fps, tables=tables, progress=progress)
        return mode, len(engines)
    finally:
        if engines:
            shutdown_engines(engines)
        if owned:
            ray.shutdown()


def _serve_all(cfg, layout: RunLayout, engines: list, todo: list, *, names: list[str], mode: str, sets: list,
               reward_cpus: float, fps: dict, tables: dict, progress: bool) -> None:
    """Every `todo` model evaluated on one of the engines (lora_id: its index
    in `names` + 1), its table cached and added to `tables`."""
    queue = list(enumerate(todo))
    lock = threading.Lock()

    def serve(engine) -> None:
        # one thread per engine pulls the next model: engines never idle
        # while another still has a queue (models differ in length)
        while True:
            with lock:
                if not queue:
                    return
                k, (name, a) = queue.pop(0)
            t0 = time.time()
            spec = None if a is None else {"name": a.name, "uri": a.uri, "step": a.step,
                                           "lora_id": names.index(a.name) + 1}
            try:
                table = _evaluate_model(cfg, engine, name, spec, mode, sets, reward_cpus)
            except BaseException:
                with lock:
                    queue.clear()  # the other engines stop after their current model
                raise
            table = table.replace_schema_metadata({"fingerprint": fps[name]})
            rundir.write_table(layout.eval_model(name), table)  # a kill keeps finished models
            with lock:
                tables[name] = table
            acc = sum(table.column("correct").to_pylist()) / max(1, table.num_rows)
            print(f"wsg: [eval] {name}: pass@1 {acc:.3f} ({time.time() - t0:.1f}s, {mode})", flush=True)
            bar.advance(1, note=f"{name}: pass@1 {acc:.3f}")

    with console.progress(len(todo) if progress else 0, "eval models") as bar, \
            ThreadPoolExecutor(len(engines)) as pool:
        for f in [pool.submit(serve, e) for e in engines]:
            f.result()  # re-raises the first failure
