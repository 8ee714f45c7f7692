"""`wsg geometry` from the command line: tables out, bad input exits 2."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adapter(folder, *, d_out=24, d_in=16, r=4, layers=2, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    t = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            pre = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            t[f"{pre}.lora_A.weight"] = torch.tensor(rng.normal(size=(r, d_in)), dtype=torch.float32)
            t[f"{pre}.lora_B.weight"] = torch.tensor(rng.normal(size=(d_out, r)), dtype=torch.float32)
    save_file(t, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"r": r, "lora_alpha": 2 * r, "use_rslora": False, "peft_type": "LORA",
                   "target_modules": ["q_proj", "v_proj"]}, f)
    return folder


def test_geometry_cli_writes_tables_and_refuses_mismatched_shapes(tmp_path):
    a = _adapter(str(tmp_path / "a"), seed=1)
    b = _adapter(str(tmp_path / "b"), seed=2, r=6)
    bad = _adapter(str(tmp_path / "bad"), seed=3, d_out=20)
    out = tmp_path / "geo"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "wsg.sweep.cli", "geometry", "--adapter", f"a={a}", "--adapter", f"b={b}",
           "--out", str(out), "--top-k", "3"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    g = pq.read_table(out / "global_pairs.parquet").to_pylist()
    assert len(g) == 1 and (g[0]["adapter_a"], g[0]["adapter_b"]) == ("a", "b")
    assert -1 <= g[0]["cosine"] <= 1 and pq.read_table(out / "module_pairs.parquet").num_rows == 4

    cmd = [sys.executable, "-m", "wsg.sweep.cli", "geometry", "--adapter", f"a={a}", "--adapter", f"bad={bad}",
           "--out", str(tmp_path / "geo2")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "layers.0" in res.stderr
