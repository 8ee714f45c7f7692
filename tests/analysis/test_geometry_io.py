"""Adapter reading: NAME=PATH parsing, PEFT name parsing and scaling (against
peft itself on a tiny random Qwen3), and the errors users can cause."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_geometry import SHAPES, random_factors, write_adapter
from wsg.analysis.geometry import parse_adapter_args, run_geometry
from wsg.analysis.geometry_io import check_compatible
from wsg.analysis.lora_io import pattern_value, read_adapter_spec
from wsg.core.errors import WsgError


def test_parse_adapter_args(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    got = parse_adapter_args([f"sft={tmp_path / 'a'}", f"dpo = {tmp_path / 'b'}"])
    assert got == {"sft": str(tmp_path / "a"), "dpo": str(tmp_path / "b")}
    with pytest.raises(WsgError, match="expected NAME=PATH"):
        parse_adapter_args([str(tmp_path / "a")])
    with pytest.raises(WsgError, match="given twice"):
        parse_adapter_args([f"x={tmp_path / 'a'}", f"x={tmp_path / 'b'}"])
    with pytest.raises(WsgError, match="no such folder"):
        parse_adapter_args([f"x={tmp_path / 'missing'}"])


def test_rank_and_alpha_patterns_follow_peft_matching(tmp_path):
    rng = np.random.default_rng(0)
    fac = random_factors(rng, 4)
    fac[(1, "q_proj")] = (fac[(1, "q_proj")][0][:, :2], fac[(1, "q_proj")][1][:2])  # rank 2 there
    folder = write_adapter(str(tmp_path / "p"), fac, r=4, alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                           alpha_pattern={"o_proj": 2})
    spec = read_adapter_spec("p", folder)
    assert sorted(spec.modules) == sorted(f"layers.{i}.{p}" for i in range(2) for p in SHAPES)
    assert spec.modules["layers.1.q_proj"].rank == 2 and spec.modules["layers.1.q_proj"].scale == 4.0
    assert spec.modules["layers.0.q_proj"].scale == 2.0
    assert spec.modules["layers.0.o_proj"].scale == 0.5  # alpha 2 / r 4
    assert pattern_value({"q_proj": 1}, "model.layers.0.self_attn.q_proj", 0) == 1
    assert pattern_value({"q_proj": 1}, "model.layers.0.self_attn.kq_proj", 0) == 0


def _tiny_peft_adapter(folder, seed, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=1000)
    model = get_peft_model(Qwen3ForCausalLM(cfg), LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False, **lora))
    model.save_pretrained(folder)
    deltas = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and "layers." in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            deltas[f"layers.{layer}.{name.rsplit('.', 1)[1]}"] = mod.get_delta_weight("default").detach().double().numpy()
    return deltas


def test_real_peft_adapters_parse_and_match_peft_deltas(tmp_path):
    """save_pretrained output of peft on a tiny random Qwen3; peft's own
    get_delta_weight (scaling included) is the dense reference."""
    d1 = _tiny_peft_adapter(str(tmp_path / "a"), 0, r=4, lora_alpha=8)
    d2 = _tiny_peft_adapter(str(tmp_path / "b"), 1, r=8, lora_alpha=16, use_rslora=True,
                            rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    tables = run_geometry({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, str(tmp_path / "geo"),
                          top_k=2, use_ray=False, progress=False)
    expect = sorted(f"layers.{i}.{p}_proj" for i in range(2) for p in "qkvo")
    assert sorted(d1) == sorted(d2) == expect
    rows = tables["adapter_modules"].to_pylist()
    assert sorted({r["module"] for r in rows}) == expect
    for r in rows:
        w = (d1 if r["adapter"] == "a" else d2)[r["module"]]
        assert r["fro_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-5)
        np.testing.assert_allclose(r["singular_values"], np.linalg.svd(w, compute_uv=False)[:len(r["singular_values"])],
                                   rtol=1e-5, atol=1e-9)
    assert len([r for r in rows if r["adapter"] == "b" and r["module"] == "layers.1.q_proj"][0]["singular_values"]) == 2
    for r in tables["module_pairs"].to_pylist():
        wa, wb = d1[r["module"]], d2[r["module"]]
        assert r["cosine"] == pytest.approx(np.sum(wa * wb) / np.linalg.norm(wa) / np.linalg.norm(wb), abs=1e-6)


def _grid(tmp_path, shapes=SHAPES, layers=2, name="x", r=4):
    rng = np.random.default_rng(1)
    return write_adapter(str(tmp_path / name), random_factors(rng, r, shapes=shapes, layers=layers), r=r, alpha=8)


def test_different_base_shapes_are_refused_naming_module_and_shapes(tmp_path):
    a = _grid(tmp_path, name="a")
    b = _grid(tmp_path, shapes={**SHAPES, "k_proj": (12, 16)}, name="b")
    with pytest.raises(WsgError, match=r"layers\.0\.k_proj.*8x16.*12x16"):
        run_geometry({"a": a, "b": b}, str(tmp_path / "out"), use_ray=False, progress=False)
    assert not os.path.exists(tmp_path / "out" / "module_pairs.parquet")


def test_different_module_sets_are_refused(tmp_path):
    a = _grid(tmp_path, name="a")
    b = _grid(tmp_path, layers=3, name="b")
    with pytest.raises(WsgError, match=r"module layers\.2\.k_proj is in adapter 'b' but not in 'a'"):
        check_compatible([read_adapter_spec("a", a), read_adapter_spec("b", b)])


def test_unreadable_or_corrupt_files_are_named(tmp_path):
    good = _grid(tmp_path, name="good")
    bad = _grid(tmp_path, name="bad")
    weights = os.path.join(bad, "adapter_model.safetensors")
    with open(weights, "r+b") as f:  # truncate the tensor data
        f.truncate(os.path.getsize(weights) - 64)
    with pytest.raises(WsgError, match=r"bad.*adapter_model\.safetensors"):
        run_geometry({"good": good, "bad": bad}, str(tmp_path / "o1"), use_ray=False, progress=False)
    with open(weights, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(WsgError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        read_adapter_spec("bad", bad)
    os.remove(os.path.join(bad, "adapter_config.json"))
    with pytest.raises(WsgError, match=r"adapter_config\.json not found"):
        read_adapter_spec("bad", bad)


def test_config_that_does_not_match_weights_is_refused(tmp_path):
    folder = _grid(tmp_path, name="x", r=4)
    cfg_path = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(cfg_path))
    cfg["r"] = 8
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WsgError, match=r"layers\.0\.k_proj has lora_A \[4, 16\] and lora_B \[8, 4\].*rank 8"):
        read_adapter_spec("x", folder)
    cfg["r"], cfg["use_dora"] = 4, True
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(WsgError, match="use_dora"):
        read_adapter_spec("x", folder)


def test_bad_top_k_is_refused(tmp_path):
    with pytest.raises(WsgError, match="top-k"):
        run_geometry({"x": _grid(tmp_path)}, str(tmp_path / "o"), top_k=0, use_ray=False, progress=False)


def test_object_store_adapter_copies_are_whole_under_concurrent_readers(tmp_path, monkeypatch):
    """Functional units on one node copy the same s3:// adapter at once (the
    cluster test's failure: a reader saw the marker before the weights). Every
    reader gets a folder with every file, byte for byte, and no temp is left."""
    from concurrent.futures import ThreadPoolExecutor

    from _cluster import S3Server
    from wsg.analysis.adapters import local_copy
    from wsg.core import rundir

    rng = np.random.default_rng(3)
    folder = write_adapter(str(tmp_path / "a"), random_factors(rng, 4), r=4, alpha=8)
    (tmp_path / "a" / "big.bin").write_bytes(rng.bytes(4 << 20))  # a slow file widens the race
    want = {n: (tmp_path / "a" / n).read_bytes() for n in os.listdir(folder)}
    s3 = S3Server(tmp_path / "s3").start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("WSG_CACHE", str(tmp_path / "cache"))
        s3.make_bucket("wsg")
        uri = "s3://wsg/run/cells/sft-s1-lr1e-04/step_2"
        rundir.upload_dir(folder, uri)

        def read(_):
            got = local_copy(uri)
            return got, {n: open(os.path.join(got, n), "rb").read() for n in want}

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(read, range(6)))
        assert len({d for d, _ in results}) == 1
        assert all(files == want for _, files in results)
        cache = tmp_path / "cache" / "adapters"
        assert sorted(os.listdir(cache)) == [os.path.basename(results[0][0])]  # no temp folder left
        assert sorted(os.listdir(results[0][0])) == sorted([*want, rundir.COMPLETE_MARKER])
        assert read_adapter_spec("a", results[0][0]).modules.keys() == read_adapter_spec("a", folder).modules.keys()
    finally:
        s3.stop()
