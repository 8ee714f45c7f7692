"""The rollouts stage: K teacher samples per prompt, binary rewards, DPO pairs.

    problems (rollouts.datasets) -> shards of `shard_size` prompts
      -> teacher: vLLM EngineActors on Ray (default) or an OpenAI endpoint
      -> math rewards in Ray tasks (rollouts.reward)
      -> <run>/rollouts/shards/shard_00000.parquet ...   (one per shard)
      -> rollouts.parquet, pairs.parquet, then the _COMPLETE marker.

Idempotent (docs/design.md "Run directory"): a finished stage (marker present) is
skipped; a rerun after a crash keeps the shards already written and samples
only the missing ones. Each shard records the hash of the settings that made
it; a shard from different settings is refused rather than mixed in. Each
shard is sampled with its own seed (rollouts.seed + shard index) so a resumed
run samples a missing shard as a fresh run would have.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core import integrity, rundir, telemetry
from ..core.console import say
from ..core.errors import WsgError
from ..core.layout import RunLayout
from ..core.models import load_tokenizer, resolve_model
from ..core.session import session
from ..core.teacher import teacher_name
from . import schema
from .datasets import Problem, load_problems_with_report
from .endpoint import EndpointClient
from .engine import shutdown_engines, start_engines, wait_ready
from .engine_rules import rollout_engine_options
from .prompts import build_messages, encode_prompts, render_prompts
from .reward import score_many, warm_up
from .scripted import run_scripted
from .teacher import teacher_profile

# Shards queued per engine: the next one is already waiting while the driver
# scores and writes the previous one, so engines never idle between shards.
QUEUE_DEPTH = 2


def spec_hash(cfg) -> str:
    """Hash of every setting that changes the rollouts (not how many engines)."""
    r = cfg.rollouts.model_dump(mode="json")
    for k in ("num_engines", "cpus_per_engine", "gpus_per_engine", "reward_timeout_s"):
        r.pop(k, None)
    if r.get("endpoint"):
        for k in ("concurrency", "max_retries", "timeout_s", "api_key_env"):
            r["endpoint"].pop(k, None)
    spec = {"model": cfg.model.name, "max_model_len": cfg.model.max_model_len,
            "data": cfg.data.model_dump(mode="json"), "rollouts": r}
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def first_submissions(n_engines: int, n_shards: int, depth: int = QUEUE_DEPTH) -> list[int]:
    """The engine of each shard submitted up front: breadth first, so every
    engine gets a shard before any gets a second (depth-first queueing left
    the second engine of the default run idle), at most `depth` per engine."""
    return [e for _ in range(depth) for e in range(n_engines)][:n_shards]


def pool_size(num_engines, *, cpus_per_engine: float, gpus_per_engine: float,
              n_shards: int, resources: dict) -> tuple[int, float]:
    """(engines, GPUs per engine). "auto": one engine per `gpus_per_engine`
    GPUs (1 if unset) on a GPU cluster, one engine on a CPU box (vLLM keeps a
    core for its scheduler, docs/stack.md). Never more engines than shards."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    g = gpus_per_engine if gpus_per_engine > 0 else (1.0 if gpus > 0 else 0.0)
    if num_engines == "auto":
        n = int(gpus // g) if g > 0 else 1
    else:
        n = int(num_engines)
    n = max(1, min(n, n_shards))
    if n * cpus_per_engine > cpus:
        raise WsgError(f"rollouts.num_engines={num_engines} x rollouts.cpus_per_engine={cpus_per_engine} "
                       f"needs {n * cpus_per_engine:g} CPUs but the Ray cluster has {cpus:g}; "
                       "lower one of them")
    if g > 0 and n * g > gpus:
        raise WsgError(f"rollouts.num_engines={num_engines} x gpus_per_engine={g:g} needs {n * g:g} GPUs "
                       f"but the Ray cluster has {gpus:g}; lower rollouts.num_engines or use 'auto'")
    return n, g


def _log(progress: bool, msg: str) -> None:
    if progress:
        say(f"  [rollouts] {msg}")


def _existing_shard(layout: RunLayout, i: int, spec: str, ids: list[str]) -> bool:
    path = layout.rollout_shard(i)
    if not rundir.exists(path):
        return False
    t = rundir.read_table(path, columns=["prompt_id"])
    meta = {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()}
    if meta.get("spec_hash") != spec:
        raise WsgError(f"{path} was written with other rollout settings (spec {meta.get('spec_hash')} "
                       f"!= {spec}); use a new --run folder, or delete {layout.rollouts_dir} "
                       "to resample")
    if sorted(set(t.column("prompt_id").to_pylist())) != sorted(ids):
        raise WsgError(f"{path} holds other prompts than this config selects (did the data file "
                       f"change?); delete {layout.rollouts_dir} to resample")
    return True


def _rows_for_shard(cfg, problems: list[Problem], texts: list[str], results: list[dict],
                    rewards: list[float]) -> list[dict]:
    ro, teacher = cfg.rollouts, teacher_name(cfg)
    rows, k = [], 0
    for p, text, res in zip(problems, texts, results):
        pids = [int(t) for t in res["prompt_token_ids"]]
        for j, s in enumerate(res["samples"]):
            rows.append({
                "prompt_id": p.id, "sample_idx": j, "problem": p.problem, "prompt_text": text,
                "completion": s["text"], "gold": p.answer, "reward": float(rewards[k]),
                "prompt_token_ids": pids, "completion_token_ids": [int(t) for t in s["token_ids"]],
                "completion_logprobs": s.get("logprobs"), "n_prompt_tokens": len(pids),
                "n_completion_tokens": len(s["token_ids"]), "finish_reason": s["finish_reason"],
                "teacher": teacher, "temperature": float(ro.temperature), "top_p": float(ro.top_p),
                "max_tokens": int(ro.max_tokens)})
            k += 1
    return rows


@dataclass
class _Stats:
    tokens: int = 0
    samples: int = 0
    reward_timeouts: int = 0
    t_first: Optional[float] = None
    t_last: Optional[float] = None
    reward_cpus: float = 1.0


@dataclass
class SamplingJob:
    """What a rollout backend is given (the vLLM engines, an OpenAI-compatible
    endpoint, the scripted teacher: BACKENDS): the shards still to sample.
    For each shard it calls `finish_shard` with the policy's prompt texts and
    the engine-shaped results ({"prompt_token_ids", "samples": [{"text",
    "token_ids", "logprobs", "finish_reason"}]} per problem), which rewards
    the samples and writes the shard; it returns its own summary fields."""

    cfg: Any
    layout: RunLayout
    spec: str                   # the sampling spec hash every shard records
    shards: list                # list[list[Problem]]
    pending: list[int]          # indices of the shards to sample
    progress: bool
    model: Optional[str]        # the teacher's name (vllm backend; each engine resolves it)
    stats: _Stats = field(default_factory=_Stats)

    def finish_shard(self, i: int, texts: list[str], results: list[dict]) -> None:
        cfg, problems, stats = self.cfg, self.shards[i], self.stats
        comps = [s["text"] for r in results for s in r["samples"]]
        golds = [p.answer for p, r in zip(problems, results) for _ in r["samples"]]
        rewards, rstats = score_many(comps, golds, timeout_s=cfg.rollouts.reward_timeout_s,
                                     num_cpus=stats.reward_cpus)
        rows = _rows_for_shard(cfg, problems, texts, results, rewards)
        rundir.write_table(self.layout.rollout_shard(i), schema.rollouts_table(
            rows, {"spec_hash": self.spec, "shard": i, "n_shards": len(self.shards)}))
        stats.tokens += sum(r["n_completion_tokens"] for r in rows)
        stats.samples += len(rows)
        stats.reward_timeouts += rstats["n_timeouts"]
        stats.t_last = time.perf_counter()
        el = stats.t_last - stats.t_first
        _log(self.progress, f"shard {i + 1}/{len(self.shards)}: {len(rows)} samples, reward "
                            f"{sum(rewards) / max(len(rewards), 1):.3f}, {stats.tokens / el:.0f} tok/s so far")
        telemetry.rollout_throughput(stats.tokens / el)  # the dashboard's wsg_rollout_tokens_per_s


# ------------------------------------------------------------------- backends
def _run_vllm(job: SamplingJob) -> dict:
    import ray

    cfg, shards, pending, stats, progress = job.cfg, job.shards, job.pending, job.stats, job.progress
    name = teacher_name(cfg)
    ro = cfg.rollouts
    n, g = pool_size(ro.num_engines, cpus_per_engine=ro.cpus_per_engine, gpus_per_engine=ro.gpus_per_engine,
                     n_shards=len(pending), resources=ray.cluster_resources())
    spare = float(ray.cluster_resources().get("CPU", 0)) - n * ro.cpus_per_engine
    # Reward tasks must be schedulable while the engines hold their CPUs.
    stats.reward_cpus = 1.0 if spare >= 1 else 0.0
    t0 = time.perf_counter()
    engines = start_engines(rollout_engine_options(cfg, job.model), n, num_cpus=ro.cpus_per_engine,
                            num_gpus=g)
    warm = warm_up(stats.reward_cpus)
    try:
        infos = wait_ready(engines, model=name)
        ray.get(warm)
        start_s = time.perf_counter() - t0
        _log(progress, f"{n} engine(s) of {name} ready in {start_s:.1f} s")
        todo = [i for i in pending]
        all_probs = [p for i in pending for p in shards[i]]
        texts_all = ray.get(engines[0].apply_chat_template.remote(
            all_probs, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt))
        ids_all = ray.get(engines[0].tokenize.remote(texts_all))
        off, texts, ids = 0, {}, {}
        for i in pending:
            texts[i], ids[i] = texts_all[off:off + len(shards[i])], ids_all[off:off + len(shards[i])]
            off += len(shards[i])
        inflight: dict[Any, tuple[int, int]] = {}

        def submit(e: int) -> None:
            if todo:
                i = todo.pop(0)
                ref = engines[e].generate.remote(
                    ids[i], n=ro.k, temperature=ro.temperature, top_p=ro.top_p,
                    max_tokens=ro.max_tokens, logprobs=True, seed=ro.seed * 1_000_003 + i)
                inflight[ref] = (i, e)

        cpu0 = ray.get([e.cpu_seconds.remote() for e in engines])
        stats.t_first = time.perf_counter()
        for e in first_submissions(n, len(todo)):
            submit(e)
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            i, e = inflight.pop(ref)
            submit(e)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayError as exc:
                raise WsgError(f"a vLLM engine of {name!r} failed while sampling shard {i}: "
                               f"{str(exc).strip().splitlines()[-1][:400]}; rerun the same command "
                               "to resume (finished shards are kept)") from None
            job.finish_shard(i, texts[i], results)
        cpu1 = ray.get([e.cpu_seconds.remote() for e in engines])
        return {"n_engines": n, "engine_start_s": round(start_s, 2), "engine": infos[0],
                "engine_cpu_s": round(sum(cpu1) - sum(cpu0), 2)}
    finally:
        shutdown_engines(engines)


def _run_openai(job: SamplingJob) -> dict:
    import ray

    cfg, shards, stats = job.cfg, job.shards, job.stats
    ro, ep = cfg.rollouts, cfg.rollouts.endpoint
    client = EndpointClient.from_config(ep)
    stats.reward_cpus = 1.0 if float(ray.cluster_resources().get("CPU", 0)) >= 1 else 0.0
    # prompt_text/token ids are the POLICY's: that is what training consumes.
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    stats.t_first = time.perf_counter()
    for i in job.pending:
        probs = shards[i]
        texts = render_prompts(tok, probs, instruction=cfg.data.instruction,
                               system_prompt=cfg.data.system_prompt)
        sent = texts if ep.api == "completions" else [
            build_messages(p.problem, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt)
            for p in probs]
        outs = client.generate(sent, n=ro.k, temperature=ro.temperature, top_p=ro.top_p,
                               max_tokens=ro.max_tokens)
        pids = encode_prompts(tok, texts)
        results = []
        for pid, o in zip(pids, outs):
            samples = [{"text": s["text"], "finish_reason": s["finish_reason"], "logprobs": None,
                        "token_ids": tok.encode(s["text"], add_special_tokens=False)} for s in o["samples"]]
            results.append({"prompt_token_ids": pid, "samples": samples})
        job.finish_shard(i, texts, results)
    return {"n_engines": 0, "endpoint": ep.base_url}


def _run_scripted(job: SamplingJob) -> dict:
    return run_scripted(job)


BACKENDS = {"vllm": _run_vllm, "openai": _run_openai, "scripted": _run_scripted}


# ---------------------------------------------------------------------- stage
def run_rollouts(cfg, run: str | RunLayout, *, progress: bool = True) -> dict:
    """Run (or resume, or skip) the rollouts stage of `run`; returns a summary:
    n_prompts, n_samples, reward_mean, frac_prompts_mixed, n_pairs, tok_s,
    skipped, and details (load report, engines, timings)."""

    layout = RunLayout.of(run)
    spec = spec_hash(cfg)
    done = _completed(layout, spec, progress)
    if done is not None:
        return done

    problems, report = load_problems_with_report(cfg.data)
    size = cfg.rollouts.shard_size
    shards = [problems[a:a + size] for a in range(0, len(problems), size)]
    pending = [i for i, sh in enumerate(shards) if not _existing_shard(layout, i, spec, [p.id for p in sh])]
    _log(progress, f"{len(problems)} prompts in {len(shards)} shard(s), {len(pending)} to sample "
                   f"(K={cfg.rollouts.k}, T={cfg.rollouts.temperature}, teacher {teacher_name(cfg)})")

    if pending and cfg.rollouts.backend == "vllm":
        # Before Ray and engines start: a missing folder fails in a second. The
        # engines get the name and resolve it on their own nodes.

        resolve_model(teacher_name(cfg), trust_remote_code=cfg.model.trust_remote_code)

    job = SamplingJob(cfg=cfg, layout=layout, spec=spec, shards=shards, pending=pending, progress=progress,
                      model=teacher_name(cfg))
    t0 = time.perf_counter()
    with session(cfg.resources.ray_address, log_to_driver=progress):
        extra: dict = {"n_engines": 0}
        if pending:
            extra = BACKENDS[cfg.rollouts.backend](job)
    return _finish(job, report, extra, t0)


def _completed(layout: RunLayout, spec: str, progress: bool) -> dict | None:
    """The summary of rollouts already complete with these settings (None
    when they are not); finished rollouts of other settings are refused."""
    out_dir = layout.rollouts_dir
    if integrity.revoke(out_dir, "rollouts", run=layout.root) and rundir.exists(layout.rollouts) \
            and rundir.exists(layout.pairs):
        info = integrity.info(out_dir)
        if info.get("spec_hash") not in (None, spec):
            raise WsgError(f"{out_dir} holds finished rollouts of other settings (spec "
                           f"{info.get('spec_hash')} != {spec}); use a new --run folder or delete it")
        _log(progress, f"already complete: {layout.rollouts}")
        return {**info, "skipped": True}
    return None


def _finish(job: SamplingJob, report, extra: dict, t0: float) -> dict:
    """Join the shards into the final rollouts and pairs tables, then mark
    the stage complete with its summary."""
    import pyarrow as pa

    cfg, spec, stats, layout = job.cfg, job.spec, job.stats, job.layout
    final_r, final_p = layout.rollouts, layout.pairs
    gen_s = (stats.t_last - stats.t_first) if stats.t_first and stats.t_last else 0.0
    tables = [rundir.read_table(layout.rollout_shard(i)) for i in range(len(job.shards))]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    rows = table.to_pylist()
    pairs = schema.make_pairs(rows, max_pairs_per_prompt=cfg.rollouts.max_pairs_per_prompt)
    meta = {"spec_hash": spec, "teacher": teacher_name(cfg)}
    # Final tables last, the marker after them: readers trust only the marker.
    rundir.write_table(final_r, table.replace_schema_metadata(schema._meta(meta)))
    rundir.write_table(final_p, schema.pairs_table(pairs, meta))
    summ = schema.reward_summary(rows)
    summary = {
        **summ, "n_pairs": len(pairs), "skipped": False, "spec_hash": spec,
        "teacher": teacher_name(cfg), "n_shards": len(job.shards), "n_shards_sampled": len(job.pending),
        "n_completion_tokens_sampled": stats.tokens, "gen_s": round(gen_s, 3),
        "tok_s": round(stats.tokens / gen_s, 2) if gen_s > 0 else None,
        "stage_s": round(time.perf_counter() - t0, 3), "n_reward_timeouts": stats.reward_timeouts,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in rows)),
        "data": report.as_dict(), **extra,
        # Who wrote the rollouts and how varied their text is (rollouts/teacher.py).
        "teacher_profile": teacher_profile(cfg, rows),
    }
    rundir.mark_complete(layout.rollouts_dir, summary, files=[final_r, final_p], root=layout.root)
    _log(job.progress, f"done: {summary['n_samples']} samples, reward {summary['reward_mean']:.3f}, "
                       f"{summary['frac_prompts_mixed']:.0%} prompts mixed, {len(pairs)} pairs, "
                       f"{summary['tok_s']} tok/s")
    return summary
