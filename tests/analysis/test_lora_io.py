"""analysis.lora_io, the one LoRA reader of analysis/: factor order (B, A)
against peft's own get_delta_weight, the scale rule by hand, the content hash
against a hand-written sha256 of the two files."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from test_geometry_io import _tiny_peft_adapter
from wsg.analysis.lora_io import (
    content_hash,
    load_factors,
    lora_scale,
    read_adapter_spec,
    read_lora_factors,
)


def test_lora_scale_by_hand():
    assert lora_scale(4, 8) == 2.0 and lora_scale(4, 8, False) == 2.0
    assert lora_scale(16, 32, True) == 8.0  # alpha / sqrt(r)
    assert lora_scale(6, 12, True) == pytest.approx(12 / np.sqrt(6), rel=1e-15)


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8),
                                  dict(r=8, lora_alpha=16, use_rslora=True,
                                       rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})])
def test_factors_are_b_then_a_and_reproduce_peft_deltas(tmp_path, lora):
    """s * B @ A of every module equals peft's get_delta_weight (its scaling,
    rsLoRA and rank/alpha patterns included)."""
    deltas = _tiny_peft_adapter(str(tmp_path / "a"), 3, **lora)
    spec, factors = read_lora_factors(str(tmp_path / "a"))
    assert list(factors) == sorted(deltas, key=lambda m: (int(m.split(".")[1]), m.split(".")[2]))
    for module, (b, a, s) in factors.items():
        m = spec.modules[module]
        assert b.shape == (m.d_out, m.rank) and a.shape == (m.rank, m.d_in) and s == m.scale
        np.testing.assert_allclose(s * b.double().numpy() @ a.double().numpy(), deltas[module], rtol=1e-6, atol=1e-7)
        assert m.prefix.endswith(module.split(".")[-1]) and f"layers.{m.layer}." in m.prefix
    # load_factors reads a subset in the same order
    mods = [spec.modules["layers.1.v_proj"], spec.modules["layers.0.q_proj"]]
    for (b, a), m in zip(load_factors(spec.weights, mods), mods):
        np.testing.assert_array_equal(b.numpy(), factors[m.module][0].numpy())
        np.testing.assert_array_equal(a.numpy(), factors[m.module][1].numpy())


def test_content_hash_is_sha256_of_both_files(tmp_path):
    _tiny_peft_adapter(str(tmp_path / "a"), 0, r=4, lora_alpha=8)
    folder = str(tmp_path / "a")
    h = hashlib.sha256()
    for fname in ("adapter_config.json", "adapter_model.safetensors"):
        h.update(fname.encode())
        h.update(open(os.path.join(folder, fname), "rb").read())
    want = h.hexdigest()[:16]
    assert content_hash(folder) == want
    assert content_hash(folder, chunk=1000) == want  # streamed in small blocks
    assert content_hash("file://" + os.path.abspath(folder)) == want
    # a changed byte changes it; a copy elsewhere does not
    import shutil

    shutil.copytree(folder, tmp_path / "copy")
    assert content_hash(str(tmp_path / "copy")) == want
    with open(tmp_path / "copy" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert content_hash(str(tmp_path / "copy")) != want
    assert read_adapter_spec("a", folder).config["r"] == 4
