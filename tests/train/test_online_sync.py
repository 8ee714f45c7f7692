"""Weight sync from the trainer to the rollout engine (train/online_sync.py).

The slow guard test is the one issue #5 asks for: silent base-model
sampling is a known bug class of RL frameworks (verl, OpenRLHF). After a few
real training steps (real vLLM, real rewards, SmolLM2-135M in float32 on
both sides), the engine's teacher-forced log-probs of a fixed completion
must equal the trainer's under the current adapter, and differ from the
base model's, for both sync strategies.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.rollouts.engine_rules import adapter_mode, vllm_lora_rank
from wsg.rollouts.merge import merged_weights, write_merged
from wsg.sweep.config import parse_config
from wsg.train.online_sync import WeightSync
from wsg.train.steps import CompletionLogprobs, build_policy

# fp32 vLLM vs fp32 transformers agree within 5e-5 (docs/stack.md "vLLM"); the bound
# leaves room for summation-order differences over a longer completion.
MATCH_TOL = 1e-3


def tiny_cfg(**online):
    return parse_config({
        "model": {"name": "tiny-qwen3", "max_model_len": 512}, "rollouts": {"dtype": "float32"},
        "train": {"lora": {"r": 4, "alpha": 8}, "effective_batch": 4, "per_device_batch": 4, "grad_accum": 1,
                  "max_steps": 4, "checkpoint_steps": [4]},
        "online": online, "grid": {"losses": ["online_grpo"]}, "analysis": {"reference_loss": "online_grpo"}})


def randomized_policy(cfg, seed=1):
    policy = build_policy(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return policy


def test_auto_is_merged_on_cpu_and_lora_on_gpu():
    assert adapter_mode("auto", gpus=0, field="online.sync") == "merged"
    assert adapter_mode("auto", gpus=1, field="online.sync") == "lora"
    assert adapter_mode("auto", gpus=0.5, field="analysis.eval_mode") == "lora"  # one rule for every engine
    assert adapter_mode("lora", gpus=0, field="online.sync") == "lora"
    with pytest.raises(WsgError, match="online.sync"):
        adapter_mode("both", gpus=0, field="online.sync")


def test_vllm_lora_rank_rounds_up_to_an_accepted_rank():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 32, 33)] == [1, 8, 8, 16, 32, 64]
    with pytest.raises(WsgError, match="train.lora.r"):
        vllm_lora_rank(1000)


def test_merged_weights_equal_peft_merge_and_unload():
    cfg = tiny_cfg()
    policy = randomized_policy(cfg)
    got = merged_weights(policy)
    want = copy.deepcopy(policy).merge_and_unload().state_dict()
    # every parameter of each attention block, nothing else, none of LoRA's own
    layers = {k.rsplit(".self_attn.", 1)[0] for k in got}
    assert layers == {f"model.layers.{i}" for i in range(2)}
    for k, v in got.items():
        assert ".self_attn." in k and "lora" not in k
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6)
    attn = {k for k in want if ".self_attn." in k}
    assert set(got) == attn
    # the merge starts from the frozen base: merging twice does not accumulate
    again = merged_weights(policy)
    for k in got:
        assert torch.equal(got[k], again[k])
    from wsg.core.models import load_causal_lm

    base = load_causal_lm("tiny-qwen3").state_dict()
    moved = [k for k in got if k.endswith("q_proj.weight")]
    assert all(not torch.allclose(got[k], base[k]) for k in moved)


def test_lora_sync_uses_a_fresh_name_and_id_per_version(tmp_path):
    cfg = tiny_cfg()
    policy = randomized_policy(cfg)
    published = []
    sync = WeightSync("lora", work_dir=str(tmp_path), name="cell", load_merged=lambda p: None,
                      publish=lambda folder, tag, drop: published.append((tag, drop)) or folder)
    seen, ids = set(), []
    for v in range(1, 5):
        sync.push(policy)
        name, lid, path = sync.lora
        assert (name, lid) not in seen and name.endswith(f"v{v}") and lid not in ids
        seen.add((name, lid))
        ids.append(lid)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(path))
    # only the current and the previous version stay on disk
    assert sorted(os.listdir(tmp_path)) == ["v3", "v4"]
    assert published[-1] == ("v4", ["v2"])
    # a second cell on the same (shared) engine never gets an id the first used
    other = WeightSync("lora", work_dir=str(tmp_path / "b"), name="cell-b", load_merged=lambda p: None)
    other.push(policy)
    assert other.lora[1] not in ids and ids == sorted(ids)


def test_merged_sync_writes_what_the_engine_loads(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_cfg()
    policy = randomized_policy(cfg)
    loaded = []
    sync = WeightSync("merged", work_dir=str(tmp_path), name="cell", load_merged=loaded.append,
                      dtype=torch.bfloat16)
    sync.push(policy)
    assert sync.lora is None and len(loaded) == 1
    tensors = load_file(os.path.join(loaded[0], "model.safetensors"))
    want = merged_weights(policy)
    assert set(tensors) == set(want)
    for k in want:
        assert tensors[k].dtype == torch.bfloat16
        torch.testing.assert_close(tensors[k].float(), want[k], rtol=1e-2, atol=1e-2)
    assert write_merged(policy, str(tmp_path / "again")) == str(tmp_path / "again")


# --------------------------------------------------------------------------- the guard (real vLLM)

def smollm2_cfg():
    return parse_config({
        "model": {"name": "smollm2-135m-instruct", "max_model_len": 512}, "rollouts": {"dtype": "float32"},
        "data": {"n_prompts": 32, "seed": 3},
        "train": {"lora": {"r": 8, "alpha": 16}, "effective_batch": 8, "per_device_batch": 8, "grad_accum": 1,
                  "max_steps": 10, "checkpoint_steps": [10], "max_seq_len": 256, "warmup_frac": 0.0},
        "online": {"group_size": 4, "prompts_per_step": 2, "max_tokens": 32},
        "grid": {"losses": ["online_grpo"]}, "analysis": {"reference_loss": "online_grpo"}})


def trainer_logprobs(policy, prompt, comp, *, adapter: bool) -> list[float]:
    """Teacher-forced log-probs through the trainer's own forward (train/steps.py)."""
    from wsg.train.data import collate_sequences
    from wsg.train.steps import reference_logprobs, sequence_logprobs

    mod = CompletionLogprobs(policy).eval()
    mb = collate_sequences([prompt + comp], [len(prompt)], pad_id=0)
    with torch.no_grad():
        lp = sequence_logprobs(mod, mb) if adapter else reference_logprobs(mod, mb)
    return lp[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["merged", "lora"])
def test_engine_samples_from_the_current_adapter(tmp_path, strategy):
    from wsg.core.cells import CellKey
    from wsg.rollouts.engine import EngineActor
    from wsg.rollouts.engine_rules import online_engine_options
    from wsg.train.online import OnPolicySource, prepare_prompts
    from wsg.train.task import CellTask, placement
    from wsg.train.worker import fit

    cfg = smollm2_cfg()
    prompts = prepare_prompts(cfg)
    prompt_ids = prompts.prompt_ids
    # The cell's own loop, in this process, around a plain in-process engine.
    task = CellTask(cfg=cfg, layout=RunLayout.of(str(tmp_path / "run")), key=CellKey.of("online_grpo", 42, 5e-3), fingerprint={},
                    data=prompts, online=True, placement=placement(cfg, online=True), sync=strategy, stop_after=2)
    engine = EngineActor(online_engine_options(cfg, strategy), work_dir=str(tmp_path / "vllm"))
    source = OnPolicySource(task, prompts, device="cpu", engine=engine)
    try:
        assert engine.info()["dtype"] == "float32"
        out = fit(task, source, rank=0, world=1, device="cpu", report=lambda row, ckpt: None, resume_dir=None)
        rows = out["history"]
        assert [r["step"] for r in rows] == [1, 2] and out["status"]["state"] == "stopped"
        source.sync.push(out["policy"])  # a stopped cell does not sync its last step: push it here
        policy = out["policy"]
        assert sum(r["trained_groups"] * (r["filtered_group_frac"] < 1) for r in rows) > 0, \
            "no step had a group with both outcomes: nothing was learned, the guard cannot discriminate"
        # while sampling, the engine used the weights the trainer then scored with
        assert max(r["behaviour_gap_max"] for r in rows) < MATCH_TOL

        tok = engine.tokenizer
        comp = tok.encode("The sum is 7, so the answer is \\boxed{7}.", add_special_tokens=False)
        comp.append(tok.eos_token_id)
        prompt = prompt_ids[0]
        got = np.array(engine.score_logprobs(prompt, comp, lora=source.sync.lora))
        current = np.array(trainer_logprobs(policy, prompt, comp, adapter=True))
        base = np.array(trainer_logprobs(policy, prompt, comp, adapter=False))
        print(f"{strategy}: |engine - trainer| max {np.abs(got - current).max():.2e}, |base - trainer| max "
              f"{np.abs(base - current).max():.3f}, behaviour gap max {max(r['behaviour_gap_max'] for r in rows):.2e}")
        assert np.abs(got - current).max() < MATCH_TOL
        # the adapter moved the policy well beyond the tolerance, so a base-model
        # engine would have failed the check above
        assert np.abs(base - current).max() > 20 * MATCH_TOL
        assert np.abs(got - base).max() > 20 * MATCH_TOL
        if strategy == "lora":
            # the same engine without the LoRA request is the base model
            plain = np.array(engine.score_logprobs(prompt, comp))
            assert np.abs(plain - base).max() < MATCH_TOL
    finally:
        source.close()
        engine.shutdown()


def test_receive_files_places_a_version_and_drops_stale_ones(tmp_path):
    from types import SimpleNamespace

    from wsg.train.online_sync import on_engine, receive_files

    engine = SimpleNamespace(work_dir=str(tmp_path))  # what the engine actor exposes: its own folder
    p1 = on_engine(engine, receive_files, "v1", {"a.bin": b"one", "b.json": b"{}"}, [])
    p2 = on_engine(engine, receive_files, "v2", {"a.bin": b"two"}, ["v0"])
    p3 = on_engine(engine, receive_files, "v3", {"a.bin": b"three"}, ["v1"])
    assert open(os.path.join(p2, "a.bin"), "rb").read() == b"two"
    assert open(os.path.join(p3, "a.bin"), "rb").read() == b"three"
    assert not os.path.exists(p1) and sorted(os.listdir(os.path.dirname(p3))) == ["v2", "v3"]
