"""Online cells end to end (train/cell.py + train/online.py): real Ray Train
(one worker whose bundle holds the vLLM engine actor too), real vLLM, real
math-verify rewards, on the tiny random Qwen3 (configs/tiny.yaml sizes).
The model is random, so the numbers mean nothing; what is checked is the
cell's contract: PEFT adapters at the checkpoint steps, metrics, the
_COMPLETE marker, skip when complete, resume after a stop."""
from __future__ import annotations

import json
import os
import threading
import time

import pyarrow.parquet as pq
import pytest
from wsg.core import rundir
from wsg.core.cells import CellKey
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config
from wsg.train.cell import run_cell
from wsg.train.online import PromptSet, validate_online

STEP_METRICS = ("step", "loss", "grad_norm", "lr", "reward_mean", "task_reward_mean", "filtered_group_frac",
                "response_len_mean", "loss_clip_frac", "entropy", "gen_s", "reward_s", "train_s", "sync_s",
                "gen_tok_per_s", "behaviour_gap_max")


def tiny(losses=None, **online):
    return parse_config({
        "losses": losses or {},
        "model": {"name": "tiny-qwen3", "max_model_len": 512}, "rollouts": {"dtype": "float32"},
        "data": {"n_prompts": 8},
        "train": {"lora": {"r": 4, "alpha": 8}, "effective_batch": 4, "per_device_batch": 4, "grad_accum": 1,
                  "max_steps": 3, "checkpoint_steps": [2, 3], "max_seq_len": 128},
        "online": {"group_size": 3, "prompts_per_step": 2, "max_tokens": 12, "max_resample_rounds": 1,
                   "overlong_buffer": 4, **online},
        "grid": {"losses": ["online_grpo", "online_dapo"]}, "analysis": {"reference_loss": "online_grpo"}})


def _adapter_ok(path: str) -> bool:
    return rundir.is_complete(path) and {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(path))


@pytest.mark.slow
def test_grpo_cell_stops_resumes_and_completes(ray_module, tmp_path):
    # with a KL term to the base model, so the reference forward runs too
    cfg, run = tiny(losses={"online_grpo": {"hyper": {"kl_coef": 0.01}}}), str(tmp_path / "run")
    first = run_cell(cfg, run, CellKey.of("online_grpo", 42, 1e-3), stop_after=1)
    cdir = RunLayout.of(run).cell(first["cell_id"]).root
    assert first["state"] == "stopped" and first["step"] == 1 and not rundir.is_complete(cdir)
    assert first["sync"] == "merged"  # "auto" on a CPU engine
    assert pq.read_table(os.path.join(cdir, "metrics.parquet")).column("step").to_pylist() == [1]

    done = run_cell(cfg, run, CellKey.of("online_grpo", 42, 1e-3))
    assert done["state"] == "complete" and done["step"] == 3 and rundir.is_complete(cdir)
    for s in (2, 3):
        assert _adapter_ok(RunLayout.of(run).cell(done["cell_id"]).step(s))
    cfg_json = json.load(open(os.path.join(RunLayout.of(run).cell(done["cell_id"]).step(3), "adapter_config.json")))
    assert cfg_json["r"] == 4 and sorted(cfg_json["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    m = pq.read_table(os.path.join(cdir, "metrics.parquet")).to_pylist()
    assert [r["step"] for r in m] == [1, 2, 3]  # step 1 from the stopped run, 2-3 after the resume
    for r in m:
        assert all(k in r for k in STEP_METRICS)
        assert r["sampled_groups"] == 2 and r["samples"] == 6 and r["sample_rounds"] == 1
        assert r["behaviour_gap_max"] < 1e-3  # fp32 engine sampled with the trainer's weights
        assert r["loss_kl_ref_mean"] >= 0
    # the prompt stream continued where the stopped run left it
    assert [r["prompt_cursor"] for r in m] == [2, 4, 6]
    assert not rundir.exists(rundir.join(run, "train_state", done["cell_id"]))

    again = run_cell(cfg, run, CellKey.of("online_grpo", 42, 1e-3))
    assert again["skipped"] is True and again["cell_id"] == done["cell_id"]


def _kill_our_engine_after_step(cdir: str, step: int, done: threading.Event, killed: list) -> None:
    """Fault injection: SIGKILL this test's vLLM engine process (a descendant
    of this process: never another session's) once `step` is recorded."""
    import psutil

    path = os.path.join(cdir, "metrics.parquet")
    while not done.is_set():
        if os.path.exists(path) and step in pq.read_table(path).column("step").to_pylist():
            for p in psutil.Process(os.getpid()).children(recursive=True):
                try:
                    if "EngineActor" in " ".join(p.cmdline()) or p.name().startswith("ray::EngineActor"):
                        p.kill()
                        killed.append(p.pid)
                except psutil.Error:
                    pass
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_dapo_cell_with_lora_sync_survives_an_engine_kill(ray_module, tmp_path):
    cfg, run = tiny(sync="lora"), str(tmp_path / "run")
    cfg = parse_config({**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(mode="json"),
                                                                 "resume_every": 1}})
    cdir = RunLayout.of(run).cell("online_dapo-s7-lr1e-03").root
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_our_engine_after_step, args=(cdir, 1, done, killed), daemon=True)
    killer.start()
    try:
        out = run_cell(cfg, run, CellKey.of("online_dapo", 7, 1e-3))
    finally:
        done.set()
        killer.join()
    assert killed, "the engine was never found to kill"
    assert out["state"] == "complete" and out["sync"] == "lora"
    m = pq.read_table(os.path.join(cdir, "metrics.parquet")).to_pylist()
    assert [r["step"] for r in m] == [1, 2, 3]  # resumed after step 1, no step lost or repeated
    assert [r["prompt_cursor"] for r in m] == sorted(r["prompt_cursor"] for r in m)
    for r in m:
        # dynamic sampling: a round per draw, at most 1 + max_resample_rounds
        assert 1 <= r["sample_rounds"] <= 2 and r["sampled_groups"] == 2 * r["sample_rounds"]
        assert r["trained_groups"] == min(2, r["sampled_groups"] - r["dropped_groups"])
    for s in (2, 3):
        assert _adapter_ok(RunLayout.of(run).cell(out["cell_id"]).step(s))


def test_refuses_what_cannot_run(tmp_path):
    cfg = tiny()
    with pytest.raises(WsgError, match="train.max_seq_len"):
        validate_online(cfg, PromptSet(prompt_ids=[[1] * 120], golds=["1"]))
    wide = parse_config({**cfg.model_dump(mode="json"), "train": {
        **cfg.train.model_dump(mode="json"), "num_workers": 2, "grad_accum": 1, "per_device_batch": 2}})
    with pytest.raises(WsgError, match="num_workers"):
        validate_online(wide)


def test_entropy_probe_matches_the_full_model_distribution():
    import torch
    from wsg.train.data import collate_sequences
    from wsg.train.online import OnlineObserver
    from wsg.train.steps import CompletionLogprobs, build_policy, sequence_logprobs

    cfg = tiny()
    policy = build_policy(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    seqs = [torch.randint(10, 400, (n,), generator=g).tolist() for n in (9, 14, 6)]
    n_prompt = [4, 6, 2]
    mb = collate_sequences(seqs, n_prompt, pad_id=0)
    probe = OnlineObserver(policy)
    with torch.no_grad(), probe.forward():
        sequence_logprobs(CompletionLogprobs(policy), mb)
    # reference: the whole model's logits at every position that predicts a completion token
    ents = []
    with torch.no_grad():
        for s, n0 in zip(seqs, n_prompt):
            logits = policy(input_ids=torch.tensor([s])).logits[0, n0 - 1:len(s) - 1]
            ents.append(torch.distributions.Categorical(logits=logits.float()).entropy())
    want = torch.cat(ents)
    assert probe.count == want.numel()
    assert probe.metrics()["entropy"] == pytest.approx(float(want.mean()), rel=1e-5)
