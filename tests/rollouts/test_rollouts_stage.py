"""The rollouts stage end to end with real vLLM engines in Ray actors
(tiny-qwen3): tables, shards, rerun skips, resume of a lost shard, bad input."""
import json
import os

import pytest
from wsg.core import rundir
from wsg.core.errors import WsgError
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

pytestmark = pytest.mark.slow


def _cfg(**rollouts):
    ro = {"k": 3, "max_tokens": 12, "num_engines": 1, "shard_size": 4, "max_pairs_per_prompt": 2,
          "temperature": 1.0, "seed": 5, **rollouts}
    return parse_config({
        "name": "t", "model": {"name": "tiny-qwen3", "max_model_len": 512},
        "data": {"source": "synthetic", "family": "add_single_digit", "n_prompts": 6, "seed": 0},
        "rollouts": ro})


@pytest.fixture(scope="module")
def first_run(ray_module, tmp_path_factory):
    from wsg.rollouts.stage import run_rollouts

    run = str(tmp_path_factory.mktemp("run"))
    summary = run_rollouts(_cfg(), run, progress=False)
    return run, summary


def test_stage_writes_both_tables(first_run):
    import ray
    from wsg.core.models import load_tokenizer
    from wsg.rollouts import schema
    from wsg.rollouts.datasets import load_problems
    from wsg.rollouts.prompts import render_prompts
    from wsg.rollouts.reward import score

    assert ray.is_initialized()  # the caller's Ray is left running
    run, s = first_run
    out = RunLayout.of(run).rollouts_dir
    assert rundir.is_complete(out)
    shards = sorted(rundir.listdir(rundir.join(out, "shards")))
    assert shards == ["shard_00000.parquet", "shard_00001.parquet"]
    t = rundir.read_table(rundir.join(out, "rollouts.parquet"))
    schema.check_table(t, schema.ROLLOUTS_SCHEMA, "rollouts")
    rows = t.to_pylist()
    assert len(rows) == 18 and s["n_samples"] == 18 and s["n_prompts"] == 6 and not s["skipped"]
    assert s["tok_s"] > 0 and s["n_engines"] == 1

    tok = load_tokenizer("tiny-qwen3")
    probs = {p.id: p for p in load_problems(_cfg().data)}
    for r in rows:
        p = probs[r["prompt_id"]]
        text = render_prompts(tok, [p], instruction=_cfg().data.instruction)[0]
        assert r["prompt_text"] == text and r["problem"] == p.problem and r["gold"] == p.answer
        assert r["prompt_token_ids"] == tok.encode(text, add_special_tokens=False)
        assert r["n_completion_tokens"] == len(r["completion_token_ids"]) == len(r["completion_logprobs"])
        assert all(x <= 0 for x in r["completion_logprobs"])
        assert r["completion"] == tok.decode(r["completion_token_ids"], skip_special_tokens=True)
        assert r["reward"] == score(r["completion"], r["gold"])
        assert r["finish_reason"] in ("stop", "length") and r["teacher"] == "tiny-qwen3"
        assert (r["temperature"], r["top_p"], r["max_tokens"]) == (1.0, 1.0, 12)
    assert sorted((r["prompt_id"], r["sample_idx"]) for r in rows) == \
        sorted((pid, j) for pid in probs for j in range(3))
    pairs = rundir.read_table(rundir.join(out, "pairs.parquet"))
    schema.check_table(pairs, schema.PAIRS_SCHEMA, "pairs")
    assert pairs.to_pylist() == schema.make_pairs(rows, max_pairs_per_prompt=2)


def test_rerun_skips_a_finished_stage(first_run):
    from wsg.rollouts.stage import run_rollouts

    run, s = first_run
    path = RunLayout.of(run).rollouts
    before = os.stat(path).st_mtime_ns
    again = run_rollouts(_cfg(), run, progress=False)
    assert again["skipped"] is True and again["n_samples"] == s["n_samples"]
    assert os.stat(path).st_mtime_ns == before


def test_other_settings_on_a_finished_run_are_refused(first_run):
    from wsg.rollouts.stage import run_rollouts

    run, _ = first_run
    with pytest.raises(WsgError, match="other settings"):
        run_rollouts(_cfg(temperature=0.7), run, progress=False)


def test_resume_samples_only_the_missing_shard_identically(first_run, tmp_path):
    import shutil

    from wsg.rollouts.stage import run_rollouts

    run, _ = first_run
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    out = RunLayout.of(copy).rollouts_dir
    old = rundir.read_table(rundir.join(out, "shards", "shard_00001.parquet")).to_pylist()
    keep = os.stat(rundir.join(out, "shards", "shard_00000.parquet")).st_mtime_ns
    # A crash after shard 0: shard 1, the final tables and the marker are gone.
    for name in ("shards/shard_00001.parquet", "rollouts.parquet", "pairs.parquet", "_COMPLETE"):
        os.remove(os.path.join(out, name))
    s = run_rollouts(_cfg(), copy, progress=False)
    assert s["n_shards_sampled"] == 1 and s["n_samples"] == 18 and not s["skipped"]
    assert os.stat(rundir.join(out, "shards", "shard_00000.parquet")).st_mtime_ns == keep
    new = rundir.read_table(rundir.join(out, "shards", "shard_00001.parquet")).to_pylist()
    # Each shard has its own sampling seed: the resumed shard is the same sample.
    assert [r["completion_token_ids"] for r in new] == [r["completion_token_ids"] for r in old]


def test_a_model_that_does_not_load_names_the_model(ray_module, tmp_path):
    from wsg.rollouts.stage import run_rollouts

    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"],
                                                 "model_type": "no_such_model"}))
    cfg = _cfg()
    cfg.model.name = str(bad)
    with pytest.raises(WsgError, match="broken-model"):
        run_rollouts(cfg, str(tmp_path / "run"), progress=False)
    assert not rundir.exists(rundir.join(str(tmp_path / "run"), "rollouts", "rollouts.parquet"))


def test_missing_model_folder_fails_before_any_engine(tmp_path):
    from wsg.rollouts.stage import run_rollouts

    cfg = _cfg()
    cfg.model.name = str(tmp_path / "nope")
    with pytest.raises(WsgError, match="nope"):
        run_rollouts(cfg, str(tmp_path / "run"), progress=False)
