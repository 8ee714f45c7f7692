"""The eval stage with a real vLLM engine on tiny-qwen3 adapters (slow).

The tiny random model never answers correctly, so the checks that make the
numbers non-trivial are on the completions: each model's greedy completion
must equal transformers' greedy generation of the same weights (base, or base
+ the peft adapter), the adapters must change what the model writes, and the
merged-weights and LoRA serving modes must agree.
"""
from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
import pytest
import torch
from statsmodels.stats.proportion import proportion_confint
from test_functional import make_tiny_run
from wsg.core import rundir
from wsg.core.layout import RunLayout

pytestmark = pytest.mark.slow


def _hf_greedy(adapter_path, prompts, max_new_tokens):
    from peft import PeftModel
    from wsg.core.models import load_causal_lm, load_tokenizer
    from wsg.rollouts.prompts import encode_prompts

    tok = load_tokenizer("tiny-qwen3")
    model = load_causal_lm("tiny-qwen3")
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path).eval()
    out = []
    for ids in encode_prompts(tok, prompts):
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        out.append(tok.decode(y[0, len(ids):], skip_special_tokens=True))
    return out


def test_run_eval(tmp_path, ray_module):
    from wsg.analysis.evaluate import model_cache_path, run_eval
    from wsg.analysis.report import build_report
    from wsg.analysis.stats import MCNEMAR_SCHEMA

    cfg, run = make_tiny_run(tmp_path)
    two = cfg.model_copy(update={"rollouts": cfg.rollouts.model_copy(update={"num_engines": 2})})
    summary = run_eval(two, run, progress=False)  # two engines share the models
    assert summary["mode"] == "merged" and summary["evaluated"] == 10 and summary["cached"] == 0
    assert summary["engines"] == 2
    preds = rundir.read_table(rundir.join(run, "eval", "predictions.parquet"))
    rows = preds.to_pylist()
    assert preds.num_rows == 10 * 6
    by = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    assert set(by) == {"base", "sft_copy"} | {f"{c}@{s}" for c in
                                               ("sft-s42-lr1e-04", "rft-s42-lr1e-04", "dpo-s42-lr1e-05",
                                                "sft-s7-lr1e-04") for s in (1, 2)}
    assert all(r["step"] == (-1 if m in ("base", "sft_copy") else int(m[-1])) for m, rs in by.items() for r in rs)

    # Completions are what transformers generates greedily from the same weights.
    prompts = [r["prompt"] for r in by["base"]]
    n_new = cfg.analysis.eval_max_tokens
    assert [r["completion"] for r in by["base"]] == _hf_greedy(None, prompts, n_new)
    dpo = RunLayout.of(run).cell("dpo-s42-lr1e-05").step(2)
    assert [r["completion"] for r in by["dpo-s42-lr1e-05@2"]] == _hf_greedy(dpo, prompts, n_new)
    assert [r["completion"] for r in by["dpo-s42-lr1e-05@2"]] != [r["completion"] for r in by["base"]]
    assert [r["completion"] for r in by["sft_copy"]] == [r["completion"] for r in by["sft-s7-lr1e-04@2"]]

    # Correctness is the strict reward of the stored completion.
    from wsg.rollouts.reward import score
    assert all(r["correct"] == (score(r["completion"], r["gold"]) == 1.0) for r in rows)

    # Accuracy and Wilson intervals against statsmodels; McNemar has every pair.
    acc = rundir.read_table(rundir.join(run, "eval", "accuracy.parquet")).to_pylist()
    for a in acc:
        k = sum(r["correct"] for r in by[a["model"]])
        lo, hi = proportion_confint(k, 6, alpha=0.05, method="wilson")
        assert (a["n"], a["correct"]) == (6, k)
        assert a["ci_low"] == pytest.approx(lo, abs=1e-12) and a["ci_high"] == pytest.approx(hi, abs=1e-12)
    mc = rundir.read_table(rundir.join(run, "eval", "mcnemar.parquet"))
    assert mc.schema.equals(MCNEMAR_SCHEMA) and mc.num_rows == 45

    # Incremental: nothing to do; a deleted model cache is the only model redone.
    assert run_eval(cfg, run, progress=False)["evaluated"] == 0
    os.remove(model_cache_path(run, "rft-s42-lr1e-04@1"))
    again = run_eval(cfg, run, progress=False)
    assert (again["evaluated"], again["cached"]) == (1, 9)
    t2 = rundir.read_table(rundir.join(run, "eval", "predictions.parquet"))
    assert t2.column("completion").to_pylist() == preds.column("completion").to_pylist()

    # LoRA requests serve the same models identically (fp32 engine).
    lcfg = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={
        "eval_mode": "lora", "steps": "last", "extra_adapters": {}})})
    lrun = str(tmp_path / "lora_run")
    os.makedirs(os.path.join(lrun, "cells"))
    for cell in ("dpo-s42-lr1e-05", "sft-s7-lr1e-04"):
        shutil.copytree(RunLayout.of(run).cell(cell).step(2), RunLayout.of(lrun).cell(cell).step(2))
    lsum = run_eval(lcfg, lrun, progress=False)
    assert lsum["mode"] == "lora" and lsum["evaluated"] == 3
    lp = rundir.read_table(rundir.join(lrun, "eval", "predictions.parquet"))
    for m in ("base", "dpo-s42-lr1e-05@2", "sft-s7-lr1e-04@2"):
        got = lp.filter(pc.equal(lp.column("model"), m)).column("completion").to_pylist()
        assert got == [r["completion"] for r in by[m]], m

    # The report renders the real eval tables.
    page = open(build_report(run), encoding="utf-8").read()
    assert "figures/accuracy.png" in page and "eval/accuracy.parquet</code> is absent" not in page
