"""The functional stage on a tiny real run: LMC, CKA and logit lens.

`make_tiny_run` (also used by test_evaluate.py and test_report.py) writes a
run directory with tiny-qwen3 LoRA adapters saved by peft
(`init_lora_weights=False`, so ΔW ≠ 0) at two checkpoint steps, plus a copy
of one adapter as an extra adapter: its CKA with the original must be 1 at
every layer and its LMC curve flat.
"""
from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
from wsg.core import rundir
from wsg.core.config import dump_config
from wsg.core.layout import RunLayout
from wsg.sweep.config import parse_config

CELLS = (("sft", 42, 1e-4), ("rft", 42, 1e-4), ("dpo", 42, 1e-5), ("sft", 7, 1e-4))
STEPS = (1, 2)


def tiny_config(**analysis):
    data = {
        "name": "tiny",
        "model": {"name": "tiny-qwen3", "max_model_len": 256},
        "rollouts": {"dtype": "float32", "cpus_per_engine": 1},
        "train": {"effective_batch": 2, "per_device_batch": 1, "grad_accum": 2, "max_steps": 2,
                  "checkpoint_steps": list(STEPS), "lora": {"r": 4, "alpha": 8}},
        "grid": {"losses": ["sft", "rft", "dpo"], "seeds": [42, 7], "lrs": [1e-4]},
        "analysis": {"eval_sets": [{"name": "synthetic", "n_prompts": 6, "seed": 1}], "eval_max_tokens": 12,
                     "cka_prompts": 5, "lmc_items": 4, "lmc_alphas": [0.0, 0.5, 1.0], **analysis},
    }
    return parse_config(data)


def make_tiny_run(root, *, copy_of: str | None = "sft-s7-lr1e-04@2", cells=CELLS, **analysis):
    """A run dir with real peft adapters for cells x STEPS; returns (cfg, run)."""
    from peft import LoraConfig, get_peft_model
    from wsg.core.models import load_causal_lm

    run = str(root / "run")
    extra = {}
    if copy_of:
        cell, step = copy_of.split("@")
        extra = {"sft_copy": str(root / "extra" / "sft_copy")}
    cfg = tiny_config(extra_adapters=extra, **analysis)
    rundir.makedirs(run)
    rundir.write_text(RunLayout.of(run).config, dump_config(cfg))
    for k, (loss, seed, lr) in enumerate(cells):
        cid = f"{loss}-s{seed}-lr{np.format_float_scientific(lr, trim='-', exp_digits=2)}"
        for step in STEPS:
            torch.manual_seed(1000 * k + step)
            model = load_causal_lm("tiny-qwen3")
            peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
            out = RunLayout.of(run).cell(cid).step(step)
            peft_model.save_pretrained(out)
            rundir.mark_complete(out)
    # An incomplete checkpoint (no _COMPLETE marker) must be ignored.
    partial = RunLayout.of(run).cell("sft-s42-lr1e-04").step(3)
    shutil.copytree(RunLayout.of(run).cell("sft-s42-lr1e-04").step(2), partial)
    os.remove(os.path.join(partial, rundir.COMPLETE_MARKER))
    if copy_of:
        shutil.copytree(RunLayout.of(run).cell(cell).step(int(step)), extra["sft_copy"])
    return cfg, run


def _hf_with_adapter(path):
    from peft import PeftModel
    from wsg.core.models import load_causal_lm

    base = load_causal_lm("tiny-qwen3")
    return base if path is None else PeftModel.from_pretrained(base, path).eval()


def test_discovery_and_pairs(tmp_path):
    from wsg.analysis.adapters import list_adapters, reference_pairs
    from wsg.analysis.functional import cka_pair_list, lmc_pair_list
    from wsg.core.cells import cell_id, parse_cell_id

    cfg, run = make_tiny_run(tmp_path)
    ads = list_adapters(cfg, run)
    names = [a.name for a in ads]
    # Every complete cell x step, the incomplete step_3 left out, the extra last.
    want = sorted(f"{cell_id(l, s, lr)}@{st}" for l, s, lr in CELLS for st in STEPS)
    assert names[:-1] == want and names[-1] == "sft_copy"
    for a in ads[:-1]:
        assert (a.cell.loss, a.cell.seed, a.cell.lr) == parse_cell_id(a.cell.id)
    pairs = reference_pairs(ads, "sft")
    # Per step: sft s7 primary (sorted by seed) vs sft s42, rft and dpo (same seed 42 -> sft s42).
    assert ("sft-s7-lr1e-04@2", "sft-s42-lr1e-04@2") in pairs
    assert ("sft-s42-lr1e-04@1", "rft-s42-lr1e-04@1") in pairs
    assert ("sft-s42-lr1e-04@2", "dpo-s42-lr1e-05@2") in pairs
    assert ("sft-s7-lr1e-04@2", "sft_copy") in pairs
    assert len(pairs) == 2 * 3 + 1
    assert lmc_pair_list(cfg, ads) == pairs
    assert len(cka_pair_list(cfg, ads)) == len(pairs) + len(ads)
    steps_last = tiny_config(steps="last")
    assert {a.step for a in list_adapters(steps_last, run) if a.cell is not None} == {2}
    explicit = tiny_config(lmc_pairs=[["sft-s42-lr1e-04", "dpo-s42-lr1e-05"]])
    assert lmc_pair_list(explicit, ads) == [(f"sft-s42-lr1e-04@{s}", f"dpo-s42-lr1e-05@{s}") for s in STEPS]


def _centred_hsic_cka(x, y):
    """CKA from the HSIC form with an explicit centring matrix (Kornblith et
    al. 2019, eq. 1), independent of analysis.cka's feature/Gram shortcut."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


def _pooled_hidden(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return [h[0].double().mean(0).numpy() for h in out.hidden_states[1:]]


def test_run_functional(tmp_path, ray_module):
    import pyarrow.compute as pc
    from wsg.analysis.evaluate import eval_prompts
    from wsg.analysis.functional import run_functional
    from wsg.analysis.lmc import masked_answer_ce
    from wsg.analysis.logit_lens import prediction_depth
    from wsg.core.models import load_tokenizer
    from wsg.rollouts.prompts import encode_prompts

    cfg, run = make_tiny_run(tmp_path)
    summary = run_functional(cfg, run, progress=False)
    assert summary["computed"] == summary["units"] > 0
    lmc = rundir.read_table(rundir.join(run, "analysis", "lmc.parquet")).to_pylist()
    cka = rundir.read_table(rundir.join(run, "analysis", "cka.parquet")).to_pylist()
    lens = rundir.read_table(rundir.join(run, "analysis", "logit_lens.parquet")).to_pylist()

    tok = load_tokenizer("tiny-qwen3")
    problems, prompts = eval_prompts(cfg, cfg.analysis.eval_sets[0])
    items = [(p, f"\\boxed{{{q.answer}}}") for p, q in zip(prompts[:4], problems[:4])]
    item_ids = [(encode_prompts(tok, [p])[0], tok(a, add_special_tokens=False)["input_ids"]) for p, a in items]
    path = {a: RunLayout.of(run).cell(a.split("@")[0]).step(int(a.split("@")[1])) for a in
            ("sft-s42-lr1e-04@2", "dpo-s42-lr1e-05@2")}

    # LMC endpoints equal the CE of each adapter loaded on its own; α=1 is adapter_a.
    curve = {r["alpha"]: r for r in lmc if r["adapter_a"] == "sft-s42-lr1e-04@2" and r["adapter_b"] == "dpo-s42-lr1e-05@2"}
    assert sorted(curve) == [0.0, 0.5, 1.0] and all(r["n_items"] == 4 for r in curve.values())
    ce_a = masked_answer_ce(_hf_with_adapter(path["sft-s42-lr1e-04@2"]), None, item_ids, batch_size=2)
    ce_b = masked_answer_ce(_hf_with_adapter(path["dpo-s42-lr1e-05@2"]), None, item_ids, batch_size=2)
    assert curve[1.0]["ce"] == pytest.approx(ce_a, rel=1e-5)
    assert curve[0.0]["ce"] == pytest.approx(ce_b, rel=1e-5)
    assert abs(ce_a - ce_b) > 1e-3  # distinct adapters, so the check is not vacuous
    # The midpoint merged densely: W0 + ½ΔW_a + ½ΔW_b = ½(W0 + ΔW_a) + ½(W0 + ΔW_b).
    sa, sb = (_hf_with_adapter(p).merge_and_unload().state_dict() for p in path.values())
    mid = _hf_with_adapter(None)
    mid.load_state_dict({k: 0.5 * sa[k] + 0.5 * sb[k] for k in sa})
    assert curve[0.5]["ce"] == pytest.approx(masked_answer_ce(mid, None, item_ids, batch_size=2), rel=1e-4)
    # An adapter and its copy: flat LMC curve, CKA 1 at every layer.
    flat = [r["ce"] for r in lmc if r["adapter_b"] == "sft_copy"]
    assert len(flat) == 3 and max(flat) - min(flat) < 1e-5 * max(flat)
    same = [r["cka"] for r in cka if (r["adapter_a"], r["adapter_b"]) == ("sft-s7-lr1e-04@2", "sft_copy")]
    assert len(same) == 2 and np.allclose(same, 1.0, atol=1e-6)

    # CKA base vs dpo@2 against hidden states recomputed here, one prompt at a time.
    ids = encode_prompts(tok, prompts[:5])
    hb = [_pooled_hidden(_hf_with_adapter(None), x) for x in ids]
    hd = [_pooled_hidden(_hf_with_adapter(path["dpo-s42-lr1e-05@2"]), x) for x in ids]
    rows = sorted((r for r in cka if r["adapter_a"] == "base" and r["adapter_b"] == "dpo-s42-lr1e-05@2"),
                  key=lambda r: r["layer"])
    assert [r["layer"] for r in rows] == [0, 1]
    for layer, r in enumerate(rows):
        want = _centred_hsic_cka(np.stack([h[layer] for h in hb]), np.stack([h[layer] for h in hd]))
        assert r["cka"] == pytest.approx(want, abs=1e-5)
        assert r["cka"] < 0.999999 and r["n_prompts"] == 5

    # Logit lens: one row per adapter and the base; the base's depth as computed directly.
    by = {r["adapter"]: r for r in lens}
    assert set(by) == {"base", *path, "sft_copy"} | {r["adapter_b"] for r in cka}
    from wsg.analysis.cka import right_pad
    x, m = right_pad(ids, 0)
    assert by["base"]["mean_depth"] == pytest.approx(prediction_depth(_hf_with_adapter(None), x, m), abs=1e-9)
    assert all(0 <= r["mean_depth"] <= r["n_layers"] == 2 for r in lens)

    # Rerun: everything cached, identical tables.
    again = run_functional(cfg, run, progress=False)
    assert again["computed"] == 0
    t2 = rundir.read_table(rundir.join(run, "analysis", "lmc.parquet"))
    assert pc.all(pc.equal(t2.column("ce"), pc.cast([r["ce"] for r in lmc], "double"))).as_py()


def test_host_swaps_adapters_of_one_config_into_the_loaded_modules(tmp_path):
    """Hidden units after the first load their adapter's tensors into the
    loaded LoRA modules (no new injection): each adapter then gives the logits
    of that adapter loaded on its own, and a tensor set that does not fit the
    modules is refused by name."""
    from wsg.analysis.functional import _Host
    from wsg.core.errors import WsgError

    cfg, run = make_tiny_run(tmp_path, copy_of=None)
    paths = [RunLayout.of(run).cell(c).step(2) for c in ("sft-s42-lr1e-04", "dpo-s42-lr1e-05", "rft-s42-lr1e-04")]
    host = _Host("tiny-qwen3", "float32", False)
    x = torch.randint(1, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    seen = []
    for p in paths + [None, paths[0]]:
        model = host.model(p)
        with torch.no_grad():
            got = model(input_ids=x).logits
            want = _hf_with_adapter(p)(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        seen.append(got)
    assert host.count == 1  # one injection; every later adapter went into its modules
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[3])
    with pytest.raises(WsgError, match="missing"):
        host._load_tensors({})
