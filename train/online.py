"""The on-policy batch source of online cells (online_grpo / online_dapo):
a vLLM engine owned by the cell's Ray Train worker, sampling from the
current policy (seed paper §3.4: "on-policy rollouts, group-relative
advantage, math_verify reward"). The cell itself is the one cell of every
loss (train/cell.py, train/worker.py); only where batches come from differs.

Per step (docs/online.md):

  sample G completions per prompt from the CURRENT policy (vLLM, logprobs=1)
  → math-verify reward (+ DAPO overlong shaping) → DAPO dynamic sampling
  → group advantages → micro-batches with the behaviour log-probs
  → [the one train step] → sync the new weights to the engine.

Where the engine runs and how many threads each side uses: train/task.py.
The prompt stream is a pure function of (data seed, cursor) and the engine's
seed of (data seed, step, round), so resuming from a checkpoint (which
stores the cursor) replays the same samples.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from ..core import telemetry
from ..core.config import ExperimentConfig
from ..core.errors import WsgError
from ..core.models import load_tokenizer
from ..rollouts.datasets import load_problems
from ..rollouts.engine import remote_engine, shutdown_engines, wait_ready
from ..rollouts.engine_rules import adapter_mode, online_engine_options, vllm_lora_rank
from ..rollouts.prompts import encode_prompts, render_prompts
from ..rollouts.reward import score_batch
from .data import StepBatch, collate
from .losses import get_loss, precompute_advantages, validate_hyper
from .online_sample import (
    SampledGroup,
    behaviour_tensor,
    build_batch,
    collect_groups,
    micro_batches,
    stream_indices,
)
from .online_sync import (
    WeightSync,
    call_engine,
    node_id,
    on_engine,
    quiet_reload_logs,
    receive_files,
)
from .task import CellTask, PromptSet

# --------------------------------------------------------------------------- driver side

def prepare_prompts(cfg: ExperimentConfig, tokenizer=None) -> PromptSet:
    """The cell's prompts with the same chat template the rollout engines
    apply (rollouts/prompts.py), and their gold answers."""

    problems = load_problems(cfg.data)
    tok = tokenizer or load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    texts = render_prompts(tok, problems, instruction=cfg.data.instruction, system_prompt=cfg.data.system_prompt)
    return PromptSet(prompt_ids=encode_prompts(tok, texts), golds=[p.answer for p in problems])


def validate_online(cfg: ExperimentConfig, prompts: PromptSet | None = None) -> None:
    """What only an online cell can get wrong, refused before anything starts."""
    if cfg.train.num_workers != 1:
        raise WsgError(f"train.num_workers={cfg.train.num_workers}: an online cell trains on one worker beside "
                       "its engine (its batch is online.prompts_per_step x online.group_size); set 1")
    o = cfg.online
    if adapter_mode(o.sync, gpus=o.engine_gpus, field="online.sync") == "lora":
        vllm_lora_rank(cfg.train.lora.r)
    if prompts is not None and prompts.prompt_ids:
        longest = max(len(p) for p in prompts.prompt_ids)
        for field, limit in (("model.max_model_len", cfg.model.max_model_len),
                             ("train.max_seq_len", cfg.train.max_seq_len)):
            if longest + o.max_tokens > limit:
                raise WsgError(f"the longest prompt ({longest} tokens) + online.max_tokens ({o.max_tokens}) "
                               f"exceeds {field}={limit}: raise it or lower online.max_tokens")


# --------------------------------------------------------------------------- observer

class OnlineObserver:
    """What an online step measures beside the loss: the policy's mean
    entropy over completion tokens, read off the LM head's output during the
    training forward (no second forward), and the gap between the trainer's
    log-probs and the engine's behaviour log-probs. Before the step's update
    the trainer holds exactly the weights the engine sampled with: the gap is
    dtype noise unless the engine sampled another policy (the silent
    base-model bug, docs/online.md)."""

    def __init__(self, policy):
        base = policy.get_base_model()
        self.head = base.get_output_embeddings()
        self.cap = getattr(base.config, "final_logit_softcapping", None)
        self.total, self.count = 0.0, 0
        self.gap_sum, self.gap_max, self.gap_n = 0.0, 0.0, 0

    def _hook(self, _mod, _inp, out):
        with torch.no_grad():
            for z in out.detach().split(1024):  # bounded extra memory: rows x vocab
                z = z.float()
                if self.cap:
                    z = torch.tanh(z / self.cap) * self.cap
                logp = torch.log_softmax(z, dim=-1)
                self.total += float(-(logp.exp() * logp).sum())
                self.count += int(z.shape[0])

    def forward(self):
        observer = self

        class _Hooked:
            def __enter__(self):
                self.h = observer.head.register_forward_hook(observer._hook)

            def __exit__(self, *exc):
                self.h.remove()

        return _Hooked()

    def after(self, mb, logprobs: torch.Tensor) -> None:
        with torch.no_grad():
            gap = (logprobs.detach().float() - mb.behaviour_logprobs)[mb.mask.bool()].abs()
            self.gap_sum += float(gap.sum())
            self.gap_n += int(gap.numel())
            self.gap_max = max(self.gap_max, float(gap.max())) if gap.numel() else self.gap_max

    def metrics(self) -> dict:
        return {"entropy": self.total / self.count if self.count else float("nan"),
                "behaviour_gap_mean": self.gap_sum / self.gap_n if self.gap_n else float("nan"),
                "behaviour_gap_max": self.gap_max}


# --------------------------------------------------------------------------- the source

class OnPolicySource:
    """Batches sampled from the current policy by the cell's own engine.

    In a cell, `begin` starts the engine actor (train/task.py places it) and
    `close` ends it; tests and benches may pass a plain in-process
    `EngineActor` as `engine` instead."""

    def __init__(self, task: CellTask, prompts: PromptSet, *, device, engine=None):
        self.task, self.cfg, self.prompts, self.device = task, task.cfg, prompts, torch.device(device)
        lcfg = self.cfg.loss_cfg(task.key.loss)
        self.spec = get_loss(task.key.loss, lcfg.variant)
        self.hyper = validate_hyper(task.key.loss, lcfg.variant, lcfg.hyper)
        self.engine, self._own_engine = engine, engine is None
        self.micro_per_step, self.units_per_micro = 1, self.cfg.train.per_device_batch  # DeepSpeed only
        self.cursor, self.sync, self.policy, self.pad_id = 0, None, None, 0
        self.work = tempfile.mkdtemp(prefix="wsg-online-")
        self._in_bundle = False

    # -- lifecycle -------------------------------------------------------------
    def begin(self) -> None:
        """Start the engine actor (it loads while the trainer builds); a cell
        in a shared worker (train/shared.py) takes the process's engine."""
        if self.engine is not None:
            return
        if self.task.shared:
            self.engine, self._own_engine = _shared_engine(self), False
            return
        self.engine, self._in_bundle = self._start_engine(os.path.join(self.work, "engine"))

    def _start_engine(self, work_dir: str):
        """The cell's engine actor (train/task.py places it) and whether it
        runs inside the worker's own bundle."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        p, o = self.task.placement, self.cfg.online
        opts = online_engine_options(self.cfg, self.task.sync, threads=p.engine_threads)
        here = ray.get_runtime_context().get_node_id()
        if p.engine is None:  # inside this worker's bundle, on this node: its files go in our folder
            actor = remote_engine(num_cpus=0, num_gpus=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
            return actor.remote(opts, work_dir=work_dir), True
        actor = remote_engine(num_cpus=p.engine["CPU"], num_gpus=p.engine.get("GPU", 0),
                              **({"scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=True)}
                                 if o.colocate else {}))
        return actor.remote(opts), False

    def ready(self, policy) -> None:
        """Wait for the engine and push the policy (a resumed adapter, or the fresh one = the base model)."""

        tok = load_tokenizer(self.cfg.model.name, trust_remote_code=self.cfg.model.trust_remote_code)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
        self.policy = policy
        same_node = True
        if hasattr(self.engine, "__ray_call__"):
            import ray

            wait_ready([self.engine], model=self.cfg.model.name)
            same_node = on_engine(self.engine, node_id) == ray.get_runtime_context().get_node_id()
        on_engine(self.engine, quiet_reload_logs)
        engine = self.engine

        def publish(folder, tag, drop):
            if same_node:
                return folder
            files = {}
            for n in os.listdir(folder):
                with open(os.path.join(folder, n), "rb") as f:
                    files[n] = f.read()
            return on_engine(engine, receive_files, tag, files, drop)

        dtype = torch.float32 if self.cfg.rollouts.dtype == "float32" else torch.bfloat16
        self.sync = WeightSync(self.task.sync, work_dir=self.work, name=self.task.cell_id, publish=publish,
                               dtype=dtype, load_merged=lambda p: call_engine(engine, "load_merged_weights", p))
        self.sync.push(policy)

    def close(self) -> None:
        if self._own_engine and self.engine is not None:
            import ray

            if self._in_bundle:  # its files are ours (removed below): no clean vLLM shutdown to wait for
                ray.kill(self.engine)
            else:
                shutdown_engines([self.engine])
        shutil.rmtree(self.work, ignore_errors=True)

    def state(self) -> dict:
        return {"cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))

    # -- one step ----------------------------------------------------------------
    def _sample_round(self, step: int, clock: dict):
        """The function collect_groups calls: n fresh prompts → their groups."""

        o, seed, data = self.cfg.online, self.task.key.data_seed, self.prompts

        def sample(n: int) -> list[SampledGroup]:
            idx = stream_indices(len(data.prompt_ids), seed=seed, start=self.cursor, count=n)
            self.cursor += n
            # Per-round engine seed: the samples are a function of (seed, step, round).
            rseed = int(np.random.SeedSequence([seed, step, clock["rounds"]]).generate_state(1)[0] % (2**31))
            clock["rounds"] += 1
            t0 = time.perf_counter()
            outs = call_engine(self.engine, "generate", [data.prompt_ids[i] for i in idx], n=o.group_size,
                               temperature=o.temperature, top_p=1.0, max_tokens=o.max_tokens, logprobs=True,
                               lora=self.sync.lora, seed=rseed)
            t1 = time.perf_counter()
            groups = []
            for i, out in zip(idx, outs):
                smp = out["samples"]
                texts = [x["text"] for x in smp]
                rewards = np.asarray(score_batch(texts, [data.golds[i]] * len(texts)), dtype=np.float64)
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

    def batch(self, step: int) -> StepBatch:
        """Sample, reward and batch step `step` (0-based) from the current policy."""

        o, t, spec = self.cfg.online, self.cfg.train, self.spec
        clock = {"gen_s": 0.0, "reward_s": 0.0, "gen_tokens": 0, "rounds": 0}
        groups, cs = collect_groups(self._sample_round(step + 1, clock), prompts_per_step=o.prompts_per_step,
                                    dynamic=spec.dynamic_sampling, max_resample_rounds=o.max_resample_rounds)
        ob = build_batch(groups, loss=spec.name, pad_id=self.pad_id, max_tokens=o.max_tokens,
                         advantage_fn=lambda r, g: precompute_advantages(spec, r, g, self.hyper),
                         overlong_buffer=o.overlong_buffer if spec.overlong_shaping else 0,
                         overlong_penalty_value=o.overlong_penalty,
                         overlong_filter=spec.overlong_shaping and o.overlong_filter)
        mbs = []
        for idx in micro_batches(ob, per_device_batch=t.per_device_batch):
            mb = collate(ob.ts, idx)
            mb.behaviour_logprobs = behaviour_tensor(ob, idx, mb.mask.shape[1])
            mbs.append(mb)
        metrics = {**ob.stats, "filtered_group_frac": cs.filtered_group_frac, "dropped_groups": cs.dropped_groups,
                   "sampled_task_reward_mean": cs.sampled_reward_mean, "sampled_groups": cs.sampled_groups,
                   "trained_groups": len(groups), "sample_rounds": cs.rounds, "gen_s": clock["gen_s"],
                   "reward_s": clock["reward_s"], "gen_tokens": clock["gen_tokens"],
                   "gen_tok_per_s": clock["gen_tokens"] / max(clock["gen_s"], 1e-9), "prompt_cursor": self.cursor}

        telemetry.rollout_throughput(metrics["gen_tok_per_s"], stage="online")
        return StepBatch(mbs, OnlineObserver(self.policy), metrics)

    def after_step(self, policy, step: int, *, last: bool) -> dict:
        """Sync the new weights to the engine (not after the last step)."""
        return {"sync_s": 0.0 if last else self.sync.push(policy)}


# --------------------------------------------------------------------------- a shared engine

#: The engine of a shared worker process (train/shared.py): started by its
#: first online cell and kept for the next ones of the same engine options.
#: Each cell's `ready` pushes its own policy (the fresh one equals the base
#: model) before it samples, and every merged reload resets vLLM's prefix
#: cache, so no cell samples from another cell's weights; LoRA versions get
#: ids unique in the process (train/online_sync.py).
_SHARED: dict = {}


def _shared_engine(source: OnPolicySource):
    import ray

    key = repr((online_engine_options(source.cfg, source.task.sync, threads=source.task.placement.engine_threads),
                source.task.placement))
    if _SHARED.get("key") == key:
        try:  # an engine that died with a failed cell is replaced
            ray.get(_SHARED["engine"].__ray_ready__.remote(), timeout=60)
            return _SHARED["engine"]
        except Exception:  # noqa: BLE001 - any failure to answer means a new engine
            pass
    close_shared_engine()
    work = tempfile.mkdtemp(prefix="wsg-shared-engine-")
    engine, _ = source._start_engine(os.path.join(work, "engine"))
    _SHARED.update(key=key, engine=engine, work=work)
    return engine


def close_shared_engine() -> None:
    """End the process's shared engine, if any."""
    import ray

    engine = _SHARED.pop("engine", None)
    if engine is not None:
        ray.kill(engine)
    if "work" in _SHARED:
        shutil.rmtree(_SHARED.pop("work"), ignore_errors=True)
    _SHARED.clear()
