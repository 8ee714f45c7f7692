"""Training data, batching and the log-prob path, without Ray (fast)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from train_fixtures import make_rollouts, tiny_cfg, write_run
from wsg.core import rundir
from wsg.core.cells import cell_id, parse_cell_id
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.rollouts.schema import rollouts_table
from wsg.train.data import (
    build_train_set,
    collate,
    micro_batches_per_rank,
    plan_step,
    split_by_length,
    step_items,
)


def test_cell_id_format_and_round_trip():
    assert cell_id("dpo", 42, 5e-7) == "dpo-s42-lr5e-07"
    for loss, seed, lr in [("offline_grpo", 123, 5e-6), ("sft", 0, 1.5e-5), ("ipo", -3, 2.0)]:
        assert parse_cell_id(cell_id(loss, seed, lr)) == (loss, seed, lr)
    for bad in ("dpo-42-lr5e-07", "DPO-s1-lr1e-3", "sft-s1-lrx"):
        with pytest.raises(WsgError):
            parse_cell_id(bad)
    with pytest.raises(WsgError, match="> 0"):
        cell_id("sft", 1, 0.0)


def _table(run):
    return rundir.read_table(RunLayout.of(run).rollouts).to_pandas()


def test_stored_ids_and_retokenized_text_agree(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    cfg = tiny_cfg(max_seq_len=512)
    stored = build_train_set(cfg, run, loss="sft", tokenizer=tokenizer)
    other = cfg.model_copy(update={"rollouts": cfg.rollouts.model_copy(update={"teacher": "some/other-teacher"})})
    retok = build_train_set(other, run, loss="sft", tokenizer=tokenizer)
    assert stored.stats["tokenization"] == "stored" and retok.stats["tokenization"] == "retokenized"
    df = _table(run)
    for i, row in df.iterrows():
        want = list(row.prompt_token_ids) + list(row.completion_token_ids)
        assert stored.tokens[stored.offsets[i]:stored.offsets[i + 1]].tolist() == want
        assert retok.tokens[retok.offsets[i]:retok.offsets[i + 1]].tolist() == want
        assert stored.n_prompt[i] == len(row.prompt_token_ids)
    assert sorted(stored.items.tolist()) == list(range(len(df)))


def test_truncation_keeps_prompt_and_drops_what_cannot_fit(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    df = _table(run)
    n_prompt = df.prompt_token_ids.map(len).to_numpy()
    limit = int(n_prompt.min()) + 5
    ts = build_train_set(tiny_cfg(max_seq_len=limit), run, loss="sft", tokenizer=tokenizer)
    fits = n_prompt < limit
    assert sorted(ts.items.tolist()) == np.flatnonzero(fits).tolist()
    assert (ts.lengths[ts.items] <= limit).all()
    assert (ts.n_prompt[ts.items] == n_prompt[ts.items]).all()
    with pytest.raises(WsgError, match="max_seq_len"):
        build_train_set(tiny_cfg(max_seq_len=int(n_prompt.min())), run, loss="sft", tokenizer=tokenizer)


def test_items_per_loss_and_group_advantages(tmp_path, tokenizer):
    run = write_run(str(tmp_path), tokenizer)
    cfg = tiny_cfg(max_seq_len=512)
    df = _table(run)
    rft = build_train_set(cfg, run, loss="rft", tokenizer=tokenizer)
    assert sorted(rft.items.tolist()) == df.index[df.reward == 1.0].tolist()
    grpo = build_train_set(cfg, run, loss="offline_grpo", tokenizer=tokenizer)
    # Seed §2: Â_i = r_i − mean over the prompt's K samples + b, b = 0.1.
    want = df.reward - df.groupby("prompt_id").reward.transform("mean") + 0.1
    np.testing.assert_allclose(grpo.advantages, want.to_numpy(), rtol=0, atol=1e-6)
    dpo = build_train_set(cfg, run, loss="dpo", tokenizer=tokenizer)
    pairs = rundir.read_table(RunLayout.of(run).pairs).to_pandas()
    assert dpo.paired and len(dpo.items) == len(pairs)
    for (c, r), (_, p) in zip(dpo.items, pairs.iterrows()):
        assert df.prompt_id[c] == df.prompt_id[r] == p.prompt_id
        assert (df.sample_idx[c], df.sample_idx[r]) == (p.chosen_sample_idx, p.rejected_sample_idx)
        assert df.reward[c] == 1.0 and df.reward[r] == 0.0


def test_bad_data_is_refused_with_a_message(tmp_path, tokenizer):
    cfg = tiny_cfg()
    with pytest.raises(WsgError, match="wsg rollouts"):
        build_train_set(cfg, str(tmp_path / "empty"), loss="sft", tokenizer=tokenizer)
    run = write_run(str(tmp_path / "wrong"), tokenizer, all_wrong=True)
    with pytest.raises(WsgError, match="no positive rollouts"):
        build_train_set(cfg, run, loss="rft", tokenizer=tokenizer)
    with pytest.raises(WsgError, match="no \\(chosen, rejected\\) pairs"):
        build_train_set(cfg, run, loss="dpo", tokenizer=tokenizer)
    rows = make_rollouts(tokenizer)[0].to_pylist()
    rows[3]["reward"] = float("nan")
    nan_run = str(tmp_path / "nan")
    rundir.write_table(RunLayout.of(nan_run).rollouts, rollouts_table(rows))
    with pytest.raises(WsgError, match="NaN"):
        build_train_set(cfg, nan_run, loss="sft", tokenizer=tokenizer)


def test_data_order_is_seeded_epochs_of_permutations():
    n, per = 10, 4
    stream = np.concatenate([step_items(n, seed=7, step=s, per_step=per) for s in range(5)])  # 2 epochs
    assert sorted(stream[:n].tolist()) == list(range(n)) and sorted(stream[n:2 * n].tolist()) == list(range(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])
    assert np.array_equal(step_items(n, seed=7, step=3, per_step=per), stream[12:16])
    assert not np.array_equal(step_items(n, seed=8, step=0, per_step=n), stream[:n])


@pytest.mark.parametrize("loss,workers,pdb,ga", [("sft", 2, 3, 2), ("dpo", 2, 4, 1), ("dpo", 1, 1, 3)])
def test_step_plan_partitions_the_global_batch(tmp_path, tokenizer, loss, workers, pdb, ga):
    run = write_run(str(tmp_path), tokenizer)
    ts = build_train_set(tiny_cfg(max_seq_len=512), run, loss=loss, tokenizer=tokenizer)
    e = workers * pdb * ga
    plan = plan_step(ts, seed=1, step=2, effective_batch=e, num_workers=workers, per_device_batch=pdb, grad_accum=ga)
    m, _ = micro_batches_per_rank(paired=ts.paired, per_device_batch=pdb, grad_accum=ga)
    assert [len(p) for p in plan] == [m] * workers
    got = np.concatenate([mb for rank in plan for mb in rank])
    assert sorted(got.tolist()) == sorted(step_items(len(ts.items), seed=1, step=2, per_step=e).tolist())
    for rank in plan:
        for mb in rank:
            batch = collate(ts, mb)
            assert 0 < batch.mask.shape[0] <= max(pdb, 2)  # a pair needs two rows
            assert sum(f.input_ids.shape[0] for f in batch.forwards) == batch.mask.shape[0]
            if ts.paired:
                assert batch.pair_index.shape[0] * 2 == batch.mask.shape[0]


@pytest.fixture(scope="module")
def policy():
    from wsg.train.steps import build_policy
    torch.manual_seed(0)
    pol = build_policy(tiny_cfg(), seed=3)
    # Make the adapter non-zero (fresh LoRA B is 0), as after training.
    with torch.no_grad():
        for n, p in pol.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pol


def _dense(model, ts, seq_rows) -> torch.Tensor:
    """Reference [B, T]: each sequence alone through the full model, log-softmax
    over the whole vocabulary at every position, completion tokens picked."""
    out = torch.zeros(len(seq_rows), int((ts.lengths - ts.n_prompt)[seq_rows].max()), dtype=torch.float64)
    with torch.no_grad():
        for b, r in enumerate(seq_rows):
            ids = torch.from_numpy(ts.tokens[ts.offsets[r]:ts.offsets[r + 1]].astype(np.int64))
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
            npr = int(ts.n_prompt[r])
            out[b, :len(ids) - npr] = logp[np.arange(npr - 1, len(ids) - 1), ids[npr:]]
    return out


@pytest.mark.parametrize("overhead", [0, 64, 10**9])  # many forwards ... one padded forward
def test_completion_logprobs_equal_dense_full_vocab_reference(tmp_path, tokenizer, policy, overhead):
    from wsg.train.steps import CompletionLogprobs, sequence_logprobs

    run = write_run(str(tmp_path), tokenizer, n_prompts=8)
    ts = build_train_set(tiny_cfg(max_seq_len=512), run, loss="dpo", tokenizer=tokenizer)
    idx = np.arange(min(4, len(ts.items)))
    mb = collate(ts, idx, overhead=overhead)
    if overhead == 0:
        assert mb.n_computed == mb.n_tokens  # no padding computed at all
    if overhead == 10**9:
        assert len(mb.forwards) == 1
    with torch.no_grad():
        got = sequence_logprobs(CompletionLogprobs(policy), mb)
    items = ts.items[idx]
    seq_rows = np.concatenate([items[:, 0], items[:, 1]])  # chosen rows, then rejected
    want = _dense(policy, ts, seq_rows)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    ncomp = (ts.lengths - ts.n_prompt)[seq_rows]
    assert torch.equal(mb.mask, torch.arange(mb.mask.shape[1])[None] < torch.from_numpy(ncomp)[:, None])
    assert mb.n_tokens == int(ts.lengths[seq_rows].sum()) <= mb.n_computed


def test_length_split_is_the_cheapest_contiguous_partition():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        lens = np.sort(rng.integers(5, 300, size=int(rng.integers(1, 9))))
        n, oh = len(lens), int(rng.integers(0, 100))

        def cost(cuts):
            bounds = [0, *cuts, n]
            return sum((b - a) * lens[b - 1] + oh for a, b in zip(bounds, bounds[1:]))

        best = min(cost(c) for k in range(n) for c in itertools.combinations(range(1, n), k))
        groups = split_by_length(lens, overhead=oh)
        assert groups[0][0] == 0 and groups[-1][1] == n and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert cost([g[0] for g in groups[1:]]) == best


def test_reference_logprobs_are_the_base_model(tmp_path, tokenizer, policy):
    from wsg.core.models import load_causal_lm
    from wsg.train.steps import (
        CompletionLogprobs,
        reference_logprobs,
        sequence_logprobs,
    )

    run = write_run(str(tmp_path), tokenizer)
    ts = build_train_set(tiny_cfg(max_seq_len=512), run, loss="sft", tokenizer=tokenizer)
    mb = collate(ts, np.arange(4))
    module = CompletionLogprobs(policy)
    ref = reference_logprobs(module, mb)
    assert not ref.requires_grad
    want = _dense(load_causal_lm("tiny-qwen3"), ts, ts.items[np.arange(4)])
    torch.testing.assert_close(ref.double(), want, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        pol = sequence_logprobs(module, mb)
    assert (pol - ref)[mb.mask].abs().max() > 1e-3  # the adapter is on outside the context


@pytest.mark.parametrize("loss", ["dft", "offline_grpo", "dpo"])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tokenizer, loss):
    """One optimizer step over a batch split in 3 micro-batches equals the
    same step over the whole batch at once (one normaliser per step)."""
    from wsg.train.losses import get_loss, validate_hyper
    from wsg.train.steps import PolicyTrainer, build_policy, train_step

    run = write_run(str(tmp_path), tokenizer, n_prompts=8)
    cfg = tiny_cfg(max_seq_len=512)
    ts = build_train_set(cfg, run, loss=loss, tokenizer=tokenizer)
    spec, hyper = get_loss(loss), validate_hyper(loss)
    weights, outs = [], []
    for splits in ([np.arange(6)], [np.arange(2), np.arange(2, 5), np.arange(5, 6)]):
        policy = build_policy(cfg, seed=5)
        with torch.no_grad():  # a non-zero adapter, so DPO's first step has a non-zero margin
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        trainer = PolicyTrainer(policy, lr=1e-2, weight_decay=0.01, warmup_steps=0, max_steps=4,
                                max_grad_norm=1e9, device=torch.device("cpu"), micro_per_step=len(splits))
        out = train_step(trainer, spec, hyper, [collate(ts, s) for s in splits], world=1)
        assert out["grad_norm"] > 0 and out["lr"] == pytest.approx(1e-2) and out["units"] > 0
        outs.append(out)
        weights.append({n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad})
    assert outs[0]["loss"] == pytest.approx(outs[1]["loss"], rel=1e-5)
    assert outs[0]["grad_norm"] == pytest.approx(outs[1]["grad_norm"], rel=1e-4)
    # Adam's first step is ~lr·sign(g): where |g| is tiny, float summation
    # order moves an entry by a small fraction of lr (1e-2), hence atol.
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, tokenizer, loss):
    """train.gradient_checkpointing recomputes activations in the backward:
    the same loss, grad norm and updated LoRA weights as without it."""
    from wsg.train.losses import get_loss, validate_hyper
    from wsg.train.steps import PolicyTrainer, build_policy, train_step

    run = write_run(str(tmp_path), tokenizer, n_prompts=8)
    outs, weights = [], []
    for ckpt in (False, True):
        cfg = tiny_cfg(max_seq_len=512, gradient_checkpointing=ckpt)
        ts = build_train_set(cfg, run, loss=loss, tokenizer=tokenizer)
        policy = build_policy(cfg, seed=5)
        assert policy.get_base_model().is_gradient_checkpointing is ckpt
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        trainer = PolicyTrainer(policy, lr=1e-2, weight_decay=0.01, warmup_steps=0, max_steps=4,
                                max_grad_norm=1e9, device=torch.device("cpu"), micro_per_step=1)
        outs.append(train_step(trainer, get_loss(loss), validate_hyper(loss), [collate(ts, np.arange(4))], world=1))
        weights.append({n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert outs[0]["grad_norm"] > 0
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=1e-6)
    assert outs[1]["grad_norm"] == pytest.approx(outs[0]["grad_norm"], rel=1e-5)
    for n in weights[0]:
        torch.testing.assert_close(weights[1][n], weights[0][n], atol=1e-6, rtol=1e-6)


def test_metrics_table_has_a_column_per_metric():
    from wsg.train.checkpoint import metrics_table

    t = metrics_table([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "loss_x": 0.5}])
    df = t.to_pandas()
    assert df.step.tolist() == [1, 2] and df.loss.tolist() == [2.0, 1.5]
    assert pd.isna(df.loss_x[0]) and df.loss_x[1] == 0.5


_EXPORT = """
import contextlib, os, sys, tempfile, types
from wsg.core.config import LoraCfg
from wsg.core.models import load_causal_lm
from wsg.train.checkpoint import export_adapter
from wsg.train.steps import attach_lora
policy = attach_lora(load_causal_lm("tiny-qwen3"), LoraCfg(r=4, alpha=8), seed=0)
with tempfile.TemporaryDirectory() as d:
    export_adapter(types.SimpleNamespace(policy=policy, gathered=contextlib.nullcontext), d, rank=0)
    sys.stdout.write(",".join(policy.peft_config["default"].target_modules) + "\\n")
    sys.stdout.write(open(os.path.join(d, "adapter_config.json")).read())
"""


def test_adapter_config_bytes_do_not_depend_on_the_hash_seed():
    """peft keeps target_modules as a set, in an order that follows the
    process's string-hash seed; the exported adapter_config.json lists them
    sorted, so one adapter has the same bytes (content hash, eval fingerprint,
    geometry pair order) in every process."""
    import os
    import subprocess
    import sys

    outs = []
    for seed in ("0", "1"):  # two seeds whose set orders differ
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _EXPORT], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        order, config = out.stdout.split("\n", 1)
        outs.append((order, config))
    assert outs[0][0] != outs[1][0]  # peft's own order did differ
    assert outs[0][1] == outs[1][1]
    assert '"target_modules": [\n    "k_proj",\n    "o_proj",\n    "q_proj",\n    "v_proj"\n  ]' in outs[0][1]
