"""One on-policy cell (online_grpo / online_dapo) = a trainer and its own vLLM
engine, reserved together in one Ray placement group (seed paper §3.4:
"on-policy rollouts, group-relative advantage, math_verify reward").

Layout: the driver (`run_online_cell`: a Tune trial or `wsg train`) reserves
the bundles [trainer, engine] (PACK when online.colocate, else SPREAD),
starts the trainer actor in bundle 0, which starts the engine actor in
bundle 1. Per step (docs/online.md):

  sample G completions per prompt from the CURRENT policy (vLLM, logprobs=1)
  → math-verify reward (+ DAPO overlong shaping) → DAPO dynamic sampling
  → group advantages → one optimizer step (clipped ratio vs vLLM's
  behaviour log-probs) → sync the new weights to the engine.

Checkpoints are PEFT folders `<run>/cells/<cell>/step_<N>/` at
train.checkpoint_steps and the last step; resume state (LoRA, optimizer,
schedule, RNG, prompt cursor, metrics history) goes to
`<run>/train_state/<cell>/step_<N>/`. A complete cell returns at once; an
incomplete one resumes from its latest resume state. A trainer process that
dies (OOM, node loss) is restarted up to train.max_failures times.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from sweep import rundir, telemetry
from sweep.config import ONLINE_LOSSES, ExperimentConfig, config_hash, parse_config
from sweep.errors import WsgError
from train import checkpoint as ck
from train.cell_id import cell_id as make_cell_id
from train.online_sample import (
    SampledGroup, behaviour_tensor, build_batch, collect_groups, micro_batches, stream_indices,
)
from train.online_sync import (
    WeightSync, call_engine, node_id, on_engine, quiet_reload_logs, receive_files, resolve_sync, vllm_lora_rank,
)

FINGERPRINT_FILE = "fingerprint.json"
PG_TIMEOUT_S = 1800.0


def _process_deaths() -> tuple:
    import ray.exceptions as rex

    return (rex.RayActorError, rex.OutOfMemoryError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)

# --------------------------------------------------------------------------- driver

def prepare_prompts(cfg: ExperimentConfig) -> tuple[list[list[int]], list[str]]:
    """(prompt token ids, gold answers) of the cell's prompts: the same chat
    template the rollout engines apply (rollouts/prompts.py)."""
    from rollouts.datasets import load_problems
    from rollouts.prompts import encode_prompts, render_prompts
    from sweep.models import load_tokenizer

    problems = load_problems(cfg.data)
    tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    texts = render_prompts(tok, problems, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt)
    return encode_prompts(tok, texts), [p.answer for p in problems]


def validate_online(cfg: ExperimentConfig, *, loss: str, seed: int, lr: float, prompt_ids=None) -> None:
    """Refuse a cell that cannot run, before anything is reserved."""
    from train.losses import get_loss, validate_hyper

    if loss not in ONLINE_LOSSES:
        raise WsgError(f"{loss!r} is not an online loss; online cells train {', '.join(ONLINE_LOSSES)}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise WsgError(f"learning rate must be a finite number > 0, got lr={lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise WsgError(f"seed must be an integer, got {seed!r}")
    lcfg = cfg.loss_cfg(loss)
    get_loss(loss, lcfg.variant)
    validate_hyper(loss, lcfg.variant, lcfg.hyper)
    if cfg.train.num_workers != 1:
        raise WsgError(f"train.num_workers={cfg.train.num_workers}: an online cell trains on one worker beside "
                       "its engine (its batch is online.prompts_per_step x online.group_size); set 1")
    o = cfg.online
    if resolve_sync(o.sync, on_gpu=o.engine_gpus > 0) == "lora":
        vllm_lora_rank(cfg.train.lora.r)
    if prompt_ids is not None:
        longest = max(len(p) for p in prompt_ids)
        for field, limit in (("model.max_model_len", cfg.model.max_model_len), ("train.max_seq_len",
                                                                                cfg.train.max_seq_len)):
            if longest + o.max_tokens > limit:
                raise WsgError(f"the longest prompt ({longest} tokens) + online.max_tokens ({o.max_tokens}) "
                               f"exceeds {field}={limit}: raise it or lower online.max_tokens")


def _fingerprint(cfg: ExperimentConfig, *, loss: str, seed: int, lr: float) -> dict:
    """What fixes the cell's trajectory: resuming under a different one is refused."""
    train = cfg.train.model_dump(mode="json")
    for k in ("max_failures", "cpus_per_worker", "gpus_per_worker", "resume_every", "deepspeed"):
        train.pop(k)
    online = cfg.online.model_dump(mode="json", exclude={"sync", "colocate", "engine_cpus", "engine_gpus"})
    return {"loss": loss, "seed": seed, "lr": float(lr), "model": cfg.model.model_dump(mode="json"),
            "data": cfg.data.model_dump(mode="json"), "train": train, "online": online,
            "loss_cfg": cfg.loss_cfg(loss).model_dump(mode="json", exclude={"lrs", "lr_scale"}),
            "engine": {"dtype": cfg.rollouts.dtype, "seed": cfg.rollouts.seed}}


def _state_root(run: str, cid: str) -> str:
    return rundir.join(run, "train_state", cid)


def _delete(uri: str) -> None:
    if rundir.exists(uri):
        fs, path = rundir.resolve(uri)
        fs.delete_dir(path) if fs.get_file_info(path).type.name == "Directory" else fs.delete_file(path)


def _bundles(cfg: ExperimentConfig) -> list[dict]:
    t, o = cfg.train, cfg.online
    trainer = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.gpus_per_worker > 0 else {})}
    engine = {"CPU": o.engine_cpus, **({"GPU": o.engine_gpus} if o.engine_gpus > 0 else {})}
    return [trainer, engine]


def _idle_engine_cpus(pg, o) -> float:
    """CPUs of the engine's bundle the trainer may borrow: on-policy steps
    alternate (sample, then train, then sync), so a CPU engine on the
    trainer's node is idle while the trainer computes, and torch can use its
    cores too; the engine likewise borrows the trainer's while it samples
    (1 engine, 2 threads vs 1: 174 vs 109 tok/s on the 2-core box). 0 when the engine
    has a GPU or sits on another node (borrowing would oversubscribe a core
    Ray gave someone else)."""
    from ray.util.placement_group import placement_group_table

    if o.engine_gpus > 0:
        return 0.0
    nodes = placement_group_table(pg).get("bundles_to_node_id", {})
    return float(o.engine_cpus) if nodes.get(0) is not None and nodes.get(0) == nodes.get(1) else 0.0


def _reserve(cfg: ExperimentConfig):
    """The cell's placement group, ready; a request the cluster can never
    satisfy is an error naming the config fields."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = _bundles(cfg)
    total = ray.cluster_resources()
    for res, fields in (("CPU", "train.cpus_per_worker + online.engine_cpus"),
                        ("GPU", "train.gpus_per_worker + online.engine_gpus")):
        need = sum(b.get(res, 0) for b in bundles)
        if need > total.get(res, 0) + 1e-9:
            raise WsgError(f"an online cell needs {need:g} {res} ({fields}) but the Ray cluster has "
                           f"{total.get(res, 0):g}; lower them or add nodes")
    pg = placement_group(bundles, strategy="PACK" if cfg.online.colocate else "SPREAD")
    try:
        ray.get(pg.ready(), timeout=PG_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise WsgError(f"the online cell's resources {bundles} were not free within {PG_TIMEOUT_S:.0f} s "
                       "(other cells hold them?); lower resources.max_concurrent_cells") from None
    return pg


def worker_config(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float, stop_after: int | None = None,
                  fingerprint: dict | None = None, sync: str | None = None) -> dict:
    """What the trainer actor needs (plain data: it crosses process boundaries)."""
    strategy = resolve_sync(sync or cfg.online.sync, on_gpu=cfg.online.engine_gpus > 0)
    return {"cfg": cfg.model_dump(mode="json"), "run": run, "cell_id": make_cell_id(loss, seed, lr), "loss": loss,
            "seed": seed, "lr": float(lr), "stop_after": stop_after, "sync": strategy,
            "fingerprint": fingerprint or _fingerprint(cfg, loss=loss, seed=seed, lr=lr)}


def engine_options(cfg: ExperimentConfig, strategy: str):
    """The online engine: the policy's base model, LoRA enabled only for LoRA sync."""
    from rollouts.engine import EngineOptions
    from rollouts.stage import eager_unless_gpu
    from sweep.models import resolve_model

    return EngineOptions(
        model=resolve_model(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code),
        dtype=cfg.rollouts.dtype, seed=cfg.rollouts.seed, max_model_len=cfg.model.max_model_len,
        enforce_eager=eager_unless_gpu(cfg, cfg.online.engine_gpus),
        enable_lora=strategy == "lora",
        max_lora_rank=vllm_lora_rank(cfg.train.lora.r) if strategy == "lora" else 16,
        trust_remote_code=cfg.model.trust_remote_code)


def run_online_cell(cfg: ExperimentConfig, run: str, *, loss: str, seed: int, lr: float, resume: bool = True,
                    stop_after: int | None = None) -> dict:
    """Train one online cell; returns its summary (also in `_COMPLETE`), or
    {"skipped": True, ...} when the cell is already complete.

    resume=False starts over (deleting the resume state); stop_after: stop
    resumably after that step (the cell is then not complete)."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cid = make_cell_id(loss, seed, lr)
    cdir = rundir.cell_dir(run, cid)
    if rundir.is_complete(cdir):
        return {**rundir.read_json(rundir.join(cdir, rundir.COMPLETE_MARKER)), "skipped": True}
    prompt_ids, golds = prepare_prompts(cfg)
    validate_online(cfg, loss=loss, seed=seed, lr=lr, prompt_ids=prompt_ids)
    t = cfg.train
    if stop_after is not None and not 1 <= stop_after <= t.max_steps:
        raise WsgError(f"stop_after={stop_after} must lie in 1..train.max_steps={t.max_steps}")
    fingerprint = _fingerprint(cfg, loss=loss, seed=seed, lr=lr)
    fp_uri = rundir.join(cdir, FINGERPRINT_FILE)
    if not resume:
        _delete(_state_root(run, cid))
    elif rundir.exists(fp_uri) and rundir.read_json(fp_uri) != fingerprint:
        raise WsgError(f"cell {cid} was started under a different config ({fp_uri}); resuming would mix two "
                       "runs: restore the old config, or start the cell over (resume=False / delete its folder)")
    rundir.write_json(fp_uri, fingerprint)
    config = worker_config(cfg, run, loss=loss, seed=seed, lr=lr, stop_after=stop_after, fingerprint=fingerprint)
    strategy = config["sync"]

    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.resources.ray_address, include_dashboard=False, log_to_driver=True)
        started = True
    t0 = time.time()
    try:
        data = ray.put({"prompt_ids": prompt_ids, "golds": golds})
        pg = _reserve(cfg)
        try:
            status = None
            for attempt in range(t.max_failures + 1):
                worker = ray.remote(OnlineWorker).options(
                    num_cpus=t.cpus_per_worker, num_gpus=t.gpus_per_worker, max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
                ).remote(config)
                try:
                    status = ray.get(worker.run.remote(pg, data))
                    break
                except Exception as err:  # noqa: BLE001 - sorted below
                    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
                    if isinstance(cause, WsgError):
                        raise cause from None
                    # The trainer's or the engine's process died (OOM kill, node
                    # loss): a new trainer resumes from the last saved state. A
                    # Python error in the loop would fail again: raised as is.
                    if not isinstance(cause, _process_deaths()):
                        raise
                    if attempt == t.max_failures:
                        raise WsgError(f"cell {cid}: a process of the cell died {attempt + 1} time(s) "
                                       f"(train.max_failures={t.max_failures}): {type(cause).__name__}; "
                                       "rerun to resume from its last saved state") from None
                    print(f"wsg: cell {cid}: {type(cause).__name__}; restarting from the last saved state "
                          f"(try {attempt + 2} of {t.max_failures + 1})", flush=True)
                finally:
                    ray.kill(worker)
        finally:
            remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()
    if status["state"] == "failed":
        raise WsgError(status["message"])
    steps = sorted(s for s in set(t.checkpoint_steps) | {t.max_steps} if s <= status["step"])
    summary = {"cell_id": cid, "loss": loss, "variant": cfg.loss_cfg(loss).variant, "seed": seed, "lr": float(lr),
               "state": status["state"], "step": status["step"], "max_steps": t.max_steps,
               "checkpoints": [rundir.step_dir(run, cid, s) for s in steps], "final": status.get("final", {}),
               "sync": strategy, "num_workers": 1, "config_hash": config_hash(cfg),
               "wall_s": round(time.time() - t0, 3), "skipped": False}
    if status["state"] == "complete":
        rundir.mark_complete(cdir, summary)
        _delete(_state_root(run, cid))  # resume state is useless once the cell is whole
    return summary


class _EntropyProbe:
    """Mean entropy of the policy over completion tokens, read off the LM
    head's output during the training forward (no second forward)."""

    def __init__(self, policy):
        base = policy.get_base_model()
        self.head = base.get_output_embeddings()
        self.cap = getattr(base.config, "final_logit_softcapping", None)
        self.total, self.count, self._h = 0.0, 0, None

    def _hook(self, _mod, _inp, out):
        with torch.no_grad():
            for z in out.detach().split(1024):  # bounded extra memory: rows x vocab
                z = z.float()
                if self.cap:
                    z = torch.tanh(z / self.cap) * self.cap
                logp = torch.log_softmax(z, dim=-1)
                self.total += float(-(logp.exp() * logp).sum())
                self.count += int(z.shape[0])

    def __enter__(self):
        self._h = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._h.remove()

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


# --------------------------------------------------------------------------- trainer actor

class OnlineWorker:
    """The trainer of one online cell: a Ray actor in bundle 0 (`run`), or a
    plain object driving an in-process EngineActor (`setup` + `step`, as
    the sync test and the bench do)."""

    def __init__(self, config: dict):
        self.config = config
        self.cfg = parse_config(config["cfg"])

    def run(self, pg, data) -> dict:
        """Actor entry point: start the engine in bundle 1, train, clean up."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rollouts.engine import remote_engine, replace_options, shutdown_engines
        from train.steps import configure_threads

        o = self.cfg.online
        borrow = _idle_engine_cpus(pg, o)
        configure_threads(self.cfg.train.cpus_per_worker + borrow)
        opts = engine_options(self.cfg, self.config["sync"])
        if borrow:  # and the engine borrows the trainer's cores while the trainer waits for samples
            opts = replace_options(opts, cpu_threads=max(1, int(o.engine_cpus + self.cfg.train.cpus_per_worker)))
        engine = remote_engine(num_cpus=o.engine_cpus, num_gpus=o.engine_gpus, scheduling_strategy=
                               PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1)
                               ).remote(opts)
        try:
            self.setup(engine, ray.get(data) if isinstance(data, ray.ObjectRef) else data)
            return self.train()
        finally:
            shutdown_engines([engine])
            self.close()

    # -- setup ---------------------------------------------------------------
    def setup(self, engine, data: dict) -> None:
        """Build (or resume) the trainer, wait for the engine, first sync."""
        from rollouts.engine import wait_ready

        self.engine, self.data = engine, data
        self.work = tempfile.mkdtemp(prefix="wsg-online-")
        self._build()  # the trainer loads while an actor engine starts
        if hasattr(engine, "__ray_call__"):
            import ray

            wait_ready([engine], model=self.cfg.model.name)
            same_node = on_engine(engine, node_id) == ray.get_runtime_context().get_node_id()
        else:
            same_node = True
        on_engine(engine, quiet_reload_logs)

        def publish(folder, tag, drop):
            if same_node:
                return folder
            files = {}
            for n in os.listdir(folder):
                with open(os.path.join(folder, n), "rb") as f:
                    files[n] = f.read()
            return on_engine(engine, receive_files, tag, files, drop)

        dtype = torch.float32 if self.cfg.rollouts.dtype == "float32" else torch.bfloat16
        self.sync = WeightSync(self.config["sync"], work_dir=self.work, name=self.config["cell_id"],
                               publish=publish, dtype=dtype,
                               load_merged=lambda p: call_engine(engine, "load_merged_weights", p))
        self.sync.push(self.policy)  # a resumed adapter, or the fresh one (= the base model)

    def close(self) -> None:
        shutil.rmtree(getattr(self, "work", ""), ignore_errors=True)

    def _build(self) -> None:
        from sweep.models import load_tokenizer
        from train.losses import get_loss, required_fields, validate_hyper
        from train.steps import PolicyTrainer, build_policy, resolve_autocast, warmup_steps

        c, cfg, t = self.config, self.cfg, self.cfg.train
        use_gpu = t.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        lcfg = cfg.loss_cfg(c["loss"])
        self.spec = get_loss(c["loss"], lcfg.variant)
        self.hyper = validate_hyper(c["loss"], lcfg.variant, lcfg.hyper)
        self.needs_ref = "ref_logprobs" in required_fields(self.spec, self.hyper)
        self.policy = build_policy(cfg, seed=c["seed"], device=self.device)
        self.trainer = PolicyTrainer(
            self.policy, lr=c["lr"], weight_decay=t.weight_decay, max_steps=t.max_steps,
            warmup_steps=warmup_steps(t.max_steps, t.warmup_frac), max_grad_norm=t.max_grad_norm,
            device=self.device, autocast=resolve_autocast(t.precision, self.device))
        tok = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
        self.start, self.history, self.cursor = 0, [], 0
        root = _state_root(c["run"], c["cell_id"])
        done = [int(n[5:]) for n in rundir.listdir(root)
                if n.startswith("step_") and rundir.is_complete(rundir.join(root, n))]
        if done:
            with tempfile.TemporaryDirectory(prefix="wsg-resume-") as tmp:
                rundir.download_dir(rundir.join(root, f"step_{max(done)}"), tmp)
                state = ck.load_resume_state(self.trainer, tmp, rank=0)
            self.start, self.cursor = int(state["step"]), int(state["cursor"])
            self.history = list(state["history"])[: self.start]

    # -- the loop ------------------------------------------------------------
    def train(self) -> dict:
        c, t = self.config, self.cfg.train
        run, cid = c["run"], c["cell_id"]
        publish = set(t.checkpoint_steps) | {t.max_steps}
        status = {"state": "complete", "step": t.max_steps}
        for s in range(self.start + 1, t.max_steps + 1):
            stopping = c["stop_after"] is not None and s >= c["stop_after"] and s < t.max_steps
            row = self.step(s, sync=s < t.max_steps and not stopping)
            self.history.append(row)
            if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                status = {"state": "failed", "step": s, "message":
                          f"cell {cid}: loss or gradient norm is not finite at step {s} (loss={row['loss']}, "
                          f"grad_norm={row['grad_norm']}); lower the learning rate ({c['lr']:g})"}
                break
            if s in publish:
                ck.publish_adapter(self.trainer, run, cid, s, rank=0)
            if s in publish or stopping or (t.resume_every and s % t.resume_every == 0):
                self._save_state(run, cid, s)
            ck.write_metrics(run, cid, self.history)
            if stopping:
                status = {"state": "stopped", "step": s}
                break
        ck.write_metrics(run, cid, self.history)
        status["final"] = self.history[-1] if self.history else {}
        return status

    def step(self, s: int, *, sync: bool = True) -> dict:
        """One step: sample, reward, train, then (sync=True) push the new
        weights to the engine. Returns the step's metrics row."""
        row = self._step(s)
        row["sync_s"] = self.sync.push(self.policy) if sync else 0.0
        row["step_time_s"] += row["sync_s"]
        loss = self.config["loss"]
        telemetry.train_step(loss, s, float(row["loss"]), row["completion_tokens"] / max(row["train_s"], 1e-9))
        telemetry.rollout_throughput(row["gen_tok_per_s"], stage="online")
        return row

    def _save_state(self, run: str, cid: str, step: int) -> None:
        root = _state_root(run, cid)
        with tempfile.TemporaryDirectory(prefix="wsg-resume-") as tmp:
            ck.save_resume_state(self.trainer, tmp, rank=0, state={
                "step": step, "cursor": self.cursor, "history": self.history,
                "fingerprint": self.config["fingerprint"]})
            rundir.upload_dir(tmp, rundir.join(root, f"step_{step}"))
        for n in rundir.listdir(root):  # the new state is whole (marker written): older ones can go
            if n.startswith("step_") and int(n[5:]) < step:
                _delete(rundir.join(root, n))

    def _sample_round(self, step: int, clock: dict):
        """The function collect_groups calls: n fresh prompts → their groups."""
        from rollouts.reward import score_batch

        o, seed, data = self.cfg.online, self.config["seed"], self.data

        def sample(n: int) -> list[SampledGroup]:
            idx = stream_indices(len(data["prompt_ids"]), seed=seed, start=self.cursor, count=n)
            self.cursor += n
            # Per-round engine seed: the samples are a function of (seed, step, round).
            rseed = int(np.random.SeedSequence([seed, step, clock["rounds"]]).generate_state(1)[0] % (2**31))
            clock["rounds"] += 1
            t0 = time.perf_counter()
            outs = call_engine(self.engine, "generate", [data["prompt_ids"][i] for i in idx], n=o.group_size,
                         temperature=o.temperature, top_p=1.0, max_tokens=o.max_tokens, logprobs=True,
                         lora=self.sync.lora, seed=rseed)
            t1 = time.perf_counter()
            groups = []
            for i, out in zip(idx, outs):
                smp = out["samples"]
                texts = [x["text"] for x in smp]
                rewards = np.asarray(score_batch(texts, [data["golds"][i]] * len(texts)), dtype=np.float64)
                groups.append(SampledGroup(
                    prompt_index=int(i), prompt_token_ids=list(out["prompt_token_ids"]),
                    completion_token_ids=[x["token_ids"] for x in smp],
                    completion_logprobs=[x["logprobs"] for x in smp],
                    finish_reasons=[x["finish_reason"] for x in smp], task_rewards=rewards, texts=texts))
                clock["gen_tokens"] += sum(len(x["token_ids"]) for x in smp)
            clock["gen_s"] += t1 - t0
            clock["reward_s"] += time.perf_counter() - t1
            return groups

        return sample

    def _step(self, step: int) -> dict:
        from train.data import collate
        from train.losses import LossBatch, count_units, normaliser_from_count, precompute_advantages

        c, o, t = self.config, self.cfg.online, self.cfg.train
        dapo = c["loss"] == "online_dapo"
        t0 = time.perf_counter()
        clock = {"gen_s": 0.0, "reward_s": 0.0, "gen_tokens": 0, "rounds": 0}
        groups, cs = collect_groups(self._sample_round(step, clock),
                                    prompts_per_step=o.prompts_per_step, dynamic=dapo,
                                    max_resample_rounds=o.max_resample_rounds)
        ob = build_batch(groups, loss=c["loss"], pad_id=self.pad_id, max_tokens=o.max_tokens,
                         advantage_fn=lambda r, g: precompute_advantages(self.spec, r, g, self.hyper),
                         overlong_buffer=o.overlong_buffer if dapo else 0,
                         overlong_penalty_value=o.overlong_penalty, overlong_filter=dapo and o.overlong_filter)
        t1 = time.perf_counter()
        mbs = [(collate(ob.ts, idx), idx) for idx in micro_batches(ob, per_device_batch=t.per_device_batch)]

        def loss_batch(mb, lp, beh, ref):
            return LossBatch(logprobs=lp, mask=mb.mask, rewards=mb.rewards, group_ids=mb.group_ids,
                             behaviour_logprobs=beh, ref_logprobs=ref, advantages=mb.advantages)

        units = sum(count_units(self.spec, loss_batch(mb, torch.zeros(mb.mask.shape), None, None), self.hyper)
                    for mb, _ in mbs)
        normaliser = normaliser_from_count(units)
        loss_sum, tokens, stat_w, stat_sum, gap_sum, gap_max = 0.0, 0, {}, {}, 0.0, 0.0
        probe = _EntropyProbe(self.policy)
        for mb, idx in mbs:
            beh = behaviour_tensor(ob, idx, mb.mask.shape[1]).to(self.device)
            mb = mb.to(self.device)
            ref = self.trainer.ref_logprobs(mb) if self.needs_ref else None
            with probe:
                lp = self.trainer.logprobs(mb)
            value, stats = self.spec.fn(loss_batch(mb, lp, beh, ref), normaliser=normaliser, **self.hyper)
            self.trainer.backward(value)
            with torch.no_grad():
                # Before this step's update the trainer holds exactly the weights
                # the engine sampled with: the gap is dtype noise unless the engine
                # sampled another policy (the silent base-model bug, docs/online.md).
                gap = (lp.detach().float() - beh)[mb.mask.bool()].abs()
                gap_sum += float(gap.sum())
                gap_max = max(gap_max, float(gap.max())) if gap.numel() else gap_max
            loss_sum += float(value.detach())
            w = int(mb.mask.sum())  # the loss metrics are means over this micro-batch's tokens
            tokens += w
            for k, v in stats.items():
                if math.isfinite(float(v)) and w > 0:
                    stat_w[k] = stat_w.get(k, 0.0) + w
                    stat_sum[k] = stat_sum.get(k, 0.0) + w * float(v)
        # No trained row (every group dropped/filtered): the step still counts
        # and the schedule advances; AdamW skips parameters without gradients.
        opt = self.trainer.step() if math.isfinite(loss_sum) else {"grad_norm": float("nan"), "lr": float("nan")}
        t2 = time.perf_counter()
        row = {"step": step, "loss": loss_sum, "grad_norm": opt["grad_norm"], "lr": opt["lr"], "units": units,
               "completion_tokens": tokens, **{k: v for k, v in ob.stats.items()},
               "filtered_group_frac": cs.filtered_group_frac, "dropped_groups": cs.dropped_groups,
               "sampled_task_reward_mean": cs.sampled_reward_mean,
               "sampled_groups": cs.sampled_groups, "trained_groups": len(groups), "sample_rounds": cs.rounds,
               "entropy": probe.mean, "clip_frac": float("nan"),
               "gen_s": clock["gen_s"], "reward_s": clock["reward_s"], "train_s": t2 - t1, "sync_s": 0.0,
               "gen_tokens": clock["gen_tokens"], "gen_tok_per_s": clock["gen_tokens"] / max(clock["gen_s"], 1e-9),
               "step_time_s": t2 - t0, "prompt_cursor": self.cursor,
               "behaviour_gap_mean": gap_sum / tokens if tokens else float("nan"), "behaviour_gap_max": gap_max}
        for k in stat_sum:
            row[f"loss_{k}"] = stat_sum[k] / stat_w[k]
        row["clip_frac"] = row.get("loss_clip_frac", float("nan"))
        return row
