"""Rollout throughput: the stage vs raw vLLM vs transformers, same prompts.

    .venv/bin/python bench/rollouts.py [--config configs/smoke.yaml] [--n-prompts N] [--compiled]

One process, one set of prompts (the config's data, chat-templated), the
config's K / temperature / top-p / max tokens / dtype, measured in sequence:

1. the rollouts stage (`run_rollouts` into a temporary run dir: vLLM engine
   actors on Ray, rewards, shard + table writes): completion tokens / the
   stage's sampling phase (first request to last shard written; engine
   start-up is reported separately);
2. raw `vllm.LLM.generate` in a fresh process, built from the same
   `EngineOptions` (so the same engine settings) and asked for the same
   sampled-token logprobs: completion tokens / generate() time. Twice: with
   the environment a Ray actor of `rollouts.cpus_per_engine` CPUs gets
   (`OMP_NUM_THREADS`, Ray's worker niceness) -- the like-for-like baseline
   the ratio uses -- and with this shell's own environment;
3. transformers `generate` in a fresh process (sampling, K return sequences,
   left-padded batch, KV cache, torch threads = all cores): completion tokens
   up to and including EOS / generate() time.

`--compiled` sets `rollouts.enforce_eager: false` for the stage and the raw
baseline alike (torch.compile'd engines; the first start on a box compiles,
later ones load wsg's compile cache: start-up is reported per row).

Fresh processes keep one phase's memory and threads from the next. Ray starts
its workers at a niceness of 15; phases 2 and 3 run at the engine actor's
niceness, so all run at the same priority when other work shares the box
(the box this was written on was shared). Each row also gives the CPU time
the generating process used (the stage: its engine actors only), and tokens
per CPU-second, which is far less sensitive to other load on a shared box
than tokens per wall second. Prints a table and the wall-clock ratios
(target: stage >= 0.9x raw vLLM and >= 4x transformers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from wsg.core.layout import RunLayout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _stage(cfg, run: str) -> dict:
    from wsg.rollouts.stage import run_rollouts

    t0 = time.perf_counter()
    s = run_rollouts(cfg, run, progress=False)
    s["wall_s"] = time.perf_counter() - t0
    return s


def _prompt_ids(cfg, run: str) -> tuple[list[list[int]], int]:
    """The exact prompt token ids the stage fed its engines (from its table)."""
    from wsg.core import rundir

    t = rundir.read_table(RunLayout.of(run).rollouts,
                          columns=["prompt_id", "sample_idx", "prompt_token_ids", "n_completion_tokens"])
    rows = [r for r in t.to_pylist() if r["sample_idx"] == 0]
    return [r["prompt_token_ids"] for r in rows], sum(t.column("n_completion_tokens").to_pylist())


def _subprocess_phase(phase: str, args, cfg_path: str, prompts_file: str, *, nice: int,
                      env: dict) -> dict:
    """Run one baseline in a fresh python process; return its JSON result."""
    import subprocess

    out = prompts_file + f".{phase}.json"
    cmd = [sys.executable, __file__, "--phase", phase, "--config", cfg_path, "--prompts-file", prompts_file,
           "--out", out] + (["--n-prompts", str(args.n_prompts)] if args.n_prompts else []) + (
               ["--compiled"] if args.compiled else [])
    full_env = {**os.environ, **env}
    subprocess.run(cmd, env=full_env, check=True,
                   preexec_fn=(lambda: os.nice(nice - os.nice(0))) if nice > os.nice(0) else None)
    return json.loads(Path(out).read_text())


def _raw_vllm(cfg, path: str, prompt_ids) -> dict:
    from wsg.rollouts.engine import engine_env
    from wsg.rollouts.engine_rules import rollout_engine_options

    opts = rollout_engine_options(cfg, path)
    work = tempfile.mkdtemp(prefix="wsg-bench-vllm-")
    os.environ.update(engine_env(work, opts))
    import torch
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**opts.llm_kwargs(on_gpu=torch.cuda.is_available()))
    load_s = time.perf_counter() - t0
    ro = cfg.rollouts
    sp = SamplingParams(n=ro.k, temperature=ro.temperature, top_p=ro.top_p, max_tokens=ro.max_tokens,
                        logprobs=0)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sp, use_tqdm=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = sum(len(c.token_ids) for o in outs for c in o.outputs)
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    return {"tokens": toks, "s": dt, "tok_s": toks / dt, "cpu_s": cpu, "tok_per_cpu_s": toks / cpu,
            "load_s": load_s}


def _transformers(cfg, path: str, prompt_ids) -> dict:
    import torch
    from wsg.core.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if cfg.rollouts.dtype == "bfloat16" else torch.float32
    model = load_causal_lm(path, dtype=dtype)
    tok = load_tokenizer(path)
    ro = cfg.rollouts
    width = max(len(p) for p in prompt_ids)
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                             temperature=ro.temperature, top_p=ro.top_p, top_k=0,
                             max_new_tokens=ro.max_tokens, num_return_sequences=ro.k,
                             pad_token_id=pad)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = 0
    for row in out[:, width:].tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos:
                n = i + 1
                break
        toks += n
    return {"tokens": toks, "s": dt, "tok_s": toks / dt, "cpu_s": cpu, "tok_per_cpu_s": toks / cpu}


def _phase(name: str, result) -> None:
    # Each phase as soon as it ends: a long run on a shared box can be killed.
    print(f"[bench] {name}: " + json.dumps(result, default=str), file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: configs/smoke.yaml)")
    ap.add_argument("--n-prompts", type=int, default=None, help="override data.n_prompts")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--compiled", action="store_true",
                    help="compiled vLLM engines (rollouts.enforce_eager: false) for the stage and raw vLLM")
    ap.add_argument("--phase", choices=["raw_vllm", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = _parser().parse_args()

    from wsg.core.config import default_config_path
    from wsg.core.models import resolve_model
    from wsg.sweep.config import load_config

    cfg_path = str(args.config or default_config_path())
    cfg = load_config(cfg_path)
    if args.n_prompts:
        cfg.data.n_prompts = args.n_prompts
    if args.compiled:
        cfg.rollouts.enforce_eager = False
    path = resolve_model(cfg.rollouts.teacher or cfg.model.name)
    if args.phase:  # a child process: one baseline
        prompt_ids = json.loads(Path(args.prompts_file).read_text())
        fn = _raw_vllm if args.phase == "raw_vllm" else _transformers
        Path(args.out).write_text(json.dumps(fn(cfg, path, prompt_ids)))
        return

    with tempfile.TemporaryDirectory(prefix="wsg-bench-run-") as run:
        stage = _stage(cfg, run)
        prompt_ids, stage_tokens = _prompt_ids(cfg, run)
        _phase("stage", stage)
        pfile = os.path.join(run, "prompt_ids.json")
        Path(pfile).write_text(json.dumps(prompt_ids))
        nice = stage.get("engine", {}).get("nice", 0)
        actor_env = {"OMP_NUM_THREADS": str(max(1, int(cfg.rollouts.cpus_per_engine)))}
        raw = _subprocess_phase("raw_vllm", args, cfg_path, pfile, nice=nice, env=actor_env)
        _phase("raw_vllm (Ray actor env)", raw)
        raw_shell = _subprocess_phase("raw_vllm", args, cfg_path, pfile, nice=nice, env={})
        _phase("raw_vllm (shell env)", raw_shell)
        hf = None if args.skip_transformers else _subprocess_phase(
            "transformers", args, cfg_path, pfile, nice=nice, env={})
        _phase("transformers", hf)

    res = _result(cfg, str(args.config or default_config_path()), len(prompt_ids), stage, stage_tokens,
                  raw, raw_shell, hf)
    _print(res)


def _result(cfg, config: str, n_prompts: int, stage: dict, stage_tokens: int, raw: dict, raw_shell: dict,
            hf: dict | None) -> dict:
    return {
        "config": config, "model": cfg.model.name,
        "prompts": n_prompts, "k": cfg.rollouts.k, "max_tokens": cfg.rollouts.max_tokens,
        "dtype": cfg.rollouts.dtype, "enforce_eager": cfg.rollouts.enforce_eager, "cpus": os.cpu_count(),
        "nice": os.nice(0),
        "stage": {"tokens": stage_tokens, "s": stage["gen_s"], "tok_s": stage["tok_s"],
                  "cpu_s": stage["engine_cpu_s"], "tok_per_cpu_s": stage_tokens / stage["engine_cpu_s"],
                  "engine_start_s": stage.get("engine_start_s"), "wall_s": round(stage["wall_s"], 2),
                  "reward_mean": stage["reward_mean"], "frac_prompts_mixed": stage["frac_prompts_mixed"]},
        "n_engines": stage.get("n_engines", 1),
        "raw_vllm": raw, "raw_vllm_shell_env": raw_shell, "transformers": hf,
        # The demanding baseline: whichever raw vLLM set-up was faster on this box.
        "stage_over_raw_vllm": stage["tok_s"] / max(raw["tok_s"], raw_shell["tok_s"]),
        # Overhead per engine: one engine of the pool vs one raw engine with the same CPUs.
        "stage_per_engine_over_raw_actor_env": stage["tok_s"] / stage.get("n_engines", 1) / raw["tok_s"],
        "stage_over_transformers": (stage["tok_s"] / hf["tok_s"]) if hf else None,
        "load_avg_1m_end": os.getloadavg()[0],
    }


def _print(res: dict) -> None:
    raw, raw_shell, hf = res["raw_vllm"], res["raw_vllm_shell_env"], res["transformers"]
    print(f"{'':28s}{'tokens':>9s}{'seconds':>9s}{'tok/s':>9s}{'CPU s':>9s}{'tok/CPU-s':>10s}")
    for name, r in (("rollouts stage (Ray+vLLM)", res["stage"]), ("raw vllm (actor env)", raw),
                    ("raw vllm (shell env)", raw_shell), ("transformers.generate", hf)):
        if r:
            print(f"{name:28s}{r['tokens']:9d}{r['s']:9.1f}{r['tok_s']:9.1f}{r['cpu_s']:9.1f}"
                  f"{r['tok_per_cpu_s']:10.1f}")
    print(f"stage / best raw vLLM = {res['stage_over_raw_vllm']:.3f}x (target >= 0.9); per engine vs raw "
          f"with the same CPUs: {res['stage_per_engine_over_raw_actor_env']:.3f}x ({res['n_engines']} engine(s))")
    if hf:
        print(f"stage / transformers = {res['stage_over_transformers']:.2f}x (target >= 4)")
    print(json.dumps(res, indent=1, default=float))


if __name__ == "__main__":
    main()
